"""The main job, recipe by recipe: wall-clock seconds of ``sculpt train`` and the FD of its samples.

Each recipe is a list of ``sculpt train`` flags. The script runs ``sculpt train --out DIR FLAGS``
as a user does (a fresh process: start-up, data, training, the final grid; all cores), times it
whole, then samples 12,000 images from the run with its own defaults (``sculpt.sample`` with the
run's sampler and steps, EMA weights) and scores them in the 128-d features of a small domain
classifier (``sculpt.metrics.features.train_classifier``, fitted once on the training split; its
accuracy on the test split is printed):

- **train**: FD against half A of a fixed shuffle of the 1500 training images (n = 750), mean and
  sd over 16 sets of 750 samples; the floor is half B against half A, the score of a perfect model.
- **held-out**: FD against the 297 test images (40 sets of 297 samples); the floor is sets of 297
  training images, which sit as far from the test split as a perfect model would.

    python benchmarks/main_job.py                                   # the old main job against today's
    python benchmarks/main_job.py --recipe="--steps 1500" --recipe="--steps 1500 --train.lr=3e-3"
    python benchmarks/main_job.py --repeat 3                        # each recipe 3 times (medians of the wall)

Outputs (runs, grids) go to benchmarks/out/main_job/.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from sculpt.data import load_dataset
from sculpt.images import save_grid
from sculpt.metrics import frechet_distance
from sculpt.metrics.features import train_classifier
from sculpt.run import load
from sculpt.samplers import sample

OUT = Path(__file__).resolve().parent / "out" / "main_job"
SAMPLES = 12000
#: The recipes compared by default: the main job before issue 16 (3000 steps at a constant rate of 2e-3, float32,
#: torch's Adam betas, noise levels uniform in t), and today's.
OLD_JOB = (
    "--steps 3000 --train.lr_decay=none --train.precision=fp32 --train.lr=2e-3 --train.adam_beta2=0.999 "
    "--diffusion.sigma_draw=schedule"
)
RECIPES = [OLD_JOB, ""]


def cpu_line() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
        info = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in text.splitlines() if ":" in line)}
        flags = set(info.get("flags", "").split())
        ext = " ".join(f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f in flags)
        return f"{info['model name']} ({ext}), {os.cpu_count()} cores"
    except (OSError, KeyError):
        return f"{os.cpu_count()} cores"


class Scorer:
    """The classifier features and the two references, made once."""

    def __init__(self, classifier_steps: int) -> None:
        train_set, test_set = load_dataset("digits"), load_dataset("digits", split="test")
        self.extractor, accuracy = train_classifier(
            train_set, test_dataset=test_set, steps=classifier_steps, progress=False
        )
        shuffled = train_set.images()[torch.randperm(len(train_set), generator=torch.Generator().manual_seed(0))]
        half = len(shuffled) // 2
        self.train_ref, train_floor = self.features(shuffled[:half]), self.features(shuffled[half : 2 * half])
        self.test_ref = self.features(test_set.images())
        n = len(self.test_ref)
        held_floor = self.features(shuffled[: (len(shuffled) // n) * n])
        self.floors = (self._fd(train_floor, self.train_ref)[0], self._fd(held_floor, self.test_ref)[0])
        print(
            f"classifier test accuracy {accuracy:.4f}; floors: train FD {self.floors[0]:.2f} (n = {half}), "
            f"held-out FD {self.floors[1]:.2f} (n = {n})",
            flush=True,
        )

    def features(self, images: torch.Tensor) -> np.ndarray:
        return self.extractor.features(images, batch_size=256, progress=False)

    @staticmethod
    def _fd(feats: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
        n = len(reference)
        fds = [frechet_distance(feats[i : i + n], reference) for i in range(0, len(feats) - n + 1, n)]
        return float(np.mean(fds)), float(np.std(fds))

    def __call__(self, samples: torch.Tensor) -> tuple[tuple[float, float], tuple[float, float]]:
        feats = self.features(samples)
        return self._fd(feats, self.train_ref), self._fd(feats, self.test_ref)


def run_recipe(flags: str, out: Path) -> float:
    """`sculpt train --out OUT FLAGS` in a fresh process; returns its wall-clock seconds."""
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "sculpt", "train", "--out", str(out), *shlex.split(flags)]
    began = time.perf_counter()
    done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - began
    if done.returncode:
        raise SystemExit(f"{shlex.join(command)} failed:\n{done.stderr[-3000:]}")
    return seconds


def draw(run: Path, samples: int) -> torch.Tensor:
    """`samples` images from the run's EMA weights with its own sampler defaults (the shape its config resolved)."""
    denoiser, config = load(run)
    shape = (config.data.channels, config.data.resolution, config.data.resolution)
    noise = torch.randn((samples, *shape), generator=torch.Generator().manual_seed(1234))
    steps = config.train.sample_steps
    chunks = [sample(denoiser, tuple(c.shape), steps=steps, noise=c) for c in noise.split(1000)]
    return torch.cat(chunks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", action="append", help="sculpt train flags (repeatable); default: RECIPES")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each recipe (the wall is their median)")
    parser.add_argument("--classifier-steps", type=int, default=600)
    parser.add_argument("--samples", type=int, default=SAMPLES, help="samples per run (sets of 750 / 297)")
    parser.add_argument("--score", action="append", default=[], help="only score this existing run folder")
    args = parser.parse_args()
    recipes = args.recipe if args.recipe is not None else RECIPES
    print(f"machine: {cpu_line()}, torch {torch.__version__}; wall = the whole `sculpt train` process", flush=True)
    scorer = Scorer(args.classifier_steps)
    for folder in args.score:
        (train_fd, train_sd), (held_fd, held_sd) = scorer(draw(Path(folder), args.samples))
        print(f"  {folder}: FD train {train_fd:.2f} +- {train_sd:.2f}, held-out {held_fd:.2f} +- {held_sd:.2f}")
    if args.score:
        return
    lines = []
    for index, flags in enumerate(recipes):
        walls, scores = [], []
        for repeat in range(args.repeat):
            run = OUT / f"recipe{index}-{repeat}"
            walls.append(run_recipe(flags, run))
            samples = draw(run, args.samples)
            scores.append(scorer(samples))
            if repeat == 0:
                save_grid(OUT / f"recipe{index}.png", samples[:64], nrow=8, scale=8)
            (train_fd, train_sd), (held_fd, held_sd) = scores[-1]
            print(
                f"  [{flags or 'default'}] run {repeat + 1}: {walls[-1]:.0f} s, FD train {train_fd:.2f} +- "
                f"{train_sd:.2f}, held-out {held_fd:.2f} +- {held_sd:.2f}",
                flush=True,
            )
        train_fd = statistics.mean(s[0][0] for s in scores)
        held_fd = statistics.mean(s[1][0] for s in scores)
        lines.append(
            f"main job [{flags or 'default'}]: {statistics.median(walls):.0f} s (range {min(walls):.0f}-"
            f"{max(walls):.0f}), FD train {train_fd:.2f} (floor {scorer.floors[0]:.2f}), held-out {held_fd:.2f} "
            f"(floor {scorer.floors[1]:.2f})"
        )
    print()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
