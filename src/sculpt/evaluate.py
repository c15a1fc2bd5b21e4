"""The evaluation record: sample from a run, score against its data, save every number with its provenance.

A score without its settings cannot be compared, so ``evaluate_run`` writes, beside every
metric, the sample counts, seeds, sampler, steps and NFE, the checkpoint's hash, the
feature extractor and its weights' hash, the resize method, the reference statistics'
hash and the package versions. ``sweep`` does the same over a grid of samplers, step
counts and guidance weights and draws quality against NFE (or against the weight).
A guided evaluation records its guidance (kind, weight, interval, rescale, guide and its
hash) and what it cost in network evaluations per sample; a class-conditional run is
also scored on ``class_accuracy``, the domain classifier's agreement with the requested
labels, where the classifier knows the run's classes.
"""

from __future__ import annotations

import itertools
import json
import platform
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .denoiser import DenoiserFn
from .guidance import CountEvaluations, GuidanceOptions, guided_run
from .metrics.features import FeatureExtractor, get_extractor, reference_stats, train_classifier
from .metrics.stats import density_coverage, fid_infinity, frechet_distance, inception_score, kid, precision_recall
from .run import load, run_folder, weights_file, weights_hash
from .runtime import resolve_precision

# generate lived here: still importable from sculpt.evaluate
from .samplers import AUTO, NFE, SAMPLERS, first_step_of, generate, resolve_sampling

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
    labels: Tensor | np.ndarray | None = None,
) -> dict[str, Any]:
    """Image-set metrics of ``fake_images`` against reference features (fid, kid, is, pr, fid_inf).

    With ``labels`` (the class each image was asked for) the extractor's classifier also
    scores ``class_accuracy``: the share of images whose most probable class is the one asked for.
    """
    metrics = list(metrics)
    want_probs = "is" in metrics or labels is not None
    if want_probs and not extractor.num_classes:
        raise ValueError(f"metric 'is' needs class probabilities; extractor {extractor.name!r} has none")
    fake, probs = extractor.extract(fake_images, progress=progress, probs=want_probs)
    scores: dict[str, Any] = {}
    if labels is not None:
        scores["class_accuracy"] = float((probs.argmax(axis=1) == np.asarray(labels)).mean())
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
        test = load_dataset(spec, resolution=dataset.shape[-1], channels=dataset.shape[0], split="test")
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
    checkpoint: str = "ema.safetensors"  #: the weights file sampled (a diffusers model's own)


def prepare(
    run_dir: str | Path,
    *,
    features: str | None,
    split: str = "train",
    device: str = "cpu",
    progress: bool = True,
    data: str | None = None,
) -> RunContext:
    """Load a run (or ``diffusers:PATH``), its reference data and features for scoring.

    ``data`` names the reference dataset where the run's own is not wanted or not known
    (a diffusers model does not say what it was trained on).
    """
    from dataclasses import replace

    from .data import load_dataset

    spec = run_dir
    run_dir = run_folder(spec)
    denoiser, config = load(spec, device=device)
    if data:
        config = replace(config, data=replace(config.data, name=data))
    if not config.data.name:
        raise ValueError(f"{spec} does not say what data it was trained on: give the reference dataset with --data")
    dataset = load_dataset(
        config.data.name, resolution=config.data.resolution, channels=config.data.channels, split=split
    )
    if features:
        extractor = get_extractor(features, device=device)
    else:
        extractor = default_extractor(run_dir, dataset, config.data.name, progress=progress)
    reference = reference_stats(
        extractor,
        dataset.images(),
        dataset=config.data.name,
        split=split,
        cache_dir=run_dir / "features" / "reference",
        progress=progress,
    )
    checkpoint = weights_file(spec)
    digest = weights_hash(checkpoint)
    return RunContext(run_dir, denoiser, config, dataset, extractor, reference, digest, checkpoint.name)


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
    sigmas: Tensor | None = None,
    grid_source: str | None = None,
    guidance: dict[str, Any] | None = None,
    chosen_by_default: list[str] | None = None,
    first_step: str = "model",
) -> dict[str, Any]:
    config = ctx.config
    image_metrics = [m for m in metrics if m != "bpd"]
    bpd_n = scores["bpd"]["n"] if "bpd" in scores else None
    # Each metric is warned about at the count it was computed on: bpd scores its own held-out images.
    count_warnings = sample_count_warnings(image_metrics, n) + (
        sample_count_warnings(["bpd"], bpd_n) if bpd_n is not None else []
    )
    if sigmas is not None:
        spacing = "tuned" if grid_source else "explicit"
    return {
        "scores": scores,
        "n_fake": n if image_metrics else None,
        "n_bpd": bpd_n,
        "n_real": int(ctx.reference.feats.shape[0]),
        "seed": seed,
        "sampler": sampler,
        "steps": steps,
        "spacing": spacing,
        "chosen_by_default": chosen_by_default or [],  # which of sampler / spacing the default rule picked
        "sigmas": [float(v) for v in sigmas] if sigmas is not None else None,
        "tuned_grid": grid_source,  # the grids.json the sigmas came from, tuned for checkpoint_sha256
        "nfe": NFE[sampler](steps),
        "first_step": first_step,  # analytic: the first step was the data moments' Gaussian flow (steps + 1)
        "precision": precision,
        "guidance": guidance,
        "task": config.task,
        "teacher": config.distill.teacher or None,
        "teacher_sha256": config.distill.teacher_sha256 or None,
        "student_steps": config.train.sample_steps if config.task != "denoising" else None,
        "autoencoder": config.latent.autoencoder or None,  # a latent run's samples are decoded by it
        "autoencoder_sha256": config.latent.sha256 or None,
        "run": str(ctx.run_dir),
        "checkpoint": ctx.checkpoint,
        "checkpoint_sha256": ctx.checkpoint_hash,
        "dataset": ctx.config.data.name,
        "reference_split": split,
        "reference_key": ctx.reference.key,
        "extractor": ctx.extractor.name,
        "extractor_weights_sha256": ctx.extractor.weights_hash,
        "resize": ctx.extractor.resize,
        "normalisation": ctx.extractor.normalisation,
        "metrics": metrics,
        "warnings": count_warnings,
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
    sigmas: Tensor | None = None,
    grid_source: str | None = None,
    seed: int = 0,
    split: str = "train",
    batch_size: int = 256,
    progress: bool = True,
    bpd_n: int = 256,
    device: str = "cpu",
    precision: str = "fp32",
    guidance: GuidanceOptions | None = None,
    first_step: str = AUTO,
) -> dict[str, Any]:
    """Sample n images from the run's EMA model and score them; returns the full record.

    ``precision`` bf16 / fp16 samples under autocast (recorded; the scores stay float64).
    ``sigmas`` is an explicit grid of ``steps`` steps (a tuned one: ``grid_source`` names
    its grids.json); both go into the record.
    ``guidance`` samples through ``sculpt.guidance.Guided`` (the bits/dim stay the model's own).
    """
    chosen_by_default = [name for name, value in (("sampler", sampler), ("spacing", spacing)) if value in (None, AUTO)]
    precision = resolve_precision(precision, device)  # record what really runs
    sampler, spacing = resolve_sampling(sampler, steps, ctx.denoiser.schedule, spacing)  # record what really runs
    if "bpd" in metrics:
        _refuse_latent_bpd(ctx)  # before minutes of sampling
    started = time.perf_counter()
    image_metrics = [m for m in metrics if m != "bpd"]
    shape = (ctx.config.data.channels, ctx.config.data.resolution, ctx.config.data.resolution)
    scores: dict[str, Any] = {}
    codec = getattr(ctx.denoiser, "codec", None)  # a latent run: count and guide in latent space, decode outside
    counted = CountEvaluations(ctx.denoiser.denoiser if codec is not None else ctx.denoiser)
    denoiser, guidance_record = guided_run(counted, ctx.config, guidance, run_dir=ctx.run_dir, device=device)
    if guidance_record is not None and denoiser.guide is not None:
        denoiser.guide = guide_counted = CountEvaluations(denoiser.guide)
    if codec is not None:
        from .latent import LatentDenoiser

        denoiser = LatentDenoiser(denoiser, codec)
    num_classes = ctx.config.model.num_classes
    labels = torch.arange(n) % num_classes if num_classes else None  # exact class balance, as generate draws
    first_step = first_step_of(
        denoiser, sampler, steps, spacing, sigmas=sigmas, first_step=first_step, conditional=bool(num_classes)
    )
    if image_metrics:
        fake = generate(
            denoiser,
            shape,
            n,
            sampler=sampler,
            steps=steps,
            spacing=spacing,
            sigmas=sigmas,
            seed=seed,
            batch_size=batch_size,
            num_classes=ctx.config.model.num_classes,
            progress=progress,
            device=device,
            precision=precision,
            first_step=first_step,
        )
        knows_classes = labels is not None and _classifier_classes(ctx.extractor) == list(ctx.dataset.class_names)
        scores.update(
            score(
                image_metrics,
                ctx.extractor,
                fake,
                real_features=ctx.reference.feats,
                progress=progress,
                seed=seed,
                labels=labels if knows_classes else None,
            )
        )
        if guidance_record is not None:
            guidance_record["network_evaluations_per_sample"] = counted.rows / n
            if guidance_record["guide"]:
                guidance_record["guide_evaluations_per_sample"] = guide_counted.rows / n
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
        sigmas=sigmas,
        grid_source=grid_source,
        guidance=guidance_record,
        chosen_by_default=chosen_by_default,
        first_step=first_step,
    )


def _classifier_classes(extractor: FeatureExtractor) -> list[str] | None:
    """The class names a domain classifier was fitted on (None for extractors without them)."""
    names = getattr(extractor, "config", {}).get("class_names") if hasattr(extractor, "config") else None
    return list(names) if names is not None else None


def _refuse_latent_bpd(ctx: RunContext) -> None:
    if ctx.config.latent.autoencoder:
        raise ValueError(
            "bpd of a latent run would measure its latents, not pixels (the decoder has no density); "
            "score it with fid, kid, is or pr"
        )


def bits_per_dim(ctx: RunContext, *, n: int, seed: int, device: str = "cpu", pilot_n: int = 32) -> dict[str, Any]:
    """Bits/dim of n held-out images (test split, else train) by the probability-flow ODE.

    A class-conditional run is scored on each image's own label (``class_labels``), not the
    null label. The ODE starts at the tightest of a few noise levels around Δ / sqrt(12)
    (`sculpt.metrics.likelihood.choose_sigma_min`, none below the schedule's sigma_min),
    chosen on ``pilot_n`` (at most n) other images where the data has them; the record says which
    level, what each candidate gave on the pilot, and how many images were scored.
    """
    from .data import load_dataset
    from .metrics.likelihood import SIGMA_MIN_FACTORS, bpd_ode, choose_sigma_min, point_mass_sigma

    _refuse_latent_bpd(ctx)
    try:
        data = load_dataset(
            ctx.config.data.name, resolution=ctx.config.data.resolution, channels=ctx.config.data.channels, split="test"
        )
        split = "test"
    except (ValueError, FileNotFoundError):
        data, split = ctx.dataset, "train"
    count = min(n, len(data))
    pilot_n = min(pilot_n, count)
    conditional = bool(ctx.config.model.num_classes)

    def cond_for(index: slice) -> dict[str, Tensor] | None:
        return {"class_labels": data.labels[index].to(device)} if conditional else None

    schedule = ctx.denoiser.schedule
    sigma_max = min(schedule.sigma_max, 200.0)  # finite for zero-terminal-SNR schedules too
    options = {"solver": "rk4", "steps": 48, "probes": 1}
    candidates = sorted({max(f * point_mass_sigma(), schedule.sigma_min) for f in SIGMA_MIN_FACTORS})
    choice_record: dict[str, Any] = {"candidates": candidates, "pilot_bpd": None, "pilot_n": 0}
    sigma_min = candidates[0]
    if len(candidates) > 1:
        # The pilot images follow the scored ones; a set too small for both reuses the first images.
        disjoint = len(data) >= count + pilot_n
        pilot = slice(count, count + pilot_n) if disjoint else slice(0, min(pilot_n, len(data)))
        choice = choose_sigma_min(
            ctx.denoiser,
            data.images(pilot).to(device),
            sigma_max=sigma_max,
            candidates=candidates,
            seed=seed + 1,
            cond=cond_for(pilot),
            **options,
        )
        sigma_min = choice.sigma_min
        choice_record = {**choice.as_record(), "pilot_disjoint": disjoint}
    result = bpd_ode(
        ctx.denoiser,
        data.images(slice(0, count)).to(device),
        sigma_min=sigma_min,
        sigma_max=sigma_max,
        generator=torch.Generator().manual_seed(seed),
        cond=cond_for(slice(0, count)),
        **options,
    )
    return {
        "bpd": result.bpd,
        "stderr": result.bpd_stderr,
        "n": count,
        "split": split,
        "labels": "the images' own (class-conditional run)" if conditional else None,
        "nfe": result.nfe,
        "method": "probability-flow ODE, rk4 48 steps in log sigma, 1 Rademacher probe, uniform dequantisation",
        "sigma_min": sigma_min,
        "sigma_min_choice": choice_record,
        "sigma_max": sigma_max,
    }


def parse_sweep(items: Sequence[str]) -> dict[str, list]:
    """["steps=5,10", "sampler=ddim", "guidance=0,2"] -> {"steps": [5, 10], "sampler": ["ddim"], "guidance": [0.0, 2.0]}

    Steps are integers, samplers names of SAMPLERS, guidance weights floats.
    """
    grid: dict[str, list] = {}
    for item in items:
        key, eq, values = item.partition("=")
        if not eq or key not in ("steps", "sampler", "guidance") or not values:
            raise ValueError(f"--sweep {item!r}: expected steps=A,B,..., sampler=NAME,NAME,... or guidance=W1,W2,...")
        parts = [v.strip() for v in values.split(",") if v.strip()]
        if key == "steps":
            try:
                grid[key] = [int(v) for v in parts]
            except ValueError:
                raise ValueError(f"--sweep {item!r}: steps must be integers") from None
        elif key == "guidance":
            try:
                grid[key] = [float(v) for v in parts]
            except ValueError:
                raise ValueError(f"--sweep {item!r}: guidance weights must be numbers, e.g. guidance=0,1,2,4") from None
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
    tuned: dict[tuple[str, int], tuple[Tensor, str | None]] | None = None,
    grid_source: str | None = None,
    split: str = "train",
    progress: bool = True,
    plot: str | Path | None = None,
    device: str = "cpu",
    precision: str = "fp32",
    guidance: GuidanceOptions | None = None,
    first_step: str = AUTO,
) -> list[dict[str, Any]]:
    """Quality against NFE (or the guidance weight): one evaluation per (sampler, steps, weight), a table, a PNG.

    ``grid["guidance"]`` sweeps the weight of ``guidance`` (classifier-free when it is None).
    ``tuned`` maps (sampler, steps) to a tuned grid (from ``grid_source``) and its first step
    ("analytic" for one tuned with the analytic first step, which it then runs with; else None),
    used where present.
    """
    samplers = grid.get("sampler", [sampler])
    step_counts = grid.get("steps", [steps])
    weights = grid.get("guidance", [None])
    rows = []
    for name, count, weight in itertools.product(samplers, step_counts, weights):
        options = guidance
        if weight is not None:
            options = replace(guidance, weight=weight) if guidance is not None else GuidanceOptions(weight)
        sigmas, tuned_first = (tuned or {}).get((name, count), (None, None))
        record = evaluate_run(
            ctx,
            metrics=metrics,
            n=n,
            sampler=name,
            steps=count,
            spacing=spacing,
            sigmas=sigmas,
            grid_source=grid_source if sigmas is not None else None,
            seed=seed,
            split=split,
            progress=progress,
            device=device,
            precision=precision,
            guidance=options,
            first_step=tuned_first or first_step,
        )
        record["sampler_requested"] = name  # the sweep's axis: "auto" stays one line across step counts
        rows.append(record)
        guided = f"  w {weight:>5.2f}" if weight is not None else ""
        label = name if name == record["sampler"] else f"{name} ({record['sampler']})"
        print(
            f"{label:<16s} steps {count:>4d}  NFE {record['nfe']:>4d}{guided}  {record['spacing']:<9s} "
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
    if len({(r["guidance"] or {}).get("weight") for r in rows}) > 1:
        return plot_guidance_sweep(path, rows)
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


def plot_guidance_sweep(path: str | Path, rows: list[dict[str, Any]]) -> Path:
    """The guidance trade-off: FD (left) and precision, recall, class accuracy (right) against the weight."""
    from .plots import _pyplot, save_figure

    plt = _pyplot()
    metric = next(m for m in ("fid", "kid", "fid_inf", "is") if m in rows[0]["scores"])
    weight = lambda r: (r["guidance"] or {}).get("weight", 1.0)  # noqa: E731 (unguided conditional: w = 1)
    curves: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        curves.setdefault(f"{r['sampler']} {r['steps']} steps", []).append(r)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, mine in curves.items():
        mine = sorted(mine, key=weight)
        left.plot([weight(r) for r in mine], [_headline(r["scores"][metric]) for r in mine], "o-", label=label)
        for key, style in (("precision", "o-"), ("recall", "s--")):
            if "pr" in mine[0]["scores"]:
                values = [r["scores"]["pr"][key] for r in mine]
                right.plot([weight(r) for r in mine], values, style, label=f"{key} ({label})")
        if "class_accuracy" in mine[0]["scores"]:
            values = [r["scores"]["class_accuracy"] for r in mine]
            right.plot([weight(r) for r in mine], values, "^:", label=f"class accuracy ({label})")
    left.set(
        xlabel="guidance weight w", ylabel=metric.upper(), title=f"{metric.upper()} against w (n={rows[0]['n_fake']})"
    )
    right.set(xlabel="guidance weight w", ylim=(0, 1.02), title="precision, recall, requested-class accuracy")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
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
    real_images = load_images(real_path) if real_path.suffix == ".npz" else load_dataset(real).images()
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
        "normalisation": extractor.normalisation,
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
