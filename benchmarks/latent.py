"""Latent diffusion against pixel diffusion: the autoencoder, throughput and quality at equal wall-clock.

On ``../shared/data/mnist-5k`` resized to ``--res`` (default 64x64, greyscale):

1. **Autoencoders** ``ae-f4`` and ``ae-f8`` (``sculpt train --task autoencoder``, L1 + KL 1e-6, no
   discriminator) are trained for ``--ae-steps``. Scored on the test split: PSNR of the posterior
   mean's reconstruction, and the Frechet distance (FD) of reconstructions against the originals.
   That FD is the latent model's floor: its samples can be no closer to the data than its decoder.
2. **Throughput** of the same network (``--net``, default unet-tiny) in pixel space (1 x res x res)
   and in latent space (4 x res/f x res/f): training img/s (a denoising step with AdamW, batch
   ``--batch``, over ``--train-steps`` timed steps after one warm-up; latents come from the cache,
   so encoding is not counted) and sampling img/s (``--sample-steps`` dpmpp_2m steps, decoding
   included for latents), with peak memory: the peak RSS of a fresh process per measurement on
   the CPU (weights, optimizer and activations together), max_memory_allocated on CUDA.
3. **Quality at equal wall-clock**: the pixel model and the f=4 latent model each train for
   ``--seconds`` (``train.time_limit``; the autoencoder's training is not counted: it is made
   once and shared by every latent model); FD of ``--n`` samples against ``--n`` test images,
   beside the autoencoder's reconstruction FD (the floor) and the real-vs-real FD.

FD is in the 128-d features of a domain classifier fitted on the 28x28 training split.
Every comparison is one line ending in the ratio; the goals of issue 13 are printed beside them.

    python benchmarks/latent.py                                   # 64x64, about an hour on 2 CPU cores
    python benchmarks/latent.py --res 32 --ae-steps 300 --seconds 300 --n 500   # a reduced run
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from sculpt.config import Config, override
from sculpt.data import load_dataset
from sculpt.images import save_grid
from sculpt.latent import latent_dataset, open_codec
from sculpt.metrics import frechet_distance
from sculpt.metrics.features import get_extractor, train_classifier
from sculpt.run import load
from sculpt.samplers import generate
from sculpt.train import train

ROOT = Path(__file__).resolve().parent
SPEC = ""  #: the dataset (--data)
OUT = ROOT / "out" / "latent"
MNIST = ROOT.parent.parent / "shared" / "data" / "mnist-5k"


def autoencoder(factor: int, args) -> Path:
    out = OUT / f"ae-f{factor}-{args.res}"
    if args.reuse and (out / "ema.safetensors").is_file():
        return out
    config = override(
        Config(),
        {
            "task": "autoencoder",
            "model.net": f"ae-f{factor}",
            "data.name": SPEC,
            "data.resolution": str(args.res),
            "train.steps": str(args.ae_steps),
            "train.batch_size": str(args.batch),
            "train.lr": "1e-3",
            "train.sample_every": "0",
            "train.checkpoint_every": "0",
            "train.log_every": "20",
            "train.num_samples": "32",
            "out": str(out),
        },
    )
    train(config)
    return out


def diffusion_config(out: Path, args, latent: Path | None, seconds: float) -> Config:
    values = {
        "model.net": args.net,
        "data.name": SPEC,
        "data.resolution": str(args.res),
        "train.steps": "1000000",
        "train.time_limit": str(seconds),
        "train.batch_size": str(args.batch),
        "train.sample_every": "0",
        "train.checkpoint_every": "0",
        "train.log_every": "20",
        "train.num_samples": "64",
        "out": str(out),
    }
    if latent is not None:
        values["latent.autoencoder"] = str(latent)
        values["latent.cache_dir"] = str(OUT / "cache")
    return override(Config(), values)


# -- throughput, one fresh process per measurement (its peak RSS is that measurement's) -------------


def measure(spec: dict) -> dict:
    """Train and sample img/s of ``spec['net']`` in pixel space or the latent space of ``spec['latent']``."""
    from sculpt.denoiser import Denoiser
    from sculpt.latent import LatentDenoiser
    from sculpt.nets import NETS
    from sculpt.objectives import denoising_loss
    from sculpt.run import build_schedule
    from sculpt.train import make_optimizer

    device = torch.device(spec["device"])
    torch.manual_seed(0)
    res, batch = spec["res"], spec["batch"]
    codec = open_codec(spec["latent"], progress=False).to(device) if spec["latent"] else None
    shape = codec.latent_shape((1, res, res)) if codec is not None else (1, res, res)
    net = NETS[spec["net"]](in_channels=shape[0], resolution=shape[1]).to(device)
    D = Denoiser(net, build_schedule(Config()), "v")
    optimizer = make_optimizer(net.parameters(), lr=1e-4)
    x0 = torch.randn((batch, *shape), device=device)

    def step() -> None:
        loss = denoising_loss(D, x0, weighting="min_snr").mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()
    sync()
    started = time.perf_counter()
    for _ in range(spec["train_steps"]):
        step()
    sync()
    train_rate = batch * spec["train_steps"] / (time.perf_counter() - started)
    sampler = LatentDenoiser(D, codec) if codec is not None else D
    n = spec["sample_n"]
    generate(sampler, (1, res, res), min(n, 4), steps=2, batch_size=n, progress=False, device=device)  # warm-up
    sync()
    started = time.perf_counter()
    generate(sampler, (1, res, res), n, steps=spec["sample_steps"], batch_size=n, progress=False, device=device)
    sync()
    sample_rate = n / (time.perf_counter() - started)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        kind = "CUDA max allocated"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
        kind = "peak RSS"
    return {"train": train_rate, "sample": sample_rate, "memory_mb": peak, "memory_kind": kind}


def measure_in_subprocess(spec: dict) -> dict:
    result = subprocess.run(
        [sys.executable, __file__, "--measure", json.dumps(spec)], capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


# -- scores ------------------------------------------------------------------------------------------


def features(extractor, images: torch.Tensor):
    return extractor.features(images, progress=False)


def reconstruct(ae_run: Path, images: torch.Tensor, device) -> torch.Tensor:
    codec = open_codec(str(ae_run), progress=False).to(device)
    out = []
    for start in range(0, len(images), 64):
        z = codec.encode(images[start : start + 64].to(device))
        out.append(codec.decode(z).float().clamp(-1, 1).cpu())
    return torch.cat(out)


def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    mse = (x - y).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return float((10 * torch.log10(4 / mse)).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=f"mnist:{MNIST}", help="a labelled dataset spec (default mnist-5k)")
    parser.add_argument("--res", type=int, default=64)
    parser.add_argument("--net", default="unet-tiny")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--ae-steps", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=900.0, help="training wall-clock of each diffusion model")
    parser.add_argument("--n", type=int, default=1000, help="samples (and test images) per FD")
    parser.add_argument("--train-steps", type=int, default=5, help="timed training steps per throughput figure")
    parser.add_argument("--sample-n", type=int, default=32)
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--factors", default="4,8")
    parser.add_argument("--reuse", action="store_true", help="keep run folders that exist")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(json.loads(args.measure))))
        return
    global SPEC
    SPEC = args.data
    OUT.mkdir(parents=True, exist_ok=True)
    factors = [int(f) for f in args.factors.split(",")]
    device = torch.device(args.device)
    print(f"mnist-5k at {args.res}x{args.res}, {args.net}, batch {args.batch}, device {device}", flush=True)

    classifier = OUT / "classifier"
    if args.reuse and (classifier / "classifier.safetensors").is_file():
        extractor = get_extractor(f"classifier:{classifier}", device=device)
        accuracy = extractor.config.get("accuracy")
    else:
        classifier_data = load_dataset(SPEC)
        test_native = load_dataset(SPEC, split="test")
        extractor, accuracy = train_classifier(classifier_data, test_dataset=test_native, progress=False)
        extractor.save(classifier)
    print(f"domain classifier: test accuracy {accuracy:.4f}", flush=True)
    test = load_dataset(SPEC, resolution=args.res, split="test")
    train_set = load_dataset(SPEC, resolution=args.res)
    n = min(args.n, len(test))
    pick = torch.Generator().manual_seed(0)  # the IDX files are sorted by class: random subsets, never the first n
    real = test.images(torch.randperm(len(test), generator=pick)[:n])
    real_feats = features(extractor, real)
    others = train_set.images(torch.randperm(len(train_set), generator=pick)[:n])
    floor = frechet_distance(features(extractor, others), real_feats)

    # 1. autoencoders
    runs, recon_fd = {}, {}
    for f in factors:
        started = time.perf_counter()
        runs[f] = autoencoder(f, args)
        seconds = time.perf_counter() - started
        recon = reconstruct(runs[f], real, device)
        recon_fd[f] = frechet_distance(features(extractor, recon), real_feats)
        save_grid(OUT / f"reconstruction-f{f}.png", torch.stack([real[:32], recon[:32]], 1).flatten(0, 1), nrow=16)
        scale = json.loads((runs[f] / "latent_scale.json").read_text())["scale"]
        print(
            f"autoencoder f={f} ({args.ae_steps} steps, {seconds:.0f} s, latent scale {scale:.3f}): "
            f"test PSNR {psnr(recon, real):.2f} dB, reconstruction FD {recon_fd[f]:.2f}, "
            f"real-vs-real FD {floor:.2f}, {recon_fd[f] / floor:.2f}x",
            flush=True,
        )

    # 2. throughput
    base = {
        "net": args.net,
        "res": args.res,
        "batch": args.batch,
        "device": str(device),
        "train_steps": args.train_steps,
        "sample_n": args.sample_n,
        "sample_steps": args.sample_steps,
    }
    pixel = measure_in_subprocess({**base, "latent": ""})
    for f in factors:
        latent = measure_in_subprocess({**base, "latent": str(runs[f])})
        print(
            f"train f={f}: pixel {pixel['train']:.1f} img/s, latent {latent['train']:.1f} img/s, "
            f"{latent['train'] / pixel['train']:.2f}x   (goal at f=4: >= 8x)",
            flush=True,
        )
        print(
            f"sample f={f} ({args.sample_steps} steps, decode included): pixel {pixel['sample']:.1f} img/s, "
            f"latent {latent['sample']:.1f} img/s, {latent['sample'] / pixel['sample']:.2f}x",
            flush=True,
        )
        print(
            f"memory f={f} ({pixel['memory_kind']}): pixel {pixel['memory_mb']:.0f} MB, "
            f"latent {latent['memory_mb']:.0f} MB, {pixel['memory_mb'] / latent['memory_mb']:.2f}x",
            flush=True,
        )

    # 3. quality at equal wall-clock (f = 4)
    results = {}
    for name, latent in (("pixel", None), ("latent f=4", runs[4] if 4 in runs else runs[factors[0]])):
        out = OUT / f"{name.replace(' ', '-').replace('=', '')}-{args.res}-{int(args.seconds)}s"
        if not (args.reuse and (out / "ema.safetensors").is_file()):
            if latent is not None:  # the cache is built before the clock starts (once per autoencoder)
                codec = open_codec(str(latent), progress=False)
                latent_dataset(codec, train_set, cache_dir=OUT / "cache", spec=SPEC, progress=False)
            train(diffusion_config(out, args, latent, args.seconds))
        steps = json.loads((out / "log.jsonl").read_text().splitlines()[-1])["step"]
        D, config = load(out, device=device)
        fake = generate(D, (1, args.res, args.res), n, steps=args.sample_steps, progress=False, device=device)
        save_grid(OUT / f"samples-{out.name}.png", fake[:64], nrow=8)
        results[name] = (frechet_distance(features(extractor, fake), real_feats), steps)
    (pixel_fd, pixel_steps), (latent_fd, latent_steps) = results["pixel"], results["latent f=4"]
    print(
        f"FD at equal wall-clock ({args.seconds:.0f} s of training, n={n}): pixel {pixel_fd:.2f} "
        f"({pixel_steps} steps), latent f=4 {latent_fd:.2f} ({latent_steps} steps), "
        f"{pixel_fd / latent_fd:.2f}x   (goal: latent below pixel; its floor, the reconstruction FD, "
        f"{recon_fd.get(4, recon_fd[factors[0]]):.2f}; real-vs-real {floor:.2f})",
        flush=True,
    )


if __name__ == "__main__":
    main()
