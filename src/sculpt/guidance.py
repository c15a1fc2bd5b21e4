"""Guidance as a wrapper around any denoiser: classifier-free, limited to an interval, rescaled, autoguidance.

One formula in x0 space,

    D_w(x, sigma) = D_ref + w (D - D_ref),

where D is the conditional denoiser and D_ref its reference: the same network given the
null class (classifier-free guidance, Ho & Salimans 2022), or a weaker model of the same
task (autoguidance, Karras et al. 2024, "Guiding a diffusion model with a bad version of
itself"). w = 0 is D_ref, w = 1 is D, w > 1 extrapolates away from the reference.

- ``interval=(sigma_lo, sigma_hi)`` guides only for sigma in (sigma_lo, sigma_hi] and is plain
  D elsewhere (Kynkäänniemi et al. 2024, "Applying guidance in a limited interval").
- ``rescale=phi`` matches the standard deviation of the guided x0 to the conditional one's,
  blended by phi (Lin et al. 2023, "Common diffusion noise schedules ...", section 3.4).

``Guided`` keeps the denoiser contract ``D(x, sigma, **cond) -> x0_hat`` and the
``schedule`` attribute, so every sampler, grid and metric takes it unchanged. The two
branches of classifier-free guidance go through the network in one batched forward.
``guided_run`` builds one from a run folder's config, with the checks that make guidance
meaningful there (a class-conditional run, a guide of the same task).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .denoiser import DenoiserFn, per_sample_sigma

__all__ = [
    "Guided",
    "GuidanceOptions",
    "CountEvaluations",
    "guided_run",
    "check_guidance",
    "parse_interval",
    "same_schedule",
]


def same_schedule(a: Any, b: Any) -> bool:
    """Two schedules map time to the same sigmas (checked on 11 times in [0, 1] and at the ends)."""
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    sa, sb = a.sigma(t), b.sigma(t)
    finite = torch.isfinite(sa) & torch.isfinite(sb)
    return bool(
        torch.equal(torch.isinf(sa), torch.isinf(sb))
        and torch.allclose(sa[finite], sb[finite], rtol=1e-9, atol=0)
        and getattr(a, "num_steps", None) == getattr(b, "num_steps", None)
    )


class Guided(nn.Module):
    """``D_w = D_ref + w (D - D_ref)`` in x0 space, a denoiser like the one it wraps.

    Args:
        D: the conditional denoiser, any ``D(x, sigma, **cond) -> x0_hat`` (a ``Denoiser``,
            a closed-form callable).
        weight: the guidance weight w (0: the reference alone, 1: D alone; neither then
            evaluates the other branch).
        null_cond: the condition of the unconditional branch, e.g. ``{"class_labels": 10}``
            for a network whose null class is label 10. A scalar is broadcast to the batch;
            keys not named keep their conditional value. Needed unless ``guide`` is given.
        interval: ``(sigma_lo, sigma_hi)``; guidance only for sigma_lo < sigma <= sigma_hi,
            plain D outside (where D_ref is then never evaluated).
        rescale: phi in [0, 1], CFG rescale on the x0 prediction; 0 is the identity.
        guide: autoguidance: the reference is this denoiser (a weaker model of the same task),
            given the same condition as D. Its schedule must be D's.
        batch_branches: classifier-free guidance evaluates both branches in one forward of
            a doubled batch (False: two calls, the same numbers up to kernel rounding).
    """

    def __init__(
        self,
        D: DenoiserFn,
        weight: float,
        *,
        null_cond: Mapping[str, Tensor | int | float] | None = None,
        interval: tuple[float, float] | None = None,
        rescale: float = 0.0,
        guide: DenoiserFn | None = None,
        batch_branches: bool = True,
    ) -> None:
        super().__init__()
        weight = float(weight)
        if not math.isfinite(weight):
            raise ValueError(f"the guidance weight must be a finite number (got {weight})")
        if not 0.0 <= rescale <= 1.0:
            raise ValueError(f"rescale (phi) must be in [0, 1] (got {rescale}); 0.7 is Lin et al.'s choice")
        if interval is not None:
            interval = parse_interval(interval)
        if guide is None and null_cond is None:
            raise ValueError(
                "classifier-free guidance needs null_cond, the condition of the unconditional branch "
                "(e.g. {'class_labels': num_classes}); or pass guide= for autoguidance"
            )
        mine, theirs = getattr(D, "schedule", None), getattr(guide, "schedule", None)
        if guide is not None and mine is not None and theirs is not None and not same_schedule(mine, theirs):
            raise ValueError(
                f"the guide's schedule {theirs!r} differs from the model's {mine!r}: autoguidance mixes the two "
                "models' x0 estimates at the same noise level, so the guide must be trained on the same schedule"
            )
        self.D = D
        self.guide = guide
        self.weight = weight
        self.null_cond = dict(null_cond) if null_cond is not None else None
        self.interval = interval
        self.rescale = float(rescale)
        self.batch_branches = batch_branches
        self.schedule = mine

    @property
    def data_moments(self):
        """The moments of the guided denoiser at sigma = inf, where both branches are data means.

        Autoguidance's branches share the data: its moments are D's. Classifier-free guidance
        guides the class means, mu + w (mu_c - mu) (the null class's mean is mu). None with an
        interval or rescale, whose value at the top noise level these moments do not carry.
        """
        moments = getattr(self.D, "data_moments", None)
        if moments is None or self.interval is not None or self.rescale:
            return None
        if self.guide is not None:
            return moments
        if moments.class_means is None:
            return None
        from .moments import DataMoments

        guided = torch.lerp(moments.mean.expand_as(moments.class_means), moments.class_means, self.weight)
        return DataMoments(moments.mean, moments.var, guided, moments.count)

    def extra_repr(self) -> str:
        kind = "autoguidance" if self.guide is not None else "classifier-free"
        return f"{kind}, weight={self.weight}, interval={self.interval}, rescale={self.rescale}"

    def forward(self, x: Tensor, sigma: Tensor | float, **cond: Any) -> Tensor:
        if self.guide is None:
            missing = [key for key in self.null_cond if key not in cond]
            if missing:
                raise ValueError(
                    f"classifier-free guidance needs the condition {', '.join(missing)} at every call (got "
                    f"{', '.join(cond) or 'none'}); pass cond={{{missing[0]!r}: ...}} to sculpt.sample"
                )
        if self.interval is None:
            return self._guided(x, sigma, cond)
        lo, hi = self.interval
        s = per_sample_sigma(sigma, x)
        inside = (s > lo) & (s <= hi)
        if bool(inside.all()):
            return self._guided(x, sigma, cond)
        if not bool(inside.any()):
            return self.D(x, sigma, **cond)
        # Noise levels that differ within the batch straddle an end: each part gets its own.
        out = torch.empty_like(x)
        for mask, guided in ((inside, True), (~inside, False)):
            index = mask.nonzero().squeeze(1).to(x.device)
            part_sigma = sigma[index.to(sigma.device)] if isinstance(sigma, Tensor) and sigma.ndim == 1 else sigma
            part_cond = {k: _take(v, index, x.shape[0]) for k, v in cond.items()}
            part_x = x[index]
            out[index] = (
                self._guided(part_x, part_sigma, part_cond) if guided else self.D(part_x, part_sigma, **part_cond)
            )
        return out

    def _guided(self, x: Tensor, sigma: Tensor | float, cond: dict[str, Any]) -> Tensor:
        if self.weight == 1.0:  # D_ref + 1 (D - D_ref) is D: no reference needed
            return self.D(x, sigma, **cond)
        if self.guide is not None:
            reference = self.guide(x, sigma, **cond)
            if self.weight == 0.0:
                return reference
            main = self.D(x, sigma, **cond)
        else:
            null = {**cond, **{k: _null_like(v, cond.get(k), x) for k, v in self.null_cond.items()}}
            if self.weight == 0.0:
                return self.D(x, sigma, **null)
            main, reference = self._both(x, sigma, cond, null)
        # lerp is exact at its ends: start + w (end - start) for w < 0.5, end - (1 - w)(end - start) above.
        out = torch.lerp(reference, main, self.weight)
        if self.rescale:
            out = rescale_x0(out, main, self.rescale)
        return out

    def _both(self, x: Tensor, sigma: Tensor | float, cond: dict, null: dict) -> tuple[Tensor, Tensor]:
        """D(x | cond) and D(x | null) from one forward of the doubled batch where the inputs allow."""
        batch = x.shape[0]
        stackable = all(
            isinstance(cond[k], Tensor)
            and isinstance(null[k], Tensor)
            and cond[k].ndim >= 1
            and cond[k].shape[0] == batch
            and null[k].shape == cond[k].shape
            for k in cond
        ) and set(cond) == set(null)
        if not (self.batch_branches and stackable):
            return self.D(x, sigma, **cond), self.D(x, sigma, **null)
        both_sigma = torch.cat([sigma, sigma]) if isinstance(sigma, Tensor) and sigma.ndim == 1 else sigma
        both = self.D(torch.cat([x, x]), both_sigma, **{k: torch.cat([cond[k], null[k]]) for k in cond})
        return both[:batch], both[batch:]


def rescale_x0(guided: Tensor, conditional: Tensor, phi: float) -> Tensor:
    """CFG rescale (Lin et al. 2023, Algorithm 2) on x0: scale the guided estimate to the conditional one's std.

    The standard deviation is per sample, over all dimensions but the batch; phi blends the
    rescaled and the plain guided estimate: phi * rescaled + (1 - phi) * guided.
    """
    dims = tuple(range(1, guided.ndim))
    std_conditional = conditional.std(dim=dims, keepdim=True, correction=0)
    std_guided = guided.std(dim=dims, keepdim=True, correction=0).clamp_min(torch.finfo(guided.dtype).tiny)
    return guided * (phi * std_conditional / std_guided + (1 - phi))


def _null_like(value: Tensor | int | float, conditional: Any, x: Tensor) -> Tensor:
    """The null condition for this batch: a scalar broadcast like the conditional value (or to [B])."""
    if isinstance(value, Tensor) and value.ndim > 0:
        return value.to(x.device)
    if isinstance(conditional, Tensor) and conditional.ndim >= 1:
        return torch.full_like(conditional, value.item() if isinstance(value, Tensor) else value)
    return torch.full((x.shape[0],), value.item() if isinstance(value, Tensor) else value, device=x.device)


def _take(value: Any, index: Tensor, batch: int) -> Any:
    """Rows ``index`` of a per-sample condition; other values pass through."""
    if isinstance(value, Tensor) and value.ndim >= 1 and value.shape[0] == batch:
        return value[index.to(value.device)]
    return value


class CountEvaluations(nn.Module):
    """A denoiser that counts the samples it has evaluated (``rows``): the network cost of guidance.

    A call on a batch of B adds B; classifier-free guidance's doubled batch adds 2B. Divide
    by the number of samples drawn for network evaluations per sample.
    """

    def __init__(self, D: DenoiserFn) -> None:
        super().__init__()
        self.D = D
        self.schedule = getattr(D, "schedule", None)
        self.rows = 0

    @property
    def data_moments(self):
        return getattr(self.D, "data_moments", None)

    def forward(self, x: Tensor, sigma: Tensor | float, **cond: Any) -> Tensor:
        self.rows += x.shape[0]
        return self.D(x, sigma, **cond)


def parse_interval(value: str | tuple[float, float] | list[float]) -> tuple[float, float]:
    """``"0.3,5"`` or ``(0.3, 5)`` -> (0.3, 5.0), with 0 <= sigma_lo < sigma_hi (sigma_hi may be inf)."""
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",")]
        try:
            numbers = [float(p) for p in parts]
        except ValueError:
            numbers = []
    else:
        numbers = [float(v) for v in value]
    if len(numbers) != 2 or any(math.isnan(v) for v in numbers) or not 0 <= numbers[0] < numbers[1]:
        raise ValueError(
            f"the guidance interval must be two noise levels SIGMA_LO,SIGMA_HI with 0 <= SIGMA_LO < SIGMA_HI "
            f"(e.g. 0.3,5; guidance applies for SIGMA_LO < sigma <= SIGMA_HI); got {value!r}"
        )
    return numbers[0], numbers[1]


@dataclass(frozen=True)
class GuidanceOptions:
    """What ``sculpt sample`` / ``sculpt eval`` were asked for: a weight, and optionally an interval, rescale, guide."""

    weight: float
    interval: tuple[float, float] | None = None
    rescale: float = 0.0
    guide: str | None = None  #: a run folder (or one of its checkpoints/step_N folders): autoguidance


def _guide_differences(config: Any, guide: Any) -> list[str]:
    """What makes a guide's run a different task than the model's (data, schedule, target, classes)."""
    differences = []
    shape = lambda c: f"{c.data.channels}x{c.data.resolution}x{c.data.resolution}"  # noqa: E731
    if (config.data.name, shape(config)) != (guide.data.name, shape(guide)):
        differences.append(f"data: {guide.data.name} {shape(guide)} vs {config.data.name} {shape(config)}")
    d, g = config.diffusion, guide.diffusion
    if (d.schedule, d.shift, d.zero_terminal_snr) != (g.schedule, g.shift, g.zero_terminal_snr):
        describe = lambda x: f"{x.schedule} (shift {x.shift}, zero terminal SNR {x.zero_terminal_snr})"  # noqa: E731
        differences.append(f"schedule: {describe(g)} vs {describe(d)}")
    if (d.prediction, d.sigma_data) != (g.prediction, g.sigma_data):
        differences.append(
            f"target: {g.prediction} (sigma_data {g.sigma_data}) vs {d.prediction} (sigma_data {d.sigma_data})"
        )
    if config.model.num_classes != guide.model.num_classes:
        differences.append(f"classes: {guide.model.num_classes} vs {config.model.num_classes} (0 = unconditional)")
    return differences


def check_guidance(config: Any, options: GuidanceOptions) -> Any:
    """Refuse guidance a run cannot take (before any sampling); returns the guide's config (None: no guide).

    Classifier-free guidance needs a class-conditional run trained with label dropout (the
    null class is label ``num_classes``); autoguidance (``options.guide``) needs a guide run
    of the same data, schedule, target and classes, and works for unconditional runs too.
    """
    from .run import read_config

    if options.guide is None:
        if not config.model.num_classes:
            raise ValueError(
                "--guidance on an unconditional run: classifier-free guidance needs a class-conditional run "
                "(train with --model.class_cond=true on a labelled dataset), or give a weaker run of the same "
                "data with --guide RUN (autoguidance)"
            )
        if config.train.label_dropout <= 0:
            raise ValueError(
                "this run was trained with train.label_dropout=0, so its null class never saw an image and the "
                "unconditional branch is untrained; retrain with label_dropout > 0 (default 0.1), or use --guide RUN"
            )
        return None
    guide_dir = Path(options.guide)
    guide_config = read_config(guide_dir)
    differences = _guide_differences(config, guide_config)
    if differences:
        raise ValueError(
            f"the guide {guide_dir} is not a model of this run's task; it differs in "
            + "; ".join(differences)
            + ". Autoguidance needs a weaker model of the same task: a smaller or shorter-trained run "
            "(or a checkpoint folder) on the same data, schedule, target and classes"
        )
    return guide_config


def guided_run(
    denoiser: DenoiserFn,
    config: Any,
    options: GuidanceOptions | None,
    *,
    run_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> tuple[DenoiserFn, dict[str, Any] | None]:
    """A run's denoiser with the guidance ``options`` asked for, and the record of it (None: unguided).

    The checks are ``check_guidance``'s; the guide loads with its EMA weights on ``device``.
    A guide with the run's own weights (``run_dir``) is refused: it would change nothing.
    """
    from .run import load, weights_file, weights_hash

    if options is None:
        return denoiser, None
    codec = getattr(denoiser, "codec", None)  # a latent run: guide in latent space, keep the decoder outside
    if codec is not None:
        denoiser = denoiser.denoiser
    guide_config = check_guidance(config, options)
    guide = None
    record: dict[str, Any] = {
        "kind": "autoguidance" if options.guide else "classifier-free",
        "weight": float(options.weight),
        "interval": list(options.interval) if options.interval else None,
        "rescale": float(options.rescale),
        "guide": None,
        "guide_sha256": None,
        "guide_net": None,
    }
    if options.guide is not None:
        guide_dir = Path(options.guide)
        guide_hash = weights_hash(weights_file(options.guide))
        if run_dir is not None and guide_hash == weights_hash(weights_file(run_dir)):
            raise ValueError(
                f"the guide {guide_dir} has the same weights as the run itself, so D_w = D for every w; "
                "guide with a weaker model (a smaller or shorter-trained run, or an early checkpoint)"
            )
        guide, _ = load(options.guide, device=device)
        if getattr(guide, "codec", None) is not None:  # guidance mixes estimates where the sampler runs: latents
            guide = guide.denoiser
        record.update(guide=str(guide_dir), guide_sha256=guide_hash, guide_net=guide_config.model.net)
    null_cond = {"class_labels": config.model.num_classes} if guide is None else None
    guided = Guided(
        denoiser,
        options.weight,
        null_cond=null_cond,
        interval=options.interval,
        rescale=options.rescale,
        guide=guide,
    )
    if codec is not None:
        from .latent import LatentDenoiser

        return LatentDenoiser(guided, codec), record
    return guided, record
