"""The evaluation record: sample from a run, score against its data, save every number with its provenance.

A score without its settings cannot be compared, so ``evaluate_run`` writes, beside every
metric, the sample counts, seeds, sampler, steps and NFE, the checkpoint's hash, the
feature extractor and its weights' hash, the resize method, the reference statistics'
hash and the package versions. ``sweep`` does the same over a grid of samplers and step
counts and draws quality against NFE.
"""

from __future__ import annotations

import itertools
import json
import platform
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .denoiser import DenoiserFn
from .metrics.features import FeatureExtractor, get_extractor, reference_stats, train_classifier
from .metrics.stats import density_coverage, fid_infinity, frechet_distance, inception_score, kid, precision_recall
from .run import load, weights_hash

# generate lived here: still importable from sculpt.evaluate
from .samplers import AUTO, NFE, SAMPLERS, generate, resolve_sampling

__all__ = ["METRICS", "RECOMMENDED_N", "generate", "score", "evaluate_run", "sweep", "default_extractor"]

METRICS = ("fid", "kid", "is", "pr", "fid_inf", "bpd")
#: Below these sample counts a metric is too noisy or biased to compare (a warning says so).
RECOMMENDED_N = {"fid": 10_000, "kid": 1_000, "is": 5_000, "pr": 5_000, "fid_inf": 5_000, "bpd": 1_000}


def versions() -> dict[str, str]:
    from . import __version__

    return {
        "sculpt": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def parse_metrics(text: str | Sequence[str]) -> list[str]:
    names = [m.strip() for m in (text.split(",") if isinstance(text, str) else text) if m.strip()]
    unknown = [m for m in names if m not in METRICS]
    if unknown or not names:
        raise ValueError(f"unknown metric(s) {', '.join(unknown) or '(none given)'}; valid: {', '.join(METRICS)}")
    return names


def sample_count_warnings(metrics: Iterable[str], n: int) -> list[str]:
    """Warn (and return the messages, for the record) where n is below a metric's recommended count."""
    messages = [
        f"{name} with n={n} is below the recommended {RECOMMENDED_N[name]}: biased and noisy; compare only at equal n"
        for name in metrics
        if n < RECOMMENDED_N.get(name, 0)
    ]
    for message in messages:
        warnings.warn(message, stacklevel=3)
    return messages


def score(
    metrics: Iterable[str],
    extractor: FeatureExtractor,
    fake_images: Tensor,
    *,
    real_features: np.ndarray,
    progress: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """Image-set metrics of ``fake_images`` against reference features (fid, kid, is, pr, fid_inf)."""
    metrics = list(metrics)
    want_probs = "is" in metrics
    if want_probs and not extractor.num_classes:
        raise ValueError(f"metric 'is' needs class probabilities; extractor {extractor.name!r} has none")
    fake, probs = extractor.extract(fake_images, progress=progress, probs=want_probs)
    scores: dict[str, Any] = {}
    for name in metrics:
        if name == "fid":
            scores["fid"] = frechet_distance(real_features, fake)
        elif name == "kid":
            size = min(1000, len(fake), len(real_features))
            mean, std = kid(real_features, fake, subset_size=size, seed=seed)
            scores["kid"] = {"mean": mean, "std": std, "subset_size": size}
        elif name == "is":
            mean, std = inception_score(probs, splits=min(10, len(fake_images)))
            scores["is"] = {"mean": mean, "std": std}
        elif name == "pr":
            precision, recall = precision_recall(real_features, fake, k=3)
            density, coverage = density_coverage(real_features, fake, k=5)
            scores["pr"] = {"precision": precision, "recall": recall, "density": density, "coverage": coverage}
        elif name == "fid_inf":
            fit = fid_infinity(real_features, fake, seed=seed)
            scores["fid_inf"] = {
                "fid_inf": fit.fid_inf,
                "slope": fit.slope,
                "r2": fit.r2,
                "ns": list(fit.ns),
                "fids": list(fit.fids),
            }
    return scores


def default_extractor(run_dir: Path, dataset: Any, spec: str, *, progress: bool = True) -> FeatureExtractor:
    """The run's own domain classifier (trained once on its labelled data, saved in RUN/features)."""
    folder = run_dir / "features" / "classifier"
    if (folder / "classifier.safetensors").is_file():
        return get_extractor(f"classifier:{folder}")
    if dataset.num_classes < 2:
        raise ValueError(
            "this run's data has no labels to fit a domain classifier on; pass "
            "--features inception:PATH (the FID Inception weights) or --features classifier:DIR"
        )
    from .data import load_dataset

    print(f"fitting a domain classifier on {dataset.name} (once; saved in {folder}) ...", flush=True)
    try:
        test = load_dataset(spec, resolution=dataset.images.shape[-1], channels=dataset.images.shape[1], split="test")
    except (ValueError, FileNotFoundError):
        test = None  # folders have no test split: no held-out accuracy to report
    extractor, accuracy = train_classifier(dataset, test_dataset=test, progress=progress)
    extractor.save(folder)
    if accuracy is not None:
        print(f"classifier held-out accuracy: {accuracy:.4f}", flush=True)
    return extractor


@dataclass
class RunContext:
    run_dir: Path
    denoiser: DenoiserFn
    config: Any
    dataset: Any
    extractor: FeatureExtractor
    reference: Any
    checkpoint_hash: str


def prepare(
    run_dir: str | Path, *, features: str | None, split: str = "train", device: str = "cpu", progress: bool = True
) -> RunContext:
    from .data import load_dataset

    run_dir = Path(run_dir)
    denoiser, config = load(run_dir, device=device)
    dataset = load_dataset(
        config.data.name, resolution=config.data.resolution, channels=config.data.channels, split=split
    )
    if features:
        extractor = get_extractor(features, device=device)
    else:
        extractor = default_extractor(run_dir, dataset, config.data.name, progress=progress)
    reference = reference_stats(
        extractor,
        dataset.images,
        dataset=config.data.name,
        split=split,
        cache_dir=run_dir / "features" / "reference",
        progress=progress,
    )
    checkpoint_hash = weights_hash(run_dir / "ema.safetensors")
    return RunContext(run_dir, denoiser, config, dataset, extractor, reference, checkpoint_hash)


def _record(
    ctx: RunContext,
    *,
    n: int,
    seed: int,
    sampler: str,
    steps: int,
    metrics: list[str],
    split: str,
    scores: dict,
    seconds: float,
    precision: str = "fp32",
    spacing: str,
    chosen_by_default: list[str] | None = None,
) -> dict[str, Any]:
    config = ctx.config
    return {
        "scores": scores,
        "n_fake": n,
        "n_real": int(ctx.reference.feats.shape[0]),
        "seed": seed,
        "sampler": sampler,
        "steps": steps,
        "spacing": spacing,
        "chosen_by_default": chosen_by_default or [],  # which of sampler / spacing the step-count rule picked
        "nfe": NFE[sampler](steps),
        "precision": precision,
        "guidance": None,
        "task": config.task,
        "teacher": config.distill.teacher or None,
        "teacher_sha256": config.distill.teacher_sha256 or None,
        "student_steps": config.train.sample_steps if config.task != "denoising" else None,
        "run": str(ctx.run_dir),
        "checkpoint": "ema.safetensors",
        "checkpoint_sha256": ctx.checkpoint_hash,
        "dataset": ctx.config.data.name,
        "reference_split": split,
        "reference_key": ctx.reference.key,
        "extractor": ctx.extractor.name,
        "extractor_weights_sha256": ctx.extractor.weights_hash,
        "resize": ctx.extractor.resize,
        "metrics": metrics,
        "warnings": sample_count_warnings(metrics, n),
        "seconds": round(seconds, 2),
        "versions": versions(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def evaluate_run(
    ctx: RunContext,
    *,
    metrics: list[str],
    n: int,
    sampler: str,
    steps: int,
    spacing: str | None = None,
    seed: int = 0,
    split: str = "train",
    batch_size: int = 256,
    progress: bool = True,
    bpd_n: int = 256,
    device: str = "cpu",
    precision: str = "fp32",
) -> dict[str, Any]:
    """Sample n images from the run's EMA model and score them; returns the full record.

    ``precision`` bf16 / fp16 samples under autocast (recorded; the scores stay float64).
    """
    chosen_by_default = [name for name, value in (("sampler", sampler), ("spacing", spacing)) if value in (None, AUTO)]
    sampler, spacing = resolve_sampling(sampler, steps, ctx.denoiser.schedule, spacing)  # record what really runs
    started = time.perf_counter()
    image_metrics = [m for m in metrics if m != "bpd"]
    shape = (ctx.config.data.channels, ctx.config.data.resolution, ctx.config.data.resolution)
    scores: dict[str, Any] = {}
    if image_metrics:
        fake = generate(
            ctx.denoiser,
            shape,
            n,
            sampler=sampler,
            steps=steps,
            spacing=spacing,
            seed=seed,
            batch_size=batch_size,
            num_classes=ctx.config.model.num_classes,
            progress=progress,
            device=device,
            precision=precision,
        )
        scores.update(
            score(image_metrics, ctx.extractor, fake, real_features=ctx.reference.feats, progress=progress, seed=seed)
        )
    if "bpd" in metrics:
        scores["bpd"] = bits_per_dim(ctx, n=bpd_n, seed=seed, device=device)
    return _record(
        ctx,
        n=n,
        seed=seed,
        sampler=sampler,
        steps=steps,
        metrics=metrics,
        split=split,
        scores=scores,
        seconds=time.perf_counter() - started,
        precision=precision,
        spacing=spacing,
        chosen_by_default=chosen_by_default,
    )


def bits_per_dim(ctx: RunContext, *, n: int, seed: int, device: str = "cpu") -> dict[str, Any]:
    """Bits/dim of held-out data (test split, else train) by the probability-flow ODE."""
    from .data import load_dataset
    from .metrics.likelihood import bpd_ode

    try:
        data = load_dataset(
            ctx.config.data.name, resolution=ctx.config.data.resolution, channels=ctx.config.data.channels, split="test"
        )
        split = "test"
    except (ValueError, FileNotFoundError):
        data, split = ctx.dataset, "train"
    images = data.images[:n].to(device)
    schedule = ctx.denoiser.schedule
    sigma_max = min(schedule.sigma_max, 200.0)
    result = bpd_ode(
        ctx.denoiser,
        images,
        sigma_min=max(schedule.sigma_min, 1e-3),
        sigma_max=sigma_max,
        solver="rk4",
        steps=48,
        probes=1,
        generator=torch.Generator().manual_seed(seed),
    )
    return {
        "bpd": result.bpd,
        "stderr": result.bpd_stderr,
        "n": len(images),
        "split": split,
        "nfe": result.nfe,
        "method": "probability-flow ODE, rk4 48 steps in log sigma, 1 Rademacher probe, uniform dequantisation",
        "sigma_min": max(schedule.sigma_min, 1e-3),
        "sigma_max": sigma_max,
    }


def parse_sweep(items: Sequence[str]) -> dict[str, list]:
    """["steps=5,10,20", "sampler=ddim,heun"] -> {"steps": [5, 10, 20], "sampler": ["ddim", "heun"]}."""
    grid: dict[str, list] = {}
    for item in items:
        key, eq, values = item.partition("=")
        if not eq or key not in ("steps", "sampler") or not values:
            raise ValueError(f"--sweep {item!r}: expected steps=A,B,... or sampler=NAME,NAME,...")
        parts = [v.strip() for v in values.split(",") if v.strip()]
        if key == "steps":
            try:
                grid[key] = [int(v) for v in parts]
            except ValueError:
                raise ValueError(f"--sweep {item!r}: steps must be integers") from None
        else:
            unknown = [v for v in parts if v != AUTO and v not in SAMPLERS]
            if unknown:
                raise ValueError(
                    f"--sweep: unknown sampler(s) {', '.join(unknown)}; valid: {AUTO}, {', '.join(SAMPLERS)}"
                )
            grid[key] = parts
    return grid


def sweep(
    ctx: RunContext,
    *,
    grid: dict[str, list],
    metrics: list[str],
    n: int,
    seed: int = 0,
    sampler: str = AUTO,
    steps: int = 20,
    spacing: str | None = None,
    split: str = "train",
    progress: bool = True,
    plot: str | Path | None = None,
    device: str = "cpu",
    precision: str = "fp32",
) -> list[dict[str, Any]]:
    """Quality against NFE: one evaluation per (sampler, steps) of the grid, a table and a PNG plot."""
    samplers = grid.get("sampler", [sampler])
    step_counts = grid.get("steps", [steps])
    rows = []
    for name, count in itertools.product(samplers, step_counts):
        record = evaluate_run(
            ctx,
            metrics=metrics,
            n=n,
            sampler=name,
            steps=count,
            spacing=spacing,
            seed=seed,
            split=split,
            progress=progress,
            device=device,
            precision=precision,
        )
        record["sampler_requested"] = name  # the sweep's axis: "auto" stays one line across step counts
        rows.append(record)
        label = name if name == record["sampler"] else f"{name} ({record['sampler']} {record['spacing']})"
        print(
            f"{label:<16s} steps {count:>4d}  NFE {record['nfe']:>4d}  "
            + "  ".join(f"{k} {_headline(v):.4f}" for k, v in record["scores"].items()),
            flush=True,
        )
    if plot:
        plot_sweep(plot, rows)
    return rows


def _headline(value: Any) -> float:
    """One number per metric for tables: the value, or its mean / main field."""
    if isinstance(value, dict):
        for key in ("mean", "fid_inf", "precision", "bpd"):
            if key in value:
                return float(value[key])
    return float(value)


def plot_sweep(path: str | Path, rows: list[dict[str, Any]]) -> Path:
    from .plots import _pyplot, save_figure

    plt = _pyplot()
    metric = next(m for m in ("fid", "kid", "fid_inf", "is") if m in rows[0]["scores"])
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name in dict.fromkeys(r.get("sampler_requested", r["sampler"]) for r in rows):
        mine = sorted((r for r in rows if r.get("sampler_requested", r["sampler"]) == name), key=lambda r: r["nfe"])
        ax.plot([r["nfe"] for r in mine], [_headline(r["scores"][metric]) for r in mine], "o-", label=name)
    ax.set(
        xlabel="NFE (denoiser calls per sample)",
        ylabel=metric.upper(),
        xscale="log",
        title=f"{metric.upper()} against NFE (n={rows[0]['n_fake']}, {rows[0]['extractor']} features)",
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return save_figure(fig, path)


def evaluate_sets(
    real: str,
    fake: str,
    *,
    metrics: list[str],
    features: str,
    progress: bool = True,
    seed: int = 0,
    device: str = "cpu",
) -> dict[str, Any]:
    """Score any two image sets: a dataset spec or folder for the real side, a folder or .npz for the fake."""
    from .data import load_dataset
    from .images import load_images

    if "bpd" in metrics:
        raise ValueError(
            "bpd needs a model; with --real/--fake only image-set metrics apply (fid, kid, is, pr, fid_inf)"
        )
    extractor = get_extractor(features, device=device)
    real_path = Path(real)
    real_images = load_images(real_path) if real_path.suffix == ".npz" else load_dataset(real).images
    fake_images = load_images(Path(fake))
    started = time.perf_counter()
    real_features = extractor.features(real_images, progress=progress)
    scores = score(metrics, extractor, fake_images, real_features=real_features, progress=progress, seed=seed)
    return {
        "scores": scores,
        "n_real": len(real_images),
        "n_fake": len(fake_images),
        "real": real,
        "fake": fake,
        "seed": seed,
        "extractor": extractor.name,
        "extractor_weights_sha256": extractor.weights_hash,
        "resize": extractor.resize,
        "metrics": metrics,
        "warnings": sample_count_warnings(metrics, len(fake_images)),
        "seconds": round(time.perf_counter() - started, 2),
        "versions": versions(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_record(path: str | Path, record: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=float) + "\n")
    return path
