"""The data pipeline at a real size: 50,000 64x64 PNGs streamed from disk, as a folder and as tar shards.

Against two references: sculpt's in-memory path (every image decoded once into uint8 at the
start), and, as the peer, a plain ``torch.utils.data.DataLoader`` over a map-style dataset
that opens each PNG with PIL (shuffled, the same batch size and number of workers).

For each, in a fresh process (so memory and start-up are its own):

- time to the first batch (pipeline) or the first training step (training), counted from
  the process's start: imports, listing / indexing the files, decoding, workers starting;
- steady img/s of the data pipeline alone (batches fetched and discarded);
- steady img/s of training (``sculpt.train.train`` on unet-small, from log.jsonl);
- peak memory: the proportional set size (PSS, so pages shared after fork count once) of
  the process and its worker processes together, sampled every 0.2 s.

The images are written once into benchmarks/out/data/ (a minute or two): 5,000 different
smooth random colour fields with a little noise, each written as 10 files; the tar shards
(10 x 5,000 images, WebDataset layout KEY.png + KEY.cls) are written from them.

    OMP_NUM_THREADS=2 python benchmarks/data.py             # 50,000 images: about 15 minutes on 2 cores
    python benchmarks/data.py --quick                       # 5,000 images, short runs: a smoke test
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent / "out" / "data"
DISTINCT = 5_000  # different images among the n files


# ----------------------------------------------------------------------------- the images


def write_images(n: int) -> tuple[Path, Path]:
    """n 64x64 RGB PNGs (smooth random colour fields: PNG sizes like photographs'), and the same as tar shards."""
    from PIL import Image
    from tqdm import tqdm

    folder, shards = ROOT / f"png{n}", ROOT / f"tar{n}"
    if not (folder / "done").is_file():
        # DISTINCT different images, each written as n / DISTINCT separate files (PNG encoding is the slow part
        # of writing; reading decodes every file on its own, so the copies cost the pipeline what new images would).
        rng = np.random.default_rng(0)
        encoded = []
        for _ in tqdm(range(min(n, DISTINCT)), desc="encoding PNGs", unit="img"):
            coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            image = Image.fromarray(coarse).resize((64, 64), Image.Resampling.BICUBIC)
            noisy = np.clip(np.asarray(image, dtype=np.int16) + rng.integers(-8, 9, (64, 64, 3)), 0, 255)
            buffer = io.BytesIO()
            Image.fromarray(noisy.astype(np.uint8)).save(buffer, format="PNG", compress_level=1)
            encoded.append(buffer.getvalue())
        for i in tqdm(range(n), desc="writing PNGs", unit="img"):
            path = folder / f"{i // 1000:03d}" / f"{i:06d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(encoded[i % len(encoded)])
        (folder / "done").write_text(str(n))
    if not (shards / "done").is_file():
        shards.mkdir(parents=True, exist_ok=True)
        files = sorted(folder.rglob("*.png"))
        per_shard = max(1, n // 10)
        for start in tqdm(range(0, n, per_shard), desc="writing tar shards", unit="shard"):
            with tarfile.open(shards / f"shard-{start // per_shard:06d}.tar", "w") as tar:
                for path in files[start : start + per_shard]:
                    for name, data in ((f"{path.stem}.png", path.read_bytes()), (f"{path.stem}.cls", b"0")):
                        info = tarfile.TarInfo(name)
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
        (shards / "done").write_text(str(n))
    return folder, shards


# ----------------------------------------------------------------------------- one measurement (a child process)


def process_age() -> float:
    """Seconds since this process started (from /proc: the interpreter's start-up counts too)."""
    with open("/proc/self/stat") as handle:
        start_ticks = int(handle.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as handle:
        return float(handle.read().split()[0]) - start_ticks / os.sysconf("SC_CLK_TCK")


def child_pipeline(kind: str, spec: str, batch: int, seconds: float, workers: int) -> dict:
    """Fetch batches for `seconds`; print the time of the first batch and the steady rate."""
    import torch

    if kind == "peer":
        from PIL import Image

        class PILFolder(torch.utils.data.Dataset):  # what a user writes without sculpt
            def __init__(self, root):
                self.paths = sorted(str(p) for p in Path(root).rglob("*.png"))

            def __len__(self):
                return len(self.paths)

            def __getitem__(self, i):
                with Image.open(self.paths[i]) as image:
                    pixels = np.array(image.convert("RGB"), dtype=np.uint8)
                return torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1

        loader = torch.utils.data.DataLoader(
            PILFolder(spec), batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
            generator=torch.Generator().manual_seed(0), persistent_workers=workers > 0,
        )

        def forever():
            while True:
                yield from loader

        stream = forever()
    else:
        from sculpt.data import batches, load_dataset

        dataset = load_dataset(spec, resolution=64, channels=3, stream=kind == "stream", workers=workers)
        stream = batches(dataset, batch, generator=torch.Generator().manual_seed(0), hflip=True, workers=workers)
    next(stream)
    first = process_age()
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        next(stream)
        count += batch
    return {"first": first, "img_per_s": count / (time.perf_counter() - started)}


def child_train(kind: str, spec: str, batch: int, seconds: float, workers: int) -> dict:
    from sculpt.config import Config, override
    from sculpt.train import train

    out = Path(tempfile.mkdtemp(prefix="sculpt-data-bench-")) / "run"
    config = override(
        Config(),
        {
            "data.name": spec, "data.resolution": "64", "data.channels": "3", "data.hflip": "true",
            "data.stream": "true" if kind == "stream" else "false", "data.workers": str(workers),
            "model.net": "unet-small", "train.batch_size": str(batch), "train.steps": "100000",
            "train.time_limit": str(seconds), "train.log_every": "1", "train.sample_every": "0",
            "train.checkpoint_every": "0", "train.num_samples": "4", "train.sample_steps": "1", "out": str(out),
        },
    )  # fmt: skip
    import threading

    first = {}

    def watch():  # the first log line is written right after the first optimizer step
        log = out / "log.jsonl"
        while not (log.is_file() and log.stat().st_size):
            time.sleep(0.02)
        first["s"] = process_age()

    threading.Thread(target=watch, daemon=True).start()
    train(config, progress=False)
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steady = [r["img_per_s"] for r in lines[2:]] or [r["img_per_s"] for r in lines]
    return {"first": first.get("s", float("nan")), "img_per_s": statistics.median(steady), "steps": len(lines)}


def in_memory_fetch(spec: str, batch: int = 128, repeats: int = 300) -> None:
    """One in-memory batch with flips: uint8 storage (now) against the float32 storage sculpt had before."""
    import torch

    from sculpt.data import batches, load_dataset

    dataset = load_dataset(spec)
    floats = dataset.images()  # what ImageDataset.images held before: float32 in [-1, 1]

    def before(indices, flips):  # the old Batches.__next__, line for line
        images = floats[indices]
        if flips.any():
            images = torch.where(flips[:, None, None, None], images.flip(-1), images)
        return images, dataset.labels[indices]

    stream = batches(dataset, batch, generator=torch.Generator().manual_seed(0), hflip=True)
    sampler = stream.sampler.__class__(len(dataset), batch, seed=1, hflip=True)
    times = {"now": [], "before": []}
    for _ in range(repeats):  # alternate, so a busy machine slows both alike
        t = time.perf_counter()
        next(stream)
        times["now"].append(time.perf_counter() - t)
        t = time.perf_counter()
        before(*next(sampler))  # the sampler's draw is inside both timings
        times["before"].append(time.perf_counter() - t)
    now, old = (statistics.median(times[k]) * 1e3 for k in ("now", "before"))
    mib = dataset.pixels.numel() / 2**20
    print(f"in-memory batch of {batch} with flips ({dataset.name}, {mib:.0f} MiB as uint8, {4 * mib:.0f} as float32): "
          f"sculpt uint8 {now:.3f} ms, float32 (before) {old:.3f} ms, {old / now:.2f}x", flush=True)  # fmt: skip


# ----------------------------------------------------------------------------- the parent: memory and start-up


def pss_kib(pid: int) -> int:
    """PSS of a process and all its descendants, in KiB (pages shared after fork count once)."""
    total = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                    break
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as handle:
                total += sum(pss_kib(int(child)) for child in handle.read().split())
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return total


def measure(mode: str, kind: str, spec: str, args) -> dict:
    """Run one child; return its result with peak PSS and the time to its first batch / step."""
    result_file = Path(tempfile.mkstemp(suffix=".json")[1])
    seconds = args.pipeline_seconds if mode == "pipeline" else args.train_seconds
    batch = args.batch if mode == "pipeline" else args.train_batch
    command = [sys.executable, __file__, "--child", mode, kind, spec, str(batch), str(seconds), str(args.workers),
               str(result_file)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    process = subprocess.Popen(command, env=env)
    peak = 0
    while process.poll() is None:
        peak = max(peak, pss_kib(process.pid))
        time.sleep(0.2)
    if process.returncode != 0:
        raise RuntimeError(f"{mode} {kind} {spec} failed (exit {process.returncode})")
    result = json.loads(result_file.read_text())
    result_file.unlink()
    result["peak_mib"], result["first_s"] = peak / 1024, result.pop("first")
    return result


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        mode, kind, spec, batch, seconds, workers, out = sys.argv[2:]
        run = child_pipeline if mode == "pipeline" else child_train
        Path(out).write_text(json.dumps(run(kind, spec, int(batch), float(seconds), int(workers))))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="5,000 images and short runs (a smoke test)")
    parser.add_argument("-n", type=int, default=None, help="images (default 50,000; --quick 5,000)")
    parser.add_argument("--workers", type=int, default=None, help="decoding workers (default sculpt's default)")
    parser.add_argument("--batch", type=int, default=128, help="batch of the pipeline-alone runs")
    parser.add_argument("--train-batch", type=int, default=16, help="batch of the training runs (unet-small)")
    parser.add_argument("--pipeline-seconds", type=float, default=None)
    parser.add_argument("--train-seconds", type=float, default=None)
    parser.add_argument("--skip", default="", help="comma list of: fetch, pipeline, train, memory-train")
    parser.add_argument("--mnist", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist-5k"))
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from sculpt.data import default_workers

    n = args.n or (5_000 if args.quick else 50_000)
    args.workers = default_workers() if args.workers is None else args.workers
    args.pipeline_seconds = args.pipeline_seconds or (5 if args.quick else 30)
    args.train_seconds = args.train_seconds or (15 if args.quick else 90)
    folder, shards = write_images(n)
    skip = set(filter(None, args.skip.split(",")))
    print(f"{n} 64x64 PNGs ({sum(p.stat().st_size for p in folder.rglob('*.png')) / 2**20:.0f} MiB on disk), "
          f"{args.workers} decoding worker(s), {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}",
          flush=True)  # fmt: skip

    def line(what: str, a: dict, b: dict, a_name: str, b_name: str, key: str, unit: str, higher: bool = True):
        ratio = a[key] / b[key] if higher else b[key] / a[key]
        print(f"{what}: {a_name} {a[key]:.1f} {unit}, {b_name} {b[key]:.1f} {unit}, {ratio:.2f}x", flush=True)

    if "fetch" not in skip:
        import torch

        torch.set_num_threads(1)
        in_memory_fetch("digits")
        if Path(args.mnist).is_dir():
            in_memory_fetch(f"mnist:{args.mnist}")
    if "pipeline" not in skip:
        runs = {
            "stream folder": measure("pipeline", "stream", str(folder), args),
            "stream tar": measure("pipeline", "stream", str(shards), args),
            "peer": measure("pipeline", "peer", str(folder), args),
            "memory": measure("pipeline", "memory", str(folder), args),
        }
        for name, r in runs.items():
            print(f"  pipeline {name}: {r}", flush=True)
        for name in ("stream folder", "stream tar", "memory"):
            line(f"pipeline img/s, {name} vs peer", runs[name], runs["peer"], f"sculpt {name}", "DataLoader+PIL",
                 "img_per_s", "img/s")  # fmt: skip
            line(f"pipeline first batch, {name} vs peer", runs[name], runs["peer"], f"sculpt {name}",
                 "DataLoader+PIL", "first_s", "s", higher=False)  # fmt: skip
            line(f"pipeline peak memory, {name} vs peer", runs[name], runs["peer"], f"sculpt {name}",
                 "DataLoader+PIL", "peak_mib", "MiB", higher=False)  # fmt: skip
    if "train" not in skip:
        runs = {"stream folder": measure("train", "stream", str(folder), args),
                "stream tar": measure("train", "stream", str(shards), args)}  # fmt: skip
        if "memory-train" not in skip:
            runs["memory"] = measure("train", "memory", str(folder), args)
        for name, r in runs.items():
            print(f"  train {name}: {r}", flush=True)
        if "memory" in runs:
            for name in ("stream folder", "stream tar"):
                line(f"unet-small train img/s, {name} vs in memory", runs[name], runs["memory"], f"sculpt {name}",
                     "sculpt in memory", "img_per_s", "img/s")  # fmt: skip
                line(f"train first step, {name} vs in memory", runs[name], runs["memory"], f"sculpt {name}",
                     "sculpt in memory", "first_s", "s", higher=False)  # fmt: skip
                line(f"train peak memory, {name} vs in memory", runs[name], runs["memory"], f"sculpt {name}",
                     "sculpt in memory", "peak_mib", "MiB", higher=False)  # fmt: skip


if __name__ == "__main__":
    main()
