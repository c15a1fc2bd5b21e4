"""Same wall-clock budget, same data: sculpt's default training against a diffusers loop.

For each dataset (scikit-learn's 8x8 digits, and ``../shared/data/mnist-5k`` at 28x28) the
script trains two models for the same number of wall-clock seconds, samples both in 20
steps, and scores them:

- **sculpt**: ``sculpt.train.train(Config())`` exactly as ``sculpt train`` runs it (unet-tiny,
  cosine schedule, v-prediction, min-SNR weighting, EMA, batch 128, lr 3e-3), stopped by
  ``train.time_limit``; sampled with ``dpmpp_2m``, 20 steps, from the EMA weights.
- **diffusers**: the loop of diffusers' ``train_unconditional.py`` example written out here:
  ``UNet2DModel`` sized like unet-tiny (block_out_channels (32, 64), one resnet per level,
  DownBlock2D / UpBlock2D, attention in the mid block), ``DDPMScheduler`` with linear betas
  and eps prediction, AdamW with the example's betas (0.95, 0.999) and weight decay 1e-6,
  gradient clipping at 1.0, ``EMAModel`` with the example's warm-up (inv_gamma 1, power 3/4,
  max 0.9999). Two changes for a fair race: the learning rate (``--diffusers-lr``, chosen by
  ``--lr-trial``; the example's 1e-4 is for large models) and a constant rate after 100
  warm-up steps (a cosine decay needs the number of steps, which a time budget does not
  know; sculpt's rate is constant after its 100 warm-up steps too). Same batch size, same
  batches, same data in [-1, 1]. Sampled from the EMA weights in 20 steps with both
  ``DDIMScheduler`` and ``DPMSolverMultistepScheduler`` (DPM-Solver++ 2M, the algorithm of
  sculpt's ``dpmpp_2m``), from the same noise as sculpt; the better of the two is diffusers' score.

Metric: the Frechet distance in the 128-d penultimate features of a small CNN classifier
(``sculpt.metrics.features.train_classifier``: ClassifierNet, widths 32-64-128, fitted once
per dataset on its train split; its accuracy on the test split is printed), between sets of
n samples and n real images, against two references, each with its real-vs-real floor (the
same distance for other real images, disjoint from the reference):

- **held-out**: the test split (digits: n = 297, MNIST-5k: n = 1000); floor: disjoint sets
  of n training images. The digits test split is written by other people than the training
  split and sits far from it (train-vs-test FD ~24 at n = 297, train-vs-train ~12), so here
  a perfect model of the training data scores the floor and the two sides cannot separate.
- **train**: half A of a fixed shuffle of the training split (digits: n = 750, MNIST-5k:
  n = 1000); floor: half B. This measures how well each side learned the distribution it
  was given (a model that memorised its training set would also reach the floor).

Digits are scored on 3000 samples per model (10 sets of 297, 4 sets of 750: mean +- sd);
MNIST on 1000 (sampling 28x28 on a CPU is slow). KID (unbiased MMD^2, cubic kernel, in the
same raw features, 100 subsets of n) is printed too.

Timing: the two sides train at the same time, each in its own process with one torch thread
(``torch.set_num_threads(1)``; ``--threads``), started together by a barrier, so on a shared,
noisy machine both see the same load (``--sequential`` trains one after the other in this
process instead). The budget is wall-clock seconds of training; each process's CPU share
(CPU seconds / wall seconds) is printed so that contention shows. img/s is images / time
over the log windows after the first (sculpt's ``log.jsonl``; the same 10-step windows here).
Sampling, features and the classifier are untimed and use ``--sample-threads``.

    python benchmarks/train_digits.py                  # 300 s per dataset (both sides at once), ~20 min
    python benchmarks/train_digits.py --quick          # 30 s budgets, a smoke run
    python benchmarks/train_digits.py --datasets digits --budget 120 --lr-trial 1e-4,1e-3,2e-3,4e-3
    python benchmarks/train_digits.py --datasets digits --main-job --threads 2  # main job; diffusers at its seconds

Outputs (sample grids, run folders, logs) go to benchmarks/out/train_digits/.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from sculpt.config import Config
from sculpt.data import batches, load_dataset
from sculpt.images import save_grid
from sculpt.metrics import frechet_distance, kid
from sculpt.metrics.features import train_classifier
from sculpt.run import load
from sculpt.samplers import sample
from sculpt.train import train

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "out" / "train_digits"
MNIST = ROOT.parent.parent / "shared" / "data" / "mnist-5k"
SPECS = {"digits": "digits", "mnist": f"mnist:{MNIST}"}
BATCH_SIZE = 128  # sculpt's default; diffusers gets the same
LOG_EVERY = 10  # steps per img/s window, as sculpt's default log_every
SAMPLE_STEPS = 20
SAMPLES = {"digits": 3000, "mnist": 1000}  # digits: 10 x 297 / 4 x 750 (cheap); MNIST: 1 x 1000 (sampling is slow)
DIFFUSERS_LR = 2e-3  # best of --lr-trial 1e-4,1e-3,2e-3,4e-3 on digits and 1e-3,2e-3,4e-3 on MNIST


@dataclass
class Result:
    name: str
    params: int
    img_per_s: float
    steps: int
    train_s: float
    cpu_share: float  # process CPU seconds / wall seconds while training (1 thread: 1.0 when not contended)
    samples: Tensor  # [num_samples, C, H, W] in [-1, 1]
    label: str = ""  # the sampler


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def window_rate(records: list[dict]) -> float:
    """Images per second over the log windows after the first (the first holds warm-up)."""
    steps = np.diff([0] + [r["step"] for r in records])
    seconds = np.array([k * BATCH_SIZE / r["img_per_s"] for k, r in zip(steps, records, strict=True)])
    later = slice(1, None) if len(records) > 1 else slice(None)
    return float(steps[later].sum() * BATCH_SIZE / seconds[later].sum())


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# -- training: one side per call ----------------------------------------------------------


def train_sculpt(spec: str, run_dir: Path, budget: float | None, start: Callable[[], object]) -> dict:
    """`sculpt train` with the default config, data `spec`, stopped after `budget` s.

    ``budget=None``: the main job as it is (its own steps and learning-rate decay, no time limit).
    """
    shutil.rmtree(run_dir, ignore_errors=True)
    base = Config()
    limits = dict(steps=10**9, time_limit=budget) if budget is not None else {}
    config = replace(
        base,
        data=replace(base.data, name=spec),
        train=replace(base.train, sample_every=0, **limits),
        out=str(run_dir),
    )
    dataset = load_dataset(spec)  # what train() would load, read before the start line
    start()
    wall, cpu = time.perf_counter(), time.process_time()
    train(config, progress=False, device="cpu", dataset=dataset)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    records = read_log(run_dir / "log.jsonl")
    steps = np.diff([0] + [r["step"] for r in records])
    loop_s = float(sum(k * BATCH_SIZE / r["img_per_s"] for k, r in zip(steps, records, strict=True)))
    # The CPU share is over the whole call, which ends with sculpt's 64-image grid (same process, same share).
    return {"run_dir": str(run_dir), "loop_s": loop_s, "cpu_share": cpu / wall}


def make_unet(resolution: int, channels: int):
    from diffusers import UNet2DModel

    # unet-tiny's shape: two levels of widths 32 and 64, one resnet per level going down (two going up),
    # attention only in the middle block (diffusers' mid block has it by default), GroupNorm of 32 groups.
    return UNet2DModel(
        sample_size=resolution,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )


def make_ddpm_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")


def train_diffusers(
    spec: str, run_dir: Path, budget: float, start: Callable[[], object], lr: float = DIFFUSERS_LR, seed: int = 0
) -> dict:
    """diffusers' train_unconditional loop for `budget` s; writes the EMA weights to run_dir."""
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from safetensors.torch import save_file

    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    dataset = load_dataset(spec)
    channels, resolution, _ = dataset.shape
    torch.manual_seed(seed)
    model = make_unet(resolution, channels)
    noise_scheduler = make_ddpm_scheduler()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    lr_scheduler = get_scheduler("constant_with_warmup", optimizer=optimizer, num_warmup_steps=100)
    ema = EMAModel(model.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4, foreach=True)
    stream = batches(dataset, BATCH_SIZE, generator=torch.Generator().manual_seed(seed))
    generator = torch.Generator().manual_seed(seed + 1)
    records, window_loss, step = [], 0.0, 0
    model.train()
    start()
    cpu = time.process_time()
    started = window_start = time.perf_counter()
    while True:
        clean, _ = next(stream)
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(clean),), generator=generator)
        noisy = noise_scheduler.add_noise(clean, noise, timesteps)
        loss = F.mse_loss(model(noisy, timesteps).sample, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        lr_scheduler.step()
        ema.step(model.parameters())
        optimizer.zero_grad(set_to_none=True)
        step += 1
        window_loss += loss.item()
        last = time.perf_counter() - started > budget
        if step % LOG_EVERY == 0 or last:
            in_window = step - (records[-1]["step"] if records else 0)
            now = time.perf_counter()
            rate = in_window * BATCH_SIZE / (now - window_start)
            records.append({"step": step, "loss": window_loss / in_window, "img_per_s": rate})
            window_loss, window_start = 0.0, now
        if last:
            break
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    (run_dir / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    ema.copy_to(model.parameters())
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(run_dir / "ema.safetensors"))
    return {"run_dir": str(run_dir), "loop_s": wall, "cpu_share": cpu / wall}


TRAINERS = {"sculpt": train_sculpt, "diffusers": train_diffusers}


def _worker(trainer: str, kwargs: dict, threads: int, barrier, queue) -> None:
    torch.set_num_threads(threads)
    try:
        queue.put((kwargs["run_dir"], TRAINERS[trainer](**kwargs, start=barrier.wait)))
    except BaseException:
        barrier.abort()  # the other side is not left waiting at the start line
        queue.put((kwargs["run_dir"], traceback.format_exc()))


def train_all(jobs: list[tuple[str, dict]], threads: int, parallel: bool) -> list[dict]:
    """Run the (trainer, kwargs) jobs: all at once in their own processes, or one by one here."""
    if not parallel:
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return [TRAINERS[trainer](**kwargs, start=lambda: None) for trainer, kwargs in jobs]
        finally:
            torch.set_num_threads(previous)
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # fresh interpreters: no forked torch thread pools
    barrier, queue = context.Barrier(len(jobs), timeout=600), context.Queue()
    processes = [context.Process(target=_worker, args=(t, kw, threads, barrier, queue)) for t, kw in jobs]
    for process in processes:
        process.start()
    timeout = max(kwargs["budget"] for _, kwargs in jobs) + 1800  # a crashed child never answers
    done = dict(queue.get(timeout=timeout) for _ in jobs)
    for process in processes:
        process.join()
    failed = {k: v for k, v in done.items() if isinstance(v, str)}
    if failed:
        raise RuntimeError("training failed:\n" + "\n".join(f"{k}:\n{v}" for k, v in failed.items()))
    return [done[kwargs["run_dir"]] for _, kwargs in jobs]


# -- sampling -----------------------------------------------------------------------------


def sample_sculpt(run_dir: Path, noise: Tensor) -> tuple[int, Tensor]:
    denoiser, _ = load(run_dir)
    chunks = [
        sample(denoiser, tuple(c.shape), sampler="dpmpp_2m", steps=SAMPLE_STEPS, noise=c) for c in noise.split(500)
    ]
    return count(denoiser.net), torch.cat(chunks)


def sample_diffusers(run_dir: Path, kind: str, noise: Tensor) -> tuple[int, Tensor]:
    """20 steps of diffusers' standard sampling loop from the given unit noise, EMA weights."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
    from safetensors.torch import load_file

    unet = make_unet(noise.shape[-1], noise.shape[1])
    unet.load_state_dict(load_file(str(run_dir / "ema.safetensors")))
    unet.eval()
    cls = {"ddim": DDIMScheduler, "dpmpp_2m": DPMSolverMultistepScheduler}[kind]
    scheduler = cls.from_config(make_ddpm_scheduler().config)
    out = []
    with torch.inference_mode():
        for chunk in noise.split(500):
            scheduler.set_timesteps(SAMPLE_STEPS)
            x = chunk * scheduler.init_noise_sigma
            for t in scheduler.timesteps:
                eps = unet(scheduler.scale_model_input(x, t), t).sample
                x = scheduler.step(eps, t, x).prev_sample
            out.append(x)
    return count(unet), torch.cat(out)


# -- scoring ------------------------------------------------------------------------------


@dataclass
class Reference:
    """Features of n real images that samples are compared with, and the real-vs-real floor."""

    name: str  # what the n images are, for the printout
    feats: np.ndarray  # [n, 128]
    floor_feats: np.ndarray  # [k * n, 128]: k disjoint sets of n other real images

    @property
    def n(self) -> int:
        return len(self.feats)


def distances(feats: np.ndarray, reference: Reference) -> tuple[float, float, float, int]:
    """FD of each disjoint set of n rows against the reference: mean, sd, KID over all rows, number of sets."""
    n = reference.n
    fds = [frechet_distance(feats[i : i + n], reference.feats) for i in range(0, len(feats) - n + 1, n)]
    kid_mean = kid(feats, reference.feats, subsets=100, subset_size=n)[0]
    return float(np.mean(fds)), float(np.std(fds)), kid_mean, len(fds)


def millions(p: int) -> str:
    return f"{p / 1e6:.2f}M"


def benchmark(name: str, args: argparse.Namespace) -> str | None:
    spec = SPECS[name]
    train_set, test_set = load_dataset(spec), load_dataset(spec, split="test")
    channels, res, _ = train_set.shape
    began = time.perf_counter()
    extractor, accuracy = train_classifier(
        train_set, test_dataset=test_set, steps=args.classifier_steps, progress=False
    )
    features = lambda images: extractor.features(images, batch_size=256, progress=False)
    # Two references. "held-out": the test split (n = all of it), floor = disjoint sets of n training images.
    # "train": half A of a shuffle of the training split (n = min(N / 2, 1000)), floor = half B. The test split
    # of digits is written by other people and sits far from the training split (train-vs-test FD ~24 at
    # n = 297, train-vs-train ~12), so against it a model of the training data can do no better than the
    # training data itself: both sides land on the floor. Half A measures how well each side learned the
    # distribution it was given (a model that memorised the training set would reach the floor too).
    order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(0))
    n_test = min(len(test_set), args.n or len(test_set))
    n_train = min(len(train_set) // 2, 1000, args.n or len(train_set))
    shuffled = train_set.images()[order]
    references = [
        Reference(
            f"the {n_test} held-out test images",
            features(test_set.images()[:n_test]),
            features(shuffled[: min(5, len(shuffled) // n_test) * n_test]),
        ),
        Reference(
            f"{n_train} training images", features(shuffled[:n_train]), features(shuffled[n_train : 2 * n_train])
        ),
    ]
    floors = [distances(reference.floor_feats, reference) for reference in references]
    print(
        f"[{name} {res}x{res}] classifier (ClassifierNet widths 32-64-128, 128-d features, {args.classifier_steps}"
        f" steps, {time.perf_counter() - began:.0f} s): test accuracy {accuracy:.4f}",
        flush=True,
    )
    for reference, (fd, sd, kid_value, sets) in zip(references, floors, strict=True):
        print(
            f"  reference {reference.name}: real-vs-real floor FD {fd:.2f} +- {sd:.2f} ({sets} set(s) of "
            f"{reference.n} other training images), KID {kid_value:.3g}",
            flush=True,
        )

    tag = f"{name}-{args.budget:g}s" if not args.main_job else f"{name}-main-job"
    if args.main_job:
        # The main job as `sculpt train` runs it, then diffusers' loop for the seconds it took.
        began = time.perf_counter()
        sculpt_job = ("sculpt", {"spec": spec, "run_dir": OUT / "runs" / f"{tag}-sculpt", "budget": None})
        first = train_all([sculpt_job], args.threads, parallel=False)
        args.budget = first[0]["loop_s"]
        print(f"  sculpt's main job: {time.perf_counter() - began:.0f} s wall, {args.budget:.0f} s of training "
              "steps; diffusers gets those seconds", flush=True)  # fmt: skip
        diffusers_job = ("diffusers", {"spec": spec, "run_dir": OUT / "runs" / f"{tag}-diffusers",
                                       "lr": args.diffusers_lr, "budget": args.budget})  # fmt: skip
        jobs, names = [sculpt_job, diffusers_job], ["sculpt", "diffusers"]
        trained = first + train_all([diffusers_job], args.threads, parallel=False)
    elif args.lr_trial:
        jobs = [("diffusers", {"spec": spec, "run_dir": OUT / "runs" / f"{tag}-diffusers-lr{lr:g}", "lr": lr,
                               "budget": args.budget}) for lr in args.lr_trial]  # fmt: skip
        names = [f"diffusers lr {lr:g}" for lr in args.lr_trial]
    else:
        jobs = [
            ("sculpt", {"spec": spec, "run_dir": OUT / "runs" / f"{tag}-sculpt", "budget": args.budget}),
            ("diffusers", {"spec": spec, "run_dir": OUT / "runs" / f"{tag}-diffusers", "lr": args.diffusers_lr,
                           "budget": args.budget}),
        ]  # fmt: skip
        names = ["sculpt", "diffusers"]
    if not args.main_job:
        began = time.perf_counter()
        trained = train_all(jobs, args.threads, parallel=not args.sequential and not args.lr_trial)
        print(f"  training: {time.perf_counter() - began:.0f} s wall for {len(jobs)} run(s)", flush=True)

    num_samples = args.samples or SAMPLES[name]
    noise = torch.randn((num_samples, channels, res, res), generator=torch.Generator().manual_seed(1234))
    # best[reference index][side name] = (FD, Result): diffusers keeps the better of its samplers, per reference.
    best: list[dict[str, tuple[float, Result]]] = [{} for _ in references]
    for label, (trainer, kwargs), info in zip(names, jobs, trained, strict=True):
        run_dir = Path(kwargs["run_dir"])
        records = read_log(run_dir / "log.jsonl")
        kinds = ["dpmpp_2m"] if trainer == "sculpt" else args.diffusers_samplers
        for kind in kinds:
            params, samples = (
                sample_sculpt(run_dir, noise) if trainer == "sculpt" else sample_diffusers(run_dir, kind, noise)
            )
            result = Result(label, params, window_rate(records), records[-1]["step"], info["loop_s"],
                            info["cpu_share"], samples, kind)  # fmt: skip
            feats = features(samples)
            scores = []
            for index, reference in enumerate(references):
                fd, sd, kid_value, sets = distances(feats, reference)
                scores.append(f"FD {fd:8.2f} +- {sd:.2f} ({sets} x {reference.n}), KID {kid_value:.3g}")
                if label not in best[index] or fd < best[index][label][0]:
                    best[index][label] = (fd, result)
            print(
                f"  {label:>18} {kind:>8}: {millions(params)} params, {result.steps} steps in {result.train_s:.0f} s"
                f" (CPU share {result.cpu_share:.0%}), {result.img_per_s:.0f} img/s\n"
                + "".join(f"{'':>30}vs {r.name}: {text}\n" for r, text in zip(references, scores, strict=True)),
                end="",
                flush=True,
            )
    paths = []
    for key, (_, result) in best[0].items():
        path = OUT / f"{name}-{key.replace(' ', '_')}-{result.label}.png"
        paths.append(save_grid(path, result.samples[:64], nrow=8, scale=max(1, 128 // res)))
    print("  sample grids (first 64, best sampler): " + ", ".join(str(p) for p in paths), flush=True)
    if args.lr_trial:
        return None
    parts = []
    for index, reference in enumerate(references):
        (fd_s, s), (fd_d, d) = best[index]["sculpt"], best[index]["diffusers"]
        ratio = fd_d / fd_s
        verdict = f"{ratio:.2f}x lower" if ratio >= 1 else f"{1 / ratio:.2f}x HIGHER (sculpt loses)"
        parts.append(
            f"vs {reference.name}: sculpt FD {fd_s:.2f}, diffusers FD {fd_d:.2f} ({d.label}), {verdict}; "
            f"real-vs-real floor {floors[index][0]:.2f}"
        )
    s, d = best[0]["sculpt"][1], best[0]["diffusers"][1]
    return (
        f"{name} {res}x{res}, {args.budget:g} s: sculpt {millions(s.params)} params, {s.img_per_s:.0f} img/s; "
        f"diffusers {millions(d.params)} params, {d.img_per_s:.0f} img/s\n    " + "\n    ".join(parts)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=300.0, help="training seconds per model per dataset")
    parser.add_argument("--datasets", default="digits,mnist", help="comma-separated: digits, mnist")
    parser.add_argument("--quick", action="store_true", help="30 s budgets, n = 300, a short classifier fit")
    parser.add_argument("--samples", type=int, default=None, help="samples per model (default digits 3000, mnist 1000)")
    parser.add_argument("--n", type=int, default=None, help="cap on the size n of each reference set")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each training process")
    parser.add_argument("--sequential", action="store_true", help="train the two sides one after the other")
    parser.add_argument("--sample-threads", type=int, default=2, help="torch threads for the untimed parts")
    parser.add_argument(
        "--diffusers-samplers",
        type=lambda s: s.split(","),
        default=["ddim", "dpmpp_2m"],
        help="diffusers schedulers to sample with (ddim, dpmpp_2m); the better one scores",
    )
    parser.add_argument("--classifier-steps", type=int, default=600)
    parser.add_argument(
        "--main-job",
        action="store_true",
        help="sculpt's main job as it is (its steps, no time limit), then diffusers for the seconds it took",
    )
    parser.add_argument("--diffusers-lr", type=float, default=DIFFUSERS_LR)
    parser.add_argument(
        "--lr-trial",
        type=lambda s: [float(v) for v in s.split(",")],
        default=None,
        help="train only diffusers (one after the other) at each of these learning rates and report each",
    )
    args = parser.parse_args()
    if args.quick:
        args.budget, args.samples, args.classifier_steps, args.n = min(args.budget, 30.0), 300, 200, args.n or 300
    names = [name.strip() for name in args.datasets.split(",") if name.strip()]
    unknown = [name for name in names if name not in SPECS]
    if unknown:
        parser.error(f"unknown dataset(s) {unknown}; valid: {', '.join(SPECS)}")
    torch.set_num_threads(args.sample_threads)
    how = (
        "one after the other"
        if args.sequential or args.lr_trial or args.main_job
        else "both sides at once, one process each"
    )
    print(
        f"torch {torch.__version__}; training: {args.threads} torch thread(s) per run (torch.set_num_threads), "
        f"{how}, budgets in wall-clock seconds; untimed parts on {args.sample_threads} thread(s); "
        f"{SAMPLE_STEPS}-step sampling",
        flush=True,
    )
    began = time.perf_counter()
    lines = [line for name in names if (line := benchmark(name, args))]
    print()
    for line in lines:
        print(line)
    print(f"total wall time {(time.perf_counter() - began) / 60:.1f} min")


if __name__ == "__main__":
    main()
