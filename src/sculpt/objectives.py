"""What the training loop optimises: one class per objective, named by the config's ``task``.

An objective says

- what it trains: ``model``, a ``Denoiser`` whose network the loop optimises, averages
  (EMA) and checkpoints, and what that network starts from (``initial_weights``: a
  teacher's, for a student);
- what it keeps frozen: ``frozen()``, modules checkpointed beside the model and restored
  on resume (a progressive-distillation teacher);
- what a step draws: ``draw(images, labels, generator, step)`` gets the *global* batch and
  the loop's generator, and returns tensors whose first dimension is the batch. Every
  process makes the same draws and keeps its own slice, so N processes with batch B take
  the steps of one with batch N*B and a checkpoint resumes under any number of them.
  float64 tensors (noise levels) stay on the host, where the denoiser's scalings are
  computed; the rest go to the device;
- per-sample losses of this process's slice: ``loss(batch, step) -> [B]``;
- what else a checkpoint keeps (``state_dict``: a discriminator's optimizer) and what the
  run folder keeps when training ends (``finish``: an autoencoder's latent scale).

Objectives: ``Denoising`` (the diffusion loss, its weightings and noise-level draws),
``ConsistencyTuning`` (ECT, Geng et al. 2024), ``ConsistencyTraining`` (iCT, Song &
Dhariwal 2023), ``ProgressiveDistillation`` (Salimans & Ho 2022) and
``AutoencoderTraining`` (the KL autoencoder of latent diffusion, Rombach et al. 2022).
The loop (``sculpt.train``) knows none of them; ``sculpt.run.build_objective`` builds them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import Config
from .data import ImageDataset
from .denoiser import Denoiser, Scalings, add_noise, broadcast, per_sample_sigma, unit_state
from .latent import write_latent_scale
from .nets.autoencoder import Autoencoder, PatchDiscriminator
from .samplers import ddim
from .schedules import grid, sigma_to_alpha_sigma

__all__ = [
    "WEIGHTINGS",
    "OBJECTIVES",
    "Objective",
    "Denoising",
    "ConsistencyTuning",
    "ConsistencyTraining",
    "ProgressiveDistillation",
    "AutoencoderModel",
    "AutoencoderTraining",
    "denoising_loss",
    "ImportanceDraw",
    "SIGMA_DRAWS",
    "kl_to_standard_normal",
    "ect_r",
    "ict_steps",
    "ict_sigmas",
]


# -- the denoising loss and its weightings, as a weight on the squared error of the output F --


def _weight_none(sigma: Tensor, s: Scalings, sigma_data: float) -> Tensor:
    return torch.ones_like(sigma)  # plain MSE on the target the network predicts


def _weight_min_snr(sigma: Tensor, s: Scalings, sigma_data: float, gamma: float = 5.0) -> Tensor:
    # Hang et al. 2023: weight min(SNR, gamma) on the x0 error, whatever the target; the
    # F error is the x0 error / c_out, hence the c_out^2 (for eps this is min(SNR, g)/SNR).
    snr = sigma.reciprocal() ** 2
    return torch.clamp(snr, max=gamma) * s.c_out**2


def _weight_edm(sigma: Tensor, s: Scalings, sigma_data: float) -> Tensor:
    # Karras et al. 2022: lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 on the x0 error, written
    # (1 + sd^2 / sigma^2) / sd^2 above sigma = 1 so that sigma = inf gives its limit 1 / sd^2, not inf / inf.
    sd2 = sigma_data**2
    lam = torch.where(sigma > 1, (1 + sd2 / sigma**2) / sd2, (sigma**2 + sd2) / (sigma**2 * sd2))
    return lam * s.c_out**2


WEIGHTINGS: dict[str, Callable[[Tensor, Scalings, float], Tensor]] = {
    "none": _weight_none,
    "min_snr": _weight_min_snr,
    "edm": _weight_edm,
}


def denoising_loss(
    D: Denoiser,
    x0: Tensor,
    *,
    weighting: str = "none",
    sigma: Tensor | None = None,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    **cond: Tensor,
) -> Tensor:
    """Per-sample diffusion loss [B]: weighted MSE between the network output F and its target.

    Draws sigma from the schedule's training distribution (uniform discrete levels,
    uniform t, or EDM's log-normal) unless given, jumps straight to x = x0 + sigma eps,
    and compares F with the exact target (x0 - c_skip u) / c_out, written in x0 and
    eps so that no cancellation occurs at small sigma.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; valid: {', '.join(WEIGHTINGS)}")
    if sigma is None:
        sigma = D.schedule.sample_sigma(x0.shape[0], generator=generator)
    sigma = per_sample_sigma(sigma, x0)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device, non_blocking=True)
    s = D.scalings(sigma)
    u = unit_state(add_noise(x0, sigma, noise), sigma)
    # u = alpha x0 + sigma_vp eps, so the target (x0 - c_skip u) / c_out splits exactly:
    alpha, sigma_vp = sigma_to_alpha_sigma(sigma)
    coef_x0 = (1 - s.c_skip * alpha) / s.c_out
    coef_eps = -s.c_skip * sigma_vp / s.c_out
    target = broadcast(coef_x0, x0) * x0 + broadcast(coef_eps, x0) * noise
    out = D.output(u, s, **cond)
    mse = (out.float() - target.float()).pow(2).flatten(1).mean(1)
    weight = WEIGHTINGS[weighting](sigma, s, D.sigma_data)
    return weight.to(device=mse.device, dtype=mse.dtype, non_blocking=True) * mse


class ImportanceDraw:
    """Training noise levels drawn in proportion to the loss weight, stratified over the batch.

    The diffusion loss is an integral over noise levels of weight(sigma) * E[mse | sigma] under
    the schedule's own training distribution; where the weight is small (min-SNR gives sigma
    above 5 under 0.5% of the total on a cosine schedule, yet uniform t puts 13% of the batch
    there), the samples cost a full forward and backward and teach almost nothing. Drawing
    sigma with density proportional to the weight, and multiplying each sample's loss by
    mean(weight) / weight(its cell), keeps the expected loss exactly (Kingma & Gao 2023: the
    weighting and the noise distribution trade against each other) and lowers its variance.
    The batch's quantiles are stratified (one uniform offset, B evenly spaced points: Kingma
    et al. 2021's low-discrepancy sampler), which lowers it further.

    Discrete schedules draw their own levels; continuous ones draw one of ``cells`` equal-
    probability cells of their distribution (``Schedule.quantile``) and a uniform point in it.
    """

    def __init__(self, model: Denoiser, weighting: str, cells: int = 4096) -> None:
        schedule = model.schedule
        self.schedule, self.discrete = schedule, bool(schedule.num_steps)
        if self.discrete:
            sigmas = schedule.sigmas
        else:
            sigmas = schedule.quantile((torch.arange(cells, dtype=torch.float64) + 0.5) / cells)
        weight = WEIGHTINGS[weighting](sigmas, model.scalings(sigmas), model.sigma_data).double()
        if not bool(torch.isfinite(weight).all()) or bool((weight < 0).any()) or not weight.sum() > 0:
            raise ValueError(
                f"the {weighting!r} weighting is not finite and positive over the {schedule.name!r} schedule's "
                "levels, so noise levels cannot be drawn in proportion to it; pass --diffusion.sigma_draw=schedule"
            )
        self.cells = len(weight)
        self.sigmas = sigmas
        cumulative = torch.cumsum(weight, 0)
        self.cdf = cumulative / cumulative[-1]  # ends in exactly 1
        self.factor = (weight.mean() / weight).float()  # inf where the weight is 0: those cells are never drawn

    def __call__(self, n: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """(sigma [n] float64, loss factor [n] float32) for a batch of n."""
        u = (torch.rand(1, generator=generator, dtype=torch.float64) + torch.arange(n, dtype=torch.float64)) / n
        u = u[torch.randperm(n, generator=generator)]
        cell = torch.searchsorted(self.cdf, u, right=True)  # u in [cdf[k-1], cdf[k]): cell k, never a 0-weight one
        if self.discrete:
            sigma = self.sigmas[cell]
        else:
            jitter = torch.rand(n, generator=generator, dtype=torch.float64)
            sigma = self.schedule.quantile((cell + jitter) / self.cells)
        return sigma, self.factor[cell]


SIGMA_DRAWS = ("importance", "schedule")


# -- the interface ----------------------------------------------------------------------


class Objective:
    """What the loop optimises (see the module docstring). Subclasses set ``name``."""

    name = ""

    def __init__(self, config: Config, model: Denoiser, teacher: Denoiser | None = None) -> None:
        self.config, self.model, self.teacher = config, model, teacher

    def initial_weights(self) -> dict[str, Tensor] | None:
        """The state dict the trained network starts from (None: its fresh initialisation)."""
        return None

    def frozen(self) -> dict[str, nn.Module]:
        """Modules the objective uses but does not train; checkpointed as NAME.safetensors."""
        return {}

    def draw(self, images: Tensor, labels: Tensor, generator: torch.Generator, step: int) -> dict[str, Tensor]:
        raise NotImplementedError

    def loss(self, batch: dict[str, Tensor], step: int) -> Tensor:
        raise NotImplementedError

    def begin_step(self, step: int, net: nn.Module, ema: nn.Module) -> None:
        """Called before each optimizer step (a stage change swaps teachers here)."""

    def stage_start(self, step: int) -> int:
        """The step at which the current stage began: the EMA's age counts from there."""
        return 0

    def record(self, step: int) -> dict[str, float | int]:
        """Extra fields for the log line at this step."""
        return {}

    def state_dict(self) -> dict:
        """What a checkpoint keeps of the objective beyond its frozen modules (an optimizer of its own)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()`` on resume."""

    def finish(self, run_dir: Path, ema: nn.Module, dataset: ImageDataset, device: torch.device) -> None:
        """After the last step, on the main process: what the run folder keeps beside the weights."""

    def _labels(self, labels: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
        """Class labels with label dropout to the null class (for classifier-free guidance)."""
        num_classes = self.config.model.num_classes
        if not num_classes:
            return {}
        drop = torch.rand(labels.shape[0], generator=generator) < self.config.train.label_dropout
        return {"class_labels": torch.where(drop, num_classes, labels)}


def _cond(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    return {"class_labels": batch["class_labels"]} if "class_labels" in batch else {}


# -- denoising ----------------------------------------------------------------------------


class Denoising(Objective):
    """The diffusion loss: noise levels from the schedule, weighting from ``diffusion.weighting``."""

    name = "denoising"

    def __init__(self, config: Config, model: Denoiser, teacher: Denoiser | None = None) -> None:
        super().__init__(config, model, teacher)
        if config.diffusion.weighting not in WEIGHTINGS:
            raise ValueError(
                f"unknown diffusion.weighting {config.diffusion.weighting!r}; valid: {', '.join(WEIGHTINGS)}"
            )
        if model.prediction == "eps" and math.isinf(model.schedule.sigma_max):
            raise ValueError(
                "prediction 'eps' cannot be trained with zero terminal SNR: at sigma = inf the noise is the "
                "state itself and eps carries no information about x0. Use --diffusion.prediction=v (or x0, edm)."
            )
        if config.diffusion.sigma_draw not in SIGMA_DRAWS:
            raise ValueError(
                f"unknown diffusion.sigma_draw {config.diffusion.sigma_draw!r}; valid: {', '.join(SIGMA_DRAWS)}"
            )
        self.importance = (
            ImportanceDraw(model, config.diffusion.weighting) if config.diffusion.sigma_draw == "importance" else None
        )

    def draw(self, images: Tensor, labels: Tensor, generator: torch.Generator, step: int) -> dict[str, Tensor]:
        if self.importance is not None:
            sigma, factor = self.importance(images.shape[0], generator)
            levels = {"sigma": sigma, "factor": factor}
        else:
            levels = {"sigma": self.model.schedule.sample_sigma(images.shape[0], generator=generator)}
        noise = torch.randn(images.shape, generator=generator)
        return {"x0": images, **levels, "noise": noise, **self._labels(labels, generator)}

    def loss(self, batch: dict[str, Tensor], step: int) -> Tensor:
        loss = denoising_loss(
            self.model,
            batch["x0"],
            weighting=self.config.diffusion.weighting,
            sigma=batch["sigma"],
            noise=batch["noise"],
            **_cond(batch),
        )
        return loss * batch["factor"] if "factor" in batch else loss


# -- consistency models ---------------------------------------------------------------------


@contextmanager
def _same_dropout(device: torch.device) -> Iterator[Callable[[], None]]:
    """Yields a function that rewinds the RNG, so a second forward draws the first one's dropout masks."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def rewind() -> None:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)

    after_cpu = after_cuda = None
    try:
        yield rewind
        after_cpu = torch.get_rng_state()
        after_cuda = torch.cuda.get_rng_state(device) if cuda is not None else None
    finally:
        if after_cpu is not None:
            torch.set_rng_state(after_cpu)
        if after_cuda is not None:
            torch.cuda.set_rng_state(after_cuda, device)


def _consistency_distance(diff: Tensor, metric: str, c: float) -> Tensor:
    """Per-sample distance of f(x_t) - f(x_r): pseudo-Huber on the vector norm, or the mean square."""
    flat = diff.float().flatten(1)
    if metric == "l2":
        return flat.pow(2).mean(1)
    # sqrt(|d|^2 + c^2) - c: the adaptive weight 1 / |d| of ECT (c = 0) or iCT's pseudo-Huber.
    return torch.sqrt(flat.pow(2).sum(1) + c * c) - c


def ect_r(t: Tensor, stage: int, *, q: float, k: float, b: float, boundary: float) -> Tensor:
    """ECT's mapping r(t) = t (1 - q^-stage n(t)), n(t) = 1 + k sigmoid(-b t); at or below the boundary, 0.

    Stage 0 gives r = 0 everywhere (plain denoising); each later stage shrinks t - r by q.
    """
    n = 1 + k * torch.sigmoid(-b * t)
    r = t * (1 - q ** (-stage) * n)
    return torch.where(r > boundary, r, torch.zeros_like(r))


class ConsistencyTuning(Objective):
    """Easy consistency tuning (ECT; Geng et al. 2024, "Consistency models made easy").

    The student starts from the teacher's weights and learns f(x_t, t) = sg(f(x_r, r)) on
    one noise draw, x_t = x0 + t eps and x_r = x0 + r eps, with r = ``ect_r(t, stage)``:
    stage 0 is the denoising loss (r = 0, whose target is x0 by the boundary condition),
    and every ``ect.stage_steps`` the gap t - r shrinks by ``ect.q``. No separate teacher
    network, no LPIPS, no JVP: the target is the student itself without gradient, with
    the same dropout masks. The loss is the pseudo-Huber distance (the plain norm at
    c = 0, the paper's adaptive weighting) times w(t) = 1/t^2 + 1/sigma_data^2.
    """

    name = "ect"

    def __init__(self, config: Config, model: Denoiser, teacher: Denoiser | None = None) -> None:
        super().__init__(config, model, teacher)
        e = config.ect
        if teacher is None:
            raise ValueError("ect tunes a trained diffusion run: give its folder (sculpt distill RUN --method ect)")
        if model.prediction == "x0":
            raise ValueError(
                "ect needs the boundary condition f(x, 0) = x, which an x0-prediction model does not have "
                "(its c_skip is 0); distill a teacher trained with --diffusion.prediction=v, eps or edm"
            )
        if e.metric not in ("huber", "l2") or e.weighting not in ("edm", "inverse_dt"):
            raise ValueError(f"ect.metric must be huber or l2 and ect.weighting edm or inverse_dt (got {e})")
        if e.stage_steps < 1 or e.q <= 1 or e.start_stage < 0:
            raise ValueError("ect.stage_steps must be >= 1, ect.q > 1 and ect.start_stage >= 0")
        schedule = model.schedule
        self.sigma_lo = max(schedule.sigma_min, 1e-4)
        # A zero-terminal-SNR schedule has sigma_max = inf: draw t below its last finite level.
        self.sigma_hi = schedule.sigma_max if math.isfinite(schedule.sigma_max) else float(schedule.sigma(0.999))
        # f(x, sigma) = x holds exactly at sigma = 0 (eps / v / edm) and at sigma_min (cm); below the
        # schedule's lowest level the network was never trained, so r there takes x0 as its target.
        self.boundary = schedule.sigma_min

    def initial_weights(self) -> dict[str, Tensor]:
        return self.teacher.net.state_dict()

    def stage(self, step: int) -> int:
        return self.config.ect.start_stage + step // self.config.ect.stage_steps

    def draw(self, images: Tensor, labels: Tensor, generator: torch.Generator, step: int) -> dict[str, Tensor]:
        e = self.config.ect
        z = torch.randn(images.shape[0], generator=generator, dtype=torch.float64)
        t = torch.exp(e.p_mean + e.p_std * z).clamp(self.sigma_lo, self.sigma_hi)
        noise = torch.randn(images.shape, generator=generator)
        r = ect_r(t, self.stage(step), q=e.q, k=e.k, b=e.b, boundary=self.boundary)
        return {"x0": images, "t": t, "r": r, "noise": noise, **self._labels(labels, generator)}

    def loss(self, batch: dict[str, Tensor], step: int) -> Tensor:
        e, x0, t, r = self.config.ect, batch["x0"], batch["t"], batch["r"]
        cond = _cond(batch)
        at_boundary = (r == 0).to(x0.device).view(-1, *([1] * (x0.ndim - 1)))
        with _same_dropout(x0.device) as rewind:
            f_t = self.model(add_noise(x0, t, batch["noise"]), t, **cond)
            if bool((r > 0).any()):
                rewind()
                level = torch.where(r > 0, r, t)  # r = 0 rows: any valid level, replaced by x0 below
                with torch.no_grad():
                    f_r = self.model(add_noise(x0, level, batch["noise"]), level, **cond)
                target = torch.where(at_boundary, x0, f_r.to(x0.dtype))
            else:
                target = x0
        distance = _consistency_distance(f_t - target, e.metric, e.huber_c)
        if e.weighting == "edm":
            sd = self.model.sigma_data
            weight = (t**2 + sd**2) / (t * sd) ** 2
        else:
            weight = (t - r).reciprocal()
        return weight.to(device=distance.device, dtype=distance.dtype) * distance

    def record(self, step: int) -> dict[str, float | int]:
        return {"stage": self.stage(step)}


def ict_steps(step: int, total_steps: int, s0: int, s1: int) -> int:
    """iCT's discretisation curriculum N(k) = min(s0 2^floor(k / K'), s1) + 1, K' = floor(K / (log2(s1/s0) + 1))."""
    period = max(1, math.floor(total_steps / (math.log2(s1 / s0) + 1)))
    return min(s0 * 2 ** (step // period), s1) + 1


def ict_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float) -> Tensor:
    """Karras et al.'s n levels from sigma_min up to sigma_max (increasing), float64."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    return (sigma_min ** (1 / rho) + ramp * (sigma_max ** (1 / rho) - sigma_min ** (1 / rho))) ** rho


class ConsistencyTraining(Objective):
    """Improved consistency training from scratch (iCT; Song & Dhariwal 2023).

    Adjacent levels (sigma_i, sigma_i+1) of a Karras grid whose size doubles by the
    curriculum ``ict_steps``, the index drawn with probability proportional to the
    log-normal mass between the two levels; the loss is the pseudo-Huber distance
    between f(x0 + sigma_i+1 z) and the stop-gradient f(x0 + sigma_i z), weighted by
    1 / (sigma_i+1 - sigma_i). No EMA teacher: the target is the student itself. The
    model must use the ``cm`` target, whose f(x, sigma_min) = x is the boundary condition.
    """

    name = "ict"

    def __init__(self, config: Config, model: Denoiser, teacher: Denoiser | None = None) -> None:
        super().__init__(config, model, teacher)
        i = config.ict
        if model.prediction != "cm":
            raise ValueError(
                f"ict trains a consistency model: it needs --diffusion.prediction=cm (got {model.prediction!r}); "
                "sculpt distill --method ict sets it"
            )
        if not (1 <= i.s0 <= i.s1):
            raise ValueError(f"ict needs 1 <= s0 <= s1 (got {i.s0}, {i.s1})")
        self.sigma_min = model.schedule.sigma_min
        self.sigma_max = model.schedule.sigma_max
        if not math.isfinite(self.sigma_max):
            raise ValueError("ict needs a schedule with finite sigma_max (use --diffusion.schedule=edm)")

    def levels(self, step: int) -> Tensor:
        n = ict_steps(step, self.config.train.steps, self.config.ict.s0, self.config.ict.s1)
        return ict_sigmas(n, self.sigma_min, self.sigma_max, self.config.ict.rho)

    def draw(self, images: Tensor, labels: Tensor, generator: torch.Generator, step: int) -> dict[str, Tensor]:
        i = self.config.ict
        sigmas = self.levels(step)
        cdf = torch.erf((torch.log(sigmas) - i.p_mean) / (math.sqrt(2) * i.p_std))
        index = torch.multinomial(cdf[1:] - cdf[:-1], images.shape[0], replacement=True, generator=generator)
        noise = torch.randn(images.shape, generator=generator)
        return {
            "x0": images,
            "sigma_lo": sigmas[index],
            "sigma_hi": sigmas[index + 1],
            "noise": noise,
            **self._labels(labels, generator),
        }

    def loss(self, batch: dict[str, Tensor], step: int) -> Tensor:
        x0, lo, hi, noise = batch["x0"], batch["sigma_lo"], batch["sigma_hi"], batch["noise"]
        cond = _cond(batch)
        c = self.config.ict.huber_c or 0.00054 * math.sqrt(x0[0].numel())
        with _same_dropout(x0.device) as rewind:
            f_hi = self.model(add_noise(x0, hi, noise), hi, **cond)
            rewind()
            with torch.no_grad():
                f_lo = self.model(add_noise(x0, lo, noise), lo, **cond)
        distance = _consistency_distance(f_hi - f_lo.to(f_hi.dtype), "huber", c)
        return (hi - lo).reciprocal().to(device=distance.device, dtype=distance.dtype) * distance

    def record(self, step: int) -> dict[str, float | int]:
        return {"levels": len(self.levels(step))}


# -- progressive distillation -----------------------------------------------------------------


class ProgressiveDistillation(Objective):
    """Progressive distillation (Salimans & Ho 2022): one student step matches two teacher DDIM steps.

    Round k trains a student for ``pd.start_steps / 2^(k+1)`` steps on the grid whose every
    other level it skips: from x at sigma (a student level), the teacher takes two DDIM
    steps through the level between to x'' at sigma''; the student's x0 target is the one
    whose single DDIM step lands there, (x'' - (sigma''/sigma) x) / (1 - sigma''/sigma), and
    its loss the squared x0 error weighted by max(SNR, 1) (SNR = 1/sigma^2). At the end of
    a round the student's EMA becomes the next teacher (kept frozen and checkpointed) and
    the student's starting point; the EMA restarts with the round.
    """

    name = "pd"

    def __init__(self, config: Config, model: Denoiser, teacher: Denoiser | None = None) -> None:
        super().__init__(config, model, teacher)
        p = config.pd
        if teacher is None:
            raise ValueError("pd distils a trained diffusion run: give its folder (sculpt distill RUN --method pd)")
        if model.prediction in ("eps", "cm"):
            raise ValueError(
                f"pd cannot use prediction {model.prediction!r}: at a few steps an eps model's x0 = (x - sigma eps) "
                "amplifies its error without bound (Salimans & Ho 2022, section 4); distill a teacher trained "
                "with --diffusion.prediction=v, x0 or edm"
            )
        if p.rounds < 1 or p.round_steps < 1 or p.start_steps % 2**p.rounds:
            raise ValueError(
                f"pd.start_steps ({p.start_steps}) must be divisible by 2^pd.rounds ({2**p.rounds}), "
                "with rounds and round_steps >= 1"
            )
        for r in range(p.rounds):
            self._check_nesting(p.start_steps // 2**r)
        self.teacher.requires_grad_(False).eval()

    def _check_nesting(self, teacher_steps: int) -> None:
        fine = grid(self.model.schedule, teacher_steps, self.config.pd.spacing)
        coarse = grid(self.model.schedule, teacher_steps // 2, self.config.pd.spacing)
        if len(fine) != teacher_steps + 1 or not torch.allclose(fine[::2], coarse, rtol=1e-9, atol=0):
            raise ValueError(
                f"pd.spacing={self.config.pd.spacing!r} does not nest at {teacher_steps} steps (its grid of "
                f"{teacher_steps // 2} steps is not every other level of its grid of {teacher_steps}); "
                "use pd.spacing=trailing"
            )

    def initial_weights(self) -> dict[str, Tensor]:
        return self.teacher.net.state_dict()

    def frozen(self) -> dict[str, nn.Module]:
        return {"teacher": self.teacher.net}

    def round(self, step: int) -> int:
        return min(step // self.config.pd.round_steps, self.config.pd.rounds - 1)

    def student_steps(self, step: int) -> int:
        return self.config.pd.start_steps // 2 ** (self.round(step) + 1)

    def teacher_grid(self, step: int) -> Tensor:
        return grid(self.model.schedule, 2 * self.student_steps(step), self.config.pd.spacing)

    def begin_step(self, step: int, net: nn.Module, ema: nn.Module) -> None:
        p = self.config.pd
        if step > 0 and step % p.round_steps == 0 and step // p.round_steps < p.rounds:
            with torch.no_grad():  # the round's student becomes the next teacher and the next student
                self.teacher.net.load_state_dict(ema.state_dict())
                net.load_state_dict(ema.state_dict())

    def stage_start(self, step: int) -> int:
        return self.round(step) * self.config.pd.round_steps

    def draw(self, images: Tensor, labels: Tensor, generator: torch.Generator, step: int) -> dict[str, Tensor]:
        index = torch.randint(self.student_steps(step), (images.shape[0],), generator=generator)
        noise = torch.randn(images.shape, generator=generator)
        return {"x0": images, "index": index, "noise": noise, **self._labels(labels, generator)}

    def loss(self, batch: dict[str, Tensor], step: int) -> Tensor:
        x0, index, noise = batch["x0"], batch["index"].cpu(), batch["noise"]
        cond = _cond(batch)
        levels = self.teacher_grid(step)
        sigma = levels[2 * index]
        x = add_noise(x0, sigma, noise)
        target = torch.empty_like(x)
        with torch.no_grad():
            for i in index.unique().tolist():
                rows = (index == i).nonzero().squeeze(1).to(x.device)
                rows_cond = {key: value[rows] for key, value in cond.items()}
                teacher = _with_cond(self.teacher, rows_cond)
                x_rows = x[rows]
                x_far = ddim(teacher, x_rows.float(), levels[2 * i : 2 * i + 3])
                ratio = 0.0 if math.isinf(levels[2 * i]) else float(levels[2 * i + 2] / levels[2 * i])
                target[rows] = ((x_far - ratio * x_rows) / (1 - ratio)).to(x.dtype)
        x0_hat = self.model(x, sigma, **cond)
        mse = (x0_hat.float() - target.float()).pow(2).flatten(1).mean(1)
        weight = torch.clamp(sigma.reciprocal() ** 2, min=1.0)  # max(SNR, 1), "truncated SNR"
        return weight.to(device=mse.device, dtype=mse.dtype) * mse

    def record(self, step: int) -> dict[str, float | int]:
        return {"round": self.round(step), "student_steps": self.student_steps(step)}


def _with_cond(D: Denoiser, cond: dict[str, Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
    return D if not cond else (lambda x, sigma: D(x, sigma, **cond))


# -- the autoencoder of latent diffusion ----------------------------------------------------------


class AutoencoderModel(nn.Module):
    """What ``AutoencoderTraining`` trains, in the shape the loop expects of a model: the network is ``.net``."""

    def __init__(self, net: Autoencoder) -> None:
        super().__init__()
        self.net = net


def kl_to_standard_normal(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) per sample [B], summed over the latent's dimensions."""
    return 0.5 * (mean.float().square() + logvar.float().exp() - 1 - logvar.float()).flatten(1).sum(1)


def _psnr(x: Tensor, y: Tensor) -> Tensor:
    """Per-image PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = (x.float() - y.float().clamp(-1, 1)).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(4 / mse.clamp_min(1e-10))


class AutoencoderTraining(Objective):
    """The KL autoencoder of latent diffusion (Rombach et al. 2022, LDM's ``LPIPSWithDiscriminator``).

    Per image: the L1 (or L2) reconstruction error of the decoded posterior sample
    z = mean + std eps, plus ``perceptual_weight`` times a feature distance of a domain
    classifier, plus ``kl_weight`` times the KL to N(0, I). LDM sums both over pixels and
    latents; here both sums are divided by the number of pixel values, which keeps LDM's
    ratio (its kl_weight 1e-6 means the same) and a loss near 1 for the loop's clipping.
    From ``disc_start`` on, a PatchGAN discriminator (hinge loss, its own Adam, one step
    per micro-batch on the detached reconstructions, before the generator's term) adds
    -D(x_hat) to the loss, weighted
    by ``disc_weight`` times LDM's adaptive weight |grad nll| / |grad g| at the decoder's
    last layer. The discriminator and its optimizer are checkpointed, so a resume is exact.
    """

    name = "autoencoder"

    def __init__(self, config: Config, model: AutoencoderModel, teacher: Denoiser | None = None) -> None:
        super().__init__(config, model, teacher)
        a, d = config.autoencoder, config.data
        if a.reconstruction not in ("l1", "l2"):
            raise ValueError(f"autoencoder.reconstruction must be l1 or l2 (got {a.reconstruction!r})")
        if min(a.kl_weight, a.perceptual_weight, a.disc_weight, a.disc_start, a.disc_lr) < 0:
            raise ValueError("autoencoder weights, disc_start and disc_lr must be >= 0")
        self.net: Autoencoder = model.net  # the unwrapped network: its last layer for the adaptive weight
        self.latent_shape = self.net.latent_shape((d.channels, d.resolution, d.resolution))
        self.perceptual = None
        if a.perceptual_weight > 0:
            if not a.perceptual_features.startswith("classifier:"):
                raise ValueError(
                    "autoencoder.perceptual_weight > 0 needs autoencoder.perceptual_features=classifier:DIR, a "
                    "domain classifier of this data (fit one with `sculpt features train --data ... --out DIR`)"
                )
            from .metrics.features import get_extractor

            extractor = get_extractor(a.perceptual_features)
            self.perceptual_size, self.perceptual_channels = extractor.input_size, extractor.input_channels
            self.perceptual = extractor.net.requires_grad_(False).eval()
        self.discriminator = self.disc_optimizer = None
        if a.disc_weight > 0 and config.train.world_size > 1:
            raise ValueError(
                "the patch discriminator trains in one process (its optimizer steps inside the loss, outside "
                "data-parallel averaging); train an autoencoder with autoencoder.disc_weight > 0 on one process"
            )
        if a.disc_weight > 0:
            self.discriminator = PatchDiscriminator(d.channels, a.disc_channels, a.disc_layers, d.resolution)
            self.disc_optimizer = torch.optim.Adam(
                self.discriminator.parameters(), lr=a.disc_lr or config.train.lr, betas=(0.5, 0.9)
            )
        self._psnr_sum: Tensor | None = None
        self._count = 0
        self._last: dict[str, Tensor] = {}

    def _move(self, device: torch.device) -> None:
        for module in (self.perceptual, self.discriminator):
            if module is not None and next(module.parameters()).device != device:
                module.to(device)
                if module is self.discriminator:  # Adam's state follows its parameters
                    for state in self.disc_optimizer.state.values():
                        for key, value in state.items():
                            if torch.is_tensor(value) and key != "step":
                                state[key] = value.to(device)

    def frozen(self) -> dict[str, nn.Module]:
        return {"discriminator": self.discriminator} if self.discriminator is not None else {}

    def state_dict(self) -> dict:
        return {"disc_optimizer": self.disc_optimizer.state_dict()} if self.disc_optimizer is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.disc_optimizer is not None and "disc_optimizer" in state:
            self.disc_optimizer.load_state_dict(state["disc_optimizer"])

    def draw(self, images: Tensor, labels: Tensor, generator: torch.Generator, step: int) -> dict[str, Tensor]:
        noise = torch.randn((images.shape[0], *self.latent_shape), generator=generator)
        return {"x": images, "noise": noise}

    def perceptual_distance(self, x: Tensor, y: Tensor) -> Tensor:
        """Per-image distance of the classifier's activations (unit-normalised over channels, LPIPS-style)."""
        h_x, h_y = x, y
        if h_x.shape[1] != self.perceptual_channels:  # greyscale <-> colour
            h_x, h_y = (h.mean(1, keepdim=True).expand(-1, self.perceptual_channels, -1, -1) for h in (h_x, h_y))
        if h_x.shape[-1] != self.perceptual_size:
            size = (self.perceptual_size, self.perceptual_size)
            h_x, h_y = (F.interpolate(h, size=size, mode="bilinear", align_corners=False) for h in (h_x, h_y))
        distance = torch.zeros(x.shape[0], device=x.device)
        for layer in self.perceptual.body:
            h_x, h_y = layer(h_x), layer(h_y)
            if isinstance(layer, nn.SiLU):
                a, b = F.normalize(h_x.float(), dim=1, eps=1e-8), F.normalize(h_y.float(), dim=1, eps=1e-8)
                distance = distance + (a - b).pow(2).sum(1).flatten(1).mean(1)
        return distance

    def loss(self, batch: dict[str, Tensor], step: int) -> Tensor:
        a = self.config.autoencoder
        x = batch["x"]
        self._move(x.device)
        recon, mean, logvar = self.model.net(x, batch["noise"])
        error = (recon.float() - x.float()).abs() if a.reconstruction == "l1" else (recon.float() - x.float()).pow(2)
        nll = error.flatten(1).mean(1)
        if self.perceptual is not None:
            nll = nll + a.perceptual_weight * self.perceptual_distance(x, recon)
        loss = nll + a.kl_weight * kl_to_standard_normal(mean, logvar) / x[0].numel()
        with torch.no_grad():  # summed on the device: read once per log line
            psnr = _psnr(x, recon).sum()
            self._psnr_sum = psnr if self._psnr_sum is None else self._psnr_sum + psnr
            self._count += x.shape[0]
        if self.discriminator is not None and step >= a.disc_start:
            loss = loss + self._adversarial(x, recon, nll)
        return loss

    def _adversarial(self, x: Tensor, recon: Tensor, nll: Tensor) -> Tensor:
        """One discriminator step on this batch, then the generator's hinge term with LDM's adaptive weight."""
        a = self.config.autoencoder
        with torch.autocast(x.device.type, enabled=False):
            real = self.discriminator(x.detach().float())
            fake = self.discriminator(recon.detach().float())
            d_loss = 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())
        if torch.is_grad_enabled():
            self.disc_optimizer.zero_grad(set_to_none=True)
            d_loss.backward()
            self.disc_optimizer.step()
        self.discriminator.requires_grad_(False)  # the generator's term moves the decoder, not the critic
        g_loss = -self.discriminator(recon.float()).flatten(1).mean(1)
        self.discriminator.requires_grad_(True)
        if torch.is_grad_enabled():
            nll_grad = torch.autograd.grad(nll.mean(), self.net.last_layer, retain_graph=True)[0]
            g_grad = torch.autograd.grad(g_loss.mean(), self.net.last_layer, retain_graph=True)[0]
            weight = (nll_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0, 1e4).detach() * a.disc_weight
        else:
            weight = torch.tensor(a.disc_weight, device=x.device)
        self._last = {"d_loss": d_loss.detach(), "d_weight": weight}
        return weight * g_loss

    def record(self, step: int) -> dict[str, float | int]:
        record: dict[str, float | int] = {}
        if self._count:
            record["psnr"] = float(self._psnr_sum) / self._count
            self._psnr_sum, self._count = None, 0
        record.update({key: float(value) for key, value in self._last.items()})
        return record

    def finish(self, run_dir: Path, ema: nn.Module, dataset: ImageDataset, device: torch.device) -> None:
        write_latent_scale(run_dir, ema, dataset, device=device)


#: ``config.task`` -> objective class.
OBJECTIVES: dict[str, type[Objective]] = {
    cls.name: cls
    for cls in (Denoising, ConsistencyTuning, ConsistencyTraining, ProgressiveDistillation, AutoencoderTraining)
}
