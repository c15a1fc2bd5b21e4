"""The analytic first step, variant by variant, on a trained run: FD at few NFE from the same noise.

For a run folder it measures the training data's moments again (with the covariance), then
samples with sculpt's default solver (unipc) at each NFE:

- **covariance** (today's default): the Gaussian's flow along the covariance's principal
  directions, the network first called at ``analytic_grid``'s level;
- **variances** (stop 22): the flow with the per-pixel variances only, first call at sigma = 10;
- **none**: no analytic step (``first_step="model"``);
- **first call at s**: the covariance's flow down to a fixed level s, then the default spacing
  from there (``--levels``), to see where the Gaussian stops paying.

Every row starts from the same noise and is scored by the Frechet distance in a domain
classifier's features (``sculpt.metrics.features.train_classifier``) against half of the
training images; the floor is the other half. One line per NFE, then one ratio line per NFE
(variances / covariance).

    python benchmarks/analytic_step.py benchmarks/out/models/digits --n 1500
    python benchmarks/analytic_step.py RUN --nfes 3,5,10 --levels 10,4.5,3
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from sculpt.data import load_dataset
from sculpt.metrics import frechet_distance
from sculpt.metrics.features import train_classifier
from sculpt.moments import measure_moments
from sculpt.run import load
from sculpt.samplers import sample
from sculpt.schedules import cosine_uniform


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a run folder (sculpt train --out RUN)")
    parser.add_argument("--n", type=int, default=1000, help="samples per row")
    parser.add_argument("--nfes", default="3,4,5,6,8,10")
    parser.add_argument("--levels", default="10,6,4.5,3,2", help="fixed first-call levels to sweep ('' for none)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    D, config = load(args.run)
    if config.model.class_cond:
        raise SystemExit("this benchmark draws unconditionally; pass an unconditional run")
    train_set = load_dataset(config.data.name)
    began = time.perf_counter()
    covariance = measure_moments(train_set, hflip=config.data.hflip)
    if covariance.basis is None:
        raise SystemExit(f"{config.data.name} has more coordinates than a covariance is measured for")
    seconds = time.perf_counter() - began
    variances = dataclasses.replace(covariance, basis=None, eigs=None, residual=0.0)
    extractor, accuracy = train_classifier(
        train_set, test_dataset=load_dataset(config.data.name, split="test"), progress=False
    )
    shuffled = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(0))
    half = len(train_set) // 2
    reference = extractor.features(train_set.images(shuffled[:half]), progress=False)
    other = train_set.images(shuffled[half : half + min(args.n, half)])
    floor = frechet_distance(extractor.features(other, progress=False), reference)
    print(
        f"{args.run}: {config.data.name}, trained {config.train.steps} steps; moments {seconds:.1f} s, "
        f"gaussian_until {covariance.gaussian_until:.3g}; classifier accuracy {accuracy:.3f}; "
        f"FD of n = {args.n} against {half} training images, floor {floor:.2f}",
        flush=True,
    )
    shape = (config.data.channels, config.data.resolution, config.data.resolution)
    noise = torch.randn(args.n, *shape, generator=torch.Generator().manual_seed(3))
    sigma_max = torch.tensor([D.schedule.sigma_max], dtype=torch.float64)

    def fd(**options) -> float:
        x = torch.cat([sample(D, tuple(c.shape), noise=c, **options) for c in noise.split(500)])
        return frechet_distance(extractor.features(x.float().clamp(-1, 1), progress=False), reference)

    ratios = []
    for nfe in [int(v) for v in args.nfes.split(",")]:
        began = time.perf_counter()
        row = {}
        D.data_moments = covariance
        row["covariance"] = fd(steps=nfe)
        D.data_moments = variances
        row["variances"] = fd(steps=nfe)
        row["none"] = fd(steps=nfe, first_step="model")
        D.data_moments = covariance
        for level in [float(v) for v in args.levels.split(",") if v]:
            sigmas = torch.cat([sigma_max, cosine_uniform(D.schedule, nfe, top=level)])
            row[f"first call at {level:g}"] = fd(sigmas=sigmas, first_step="analytic", sampler="unipc")
        cells = ", ".join(f"{name} {value:.3g}" for name, value in row.items())
        print(f"NFE {nfe}: {cells} ({time.perf_counter() - began:.0f} s)", flush=True)
        ratios.append(
            f"NFE {nfe}: covariance {row['covariance']:.3g}, variances (stop 22) {row['variances']:.3g}, "
            f"{row['variances'] / row['covariance']:.2f}x"
        )
    print("\n" + "\n".join(ratios))


if __name__ == "__main__":
    main()
