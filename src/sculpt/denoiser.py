"""Prediction targets -> one denoiser D(x, sigma) -> x0_hat, and the training loss.

Any network becomes a denoiser through one table of scalings (Karras et al. 2022,
"EDM", Table 1), whatever it was trained to predict (eps, x0, v or EDM's F):

    x0_hat = c_skip * u + c_out * net(c_in * u, c_noise)

with one difference from EDM's table: c_skip and c_in multiply the variance-preserving
state u = x / sqrt(1 + sigma^2) rather than x. u stays finite at sigma = inf (zero
terminal SNR), where it *is* the pure unit noise, so that case needs no special path.
EDM's own c_skip and c_in are ours divided by sqrt(1 + sigma^2).

**The sigma = inf convention.** x0 + inf * eps is not a number, so wherever sigma is
infinite the state x holds eps (the limit of x / sigma). ``add_noise`` writes states
that way, samplers read them that way, and the denoiser turns them into u.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from .schedules import Schedule, sigma_to_alpha_sigma

__all__ = [
    "DenoiserFn",
    "Denoiser",
    "Scalings",
    "SCALINGS",
    "PREDICTIONS",
    "add_noise",
    "broadcast",
    "per_sample_sigma",
    "unit_state",
    "to_x0",
    "from_x0",
    "convert",
    "q_sample",
    "q_step",
]


@runtime_checkable
class DenoiserFn(Protocol):
    """What every sampler, grid, metric and wrapper takes: ``D(x, sigma, **cond) -> x0_hat``.

    ``x`` is a batch [B, ...] at noise levels ``sigma`` (a scalar or one per sample, >= 0;
    at sigma = inf ``x`` holds the unit noise), and the result is the estimate of the clean
    data, shaped like ``x``. A ``Denoiser``, a guided or latent wrapper and a closed-form
    denoiser all qualify. Where a denoiser has a ``schedule`` attribute (a
    ``sculpt.schedules.Schedule``), ``sculpt.sample`` builds its grid from it.
    """

    def __call__(self, x: Tensor, sigma: Tensor | float, **cond: Tensor) -> Tensor: ...


@dataclass(frozen=True)
class Scalings:
    """Coefficients of x0_hat = c_skip * u + c_out * F(c_in * u, c_noise), u the VP state.

    Tensors broadcast against the image batch (shape [B, 1, 1, 1] or scalars).
    """

    c_skip: Tensor
    c_out: Tensor
    c_in: Tensor
    c_noise: Tensor


def _where_large(sigma: Tensor, small: Callable[[Tensor], Tensor], large: Callable[[Tensor], Tensor]) -> Tensor:
    """Evaluate a formula in the form that is finite for sigma <= 1 or for sigma > 1."""
    big = sigma > 1
    safe_small = torch.where(big, torch.ones_like(sigma), sigma)
    safe_large = torch.where(big, sigma, torch.ones_like(sigma))
    return torch.where(big, large(safe_large), small(safe_small))


def _eps_scalings(sigma: Tensor, c_noise: Tensor, sigma_data: float) -> Scalings:
    # x0 = x - sigma * eps = sqrt(1 + sigma^2) u - sigma * eps: undefined at sigma = inf.
    return Scalings(torch.sqrt(1 + sigma**2), -sigma, torch.ones_like(sigma), c_noise)


def _x0_scalings(sigma: Tensor, c_noise: Tensor, sigma_data: float) -> Scalings:
    return Scalings(torch.zeros_like(sigma), torch.ones_like(sigma), torch.ones_like(sigma), c_noise)


def _v_scalings(sigma: Tensor, c_noise: Tensor, sigma_data: float) -> Scalings:
    # Salimans & Ho 2022: v = alpha eps - sigma_vp x0, so x0 = alpha u - sigma_vp v.
    alpha, sigma_vp = sigma_to_alpha_sigma(sigma)
    return Scalings(alpha, -sigma_vp, torch.ones_like(sigma), c_noise)


def _edm_scalings(sigma: Tensor, c_noise: Tensor, sigma_data: float) -> Scalings:
    # EDM: c_skip = sd^2/(s^2+sd^2), c_out = s sd/sqrt(s^2+sd^2), c_in = 1/sqrt(s^2+sd^2),
    # c_noise = ln(s)/4; c_skip and c_in times sqrt(1+s^2) because they act on u.
    sd2 = sigma_data**2
    c_skip = _where_large(
        sigma,
        lambda s: sd2 * torch.sqrt(1 + s**2) / (s**2 + sd2),
        lambda s: sd2 * torch.sqrt(s.reciprocal() ** 2 + 1) / (s * (1 + sd2 / s**2)),
    )
    c_out = sigma_data * torch.rsqrt(1 + sd2 / sigma**2)
    c_in = _where_large(
        sigma,
        lambda s: torch.sqrt((1 + s**2) / (s**2 + sd2)),
        lambda s: torch.sqrt((s.reciprocal() ** 2 + 1) / (1 + sd2 / s**2)),
    )
    return Scalings(c_skip, c_out, c_in, _log_sigma_noise(sigma))


#: The largest sigma whose log the ``edm`` and ``cm`` targets feed the network (see ``_log_sigma_noise``).
SIGMA_NOISE_MAX = 1e5


def _log_sigma_noise(sigma: Tensor) -> Tensor:
    """EDM's noise input ln(sigma) / 4, with sigma clamped at SIGMA_NOISE_MAX.

    At sigma = inf (zero terminal SNR) ln(sigma) is inf, which no network can embed. Above
    1e5 the state differs from pure noise by alpha < 1e-5, so inf shares the input of 1e5
    (c_noise 2.88, beyond every finite level of the zero-SNR schedules' last steps, ~1.5e4).
    """
    return torch.log(sigma.clamp(max=SIGMA_NOISE_MAX)) / 4


def _cm_scalings(sigma: Tensor, c_noise: Tensor, sigma_data: float, sigma_min: float = 0.002) -> Scalings:
    # Song et al. 2023 (consistency models), appendix C: c_skip = sd^2 / ((s - s_min)^2 + sd^2),
    # c_out = sd (s - s_min) / sqrt(s^2 + sd^2), so c_skip = 1 and c_out = 0 at s_min: f(x, s_min) = x.
    # c_skip and c_in times sqrt(1 + s^2) because they act on u, as for edm.
    sd2 = sigma_data**2
    c_skip = _where_large(
        sigma,
        lambda s: sd2 * torch.sqrt(1 + s**2) / ((s - sigma_min) ** 2 + sd2),
        lambda s: sd2 * torch.sqrt(s.reciprocal() ** 2 + 1) / (s * ((1 - sigma_min / s) ** 2 + sd2 / s**2)),
    )
    c_out = sigma_data * _where_large(
        sigma,
        lambda s: (s - sigma_min) / torch.sqrt(s**2 + sd2),
        lambda s: (1 - sigma_min / s) * torch.rsqrt(1 + sd2 / s**2),
    )
    c_in = _where_large(
        sigma,
        lambda s: torch.sqrt((1 + s**2) / (s**2 + sd2)),
        lambda s: torch.sqrt((s.reciprocal() ** 2 + 1) / (1 + sd2 / s**2)),
    )
    return Scalings(c_skip, c_out, c_in, _log_sigma_noise(sigma))


#: One row per prediction target: sigma, the schedule's noise input, sigma_data -> Scalings.
SCALINGS: dict[str, Callable[..., Scalings]] = {
    "eps": _eps_scalings,
    "x0": _x0_scalings,
    "v": _v_scalings,
    "edm": _edm_scalings,
    "cm": _cm_scalings,
}
PREDICTIONS = tuple(SCALINGS)


def _check_prediction(prediction: str) -> None:
    if prediction not in SCALINGS:
        raise ValueError(f"unknown prediction {prediction!r}; valid targets: {', '.join(SCALINGS)}")


def per_sample_sigma(sigma: Tensor | float, x: Tensor) -> Tensor:
    """sigma as a float64 CPU tensor [B] (a scalar is broadcast to the batch).

    Scalings are computed on the CPU in float64 and then moved: the schedule's inverse
    runs there, and a sigma that starts on the CPU (grids, training draws) never forces
    a device synchronisation.
    """
    sigma = (sigma if isinstance(sigma, Tensor) else torch.tensor(sigma, dtype=torch.float64)).detach()
    sigma = sigma.to("cpu", torch.float64)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    if sigma.ndim != 1 or sigma.shape[0] != x.shape[0]:
        raise ValueError(
            f"sigma must be a scalar or have one value per sample: got shape {tuple(sigma.shape)} "
            f"for a batch of {x.shape[0]}"
        )
    if torch.isnan(sigma).any() or (sigma < 0).any():
        raise ValueError("sigma must be >= 0 and not NaN: it is the noise level in x = x0 + sigma * eps")
    return sigma


def broadcast(values: Tensor, x: Tensor) -> Tensor:
    """[B] -> [B, 1, 1, ...] on x's device and dtype, to broadcast against x.

    The copy of a CPU tensor to an accelerator is ``non_blocking``: a blocking one would wait
    for all queued GPU work (a host-device synchronisation in every training step). From
    pageable memory CUDA stages the bytes before returning, so the source may be freed.
    """
    return values.to(device=x.device, dtype=x.dtype, non_blocking=True).reshape(-1, *([1] * (x.ndim - 1)))


def unit_state(x: Tensor, sigma: Tensor) -> Tensor:
    """u = x / sqrt(1 + sigma^2); at sigma = inf x already holds u (the convention above)."""
    sigma = broadcast(sigma, x)
    return torch.where(torch.isinf(sigma), x, x * torch.rsqrt(1 + sigma**2))


def add_noise(x0: Tensor, sigma: Tensor | float, noise: Tensor) -> Tensor:
    """The forward process in closed form: x = x0 + sigma * eps (eps itself where sigma = inf)."""
    sigma = broadcast(per_sample_sigma(sigma, x0), x0)
    return torch.where(torch.isinf(sigma), noise, x0 + torch.where(torch.isinf(sigma), 0, sigma) * noise)


def to_x0(pred: Tensor, prediction: str, x: Tensor, sigma: Tensor | float, sigma_data: float = 0.5) -> Tensor:
    """Turn a prediction of any target at state x, noise level sigma, into x0."""
    _check_prediction(prediction)
    sigma = per_sample_sigma(sigma, x)
    s = SCALINGS[prediction](sigma, sigma, sigma_data)
    return broadcast(s.c_skip, x) * unit_state(x, sigma) + broadcast(s.c_out, x) * pred


def from_x0(x0: Tensor, prediction: str, x: Tensor, sigma: Tensor | float, sigma_data: float = 0.5) -> Tensor:
    """The value of target ``prediction`` that corresponds to x0 at state x: the inverse of ``to_x0``."""
    _check_prediction(prediction)
    sigma = per_sample_sigma(sigma, x)
    s = SCALINGS[prediction](sigma, sigma, sigma_data)
    return (x0 - broadcast(s.c_skip, x) * unit_state(x, sigma)) / broadcast(s.c_out, x)


def convert(
    pred: Tensor, source: str, target: str, x: Tensor, sigma: Tensor | float, sigma_data: float = 0.5
) -> Tensor:
    """Convert a prediction between targets (eps, x0, v, edm) through x0: one formula, not n^2."""
    return from_x0(to_x0(pred, source, x, sigma, sigma_data), target, x, sigma, sigma_data)


class Denoiser(nn.Module):
    """A network plus its prediction target: ``D(x, sigma, **cond) -> x0_hat``.

    ``prediction`` picks the row of ``SCALINGS``; the network sees c_in * u and c_noise
    (the schedule's time * time_scale for eps/x0/v, DDPM's integer timestep on discrete
    schedules; EDM's ln(sigma)/4 for ``edm`` and ``cm``). ``cm`` takes the schedule's
    sigma_min as the consistency boundary. What a network is trained to output lives in
    ``sculpt.objectives``; every objective reaches the network through ``output``.
    """

    def __init__(
        self,
        net: nn.Module,
        schedule: Schedule,
        prediction: str = "eps",
        sigma_data: float = 0.5,
    ) -> None:
        super().__init__()
        _check_prediction(prediction)
        self.net = net
        self.schedule = schedule
        self.prediction = prediction
        self.sigma_data = sigma_data
        #: the training data's moments (``sculpt.moments``; ``load`` attaches a run's): the analytic first step
        self.data_moments = None

    def scalings(self, sigma: Tensor) -> Scalings:
        """The table row for this target at per-sample sigma [B] (float64, CPU, shapes [B])."""
        c_noise = self.schedule.t(sigma) * self.schedule.time_scale
        options = {"sigma_min": self.schedule.sigma_min} if self.prediction == "cm" else {}
        s = SCALINGS[self.prediction](sigma, c_noise, self.sigma_data, **options)
        if not (torch.isfinite(s.c_skip).all() and torch.isfinite(s.c_out).all()):
            raise ValueError(
                f"prediction {self.prediction!r} cannot denoise at sigma = inf: it carries no "
                "information about x0 at zero SNR. Use prediction='v' or 'x0' with "
                "zero_terminal_snr schedules (Lin et al. 2023)."
            )
        return s

    def output(self, u: Tensor, s: Scalings, **cond: Tensor) -> Tensor:
        """The network's raw output F at the VP state u (what the scalings turn into x0_hat)."""
        # c_noise stays float32 even under bf16: DDPM's timestep 999 is 1000 in bf16.
        c_noise = s.c_noise.to(device=u.device, dtype=torch.float32, non_blocking=True)
        out = self.net(broadcast(s.c_in, u) * u, c_noise, **cond)
        if out.shape != u.shape:
            raise ValueError(
                f"the network returned shape {tuple(out.shape)} for input {tuple(u.shape)}; "
                "a denoiser's network must return one value per input value (out_channels = in_channels)"
            )
        return out

    def forward(self, x: Tensor, sigma: Tensor | float, **cond: Tensor) -> Tensor:
        sigma = per_sample_sigma(sigma, x)
        s = self.scalings(sigma)
        u = unit_state(x, sigma)
        # c_skip * u is applied to x with the two factors multiplied in float64 first: where
        # c_skip u = x exactly (sigma = 0 for eps/v/edm, sigma_min for cm) the result is x itself.
        skip = torch.where(torch.isinf(sigma), s.c_skip, s.c_skip * torch.rsqrt(1 + sigma**2))
        return broadcast(skip, x) * x + broadcast(s.c_out, x) * self.output(u, s, **cond)


def q_sample(schedule: Schedule, x0: Tensor, t: Tensor | float, noise: Tensor) -> Tensor:
    """Ho et al. 2020, eq. 4, the VP form: x_t = sqrt(alpha_bar(t)) x0 + sqrt(1 - alpha_bar(t)) eps."""
    alpha, sigma_vp = schedule.alpha_sigma(torch.as_tensor(t).detach().cpu())
    alpha = broadcast(torch.atleast_1d(alpha).to(x0), x0)
    sigma_vp = broadcast(torch.atleast_1d(sigma_vp).to(x0), x0)
    return alpha * x0 + sigma_vp * noise


def q_step(schedule: Schedule, x_prev: Tensor, t_prev: Tensor | float, t: Tensor | float, noise: Tensor) -> Tensor:
    """One forward step in VP form, q(x_t | x_s) = N(sqrt(ab_t/ab_s) x_s, (1 - ab_t/ab_s) I), s < t."""
    ratio = schedule.alpha_bar(t) / schedule.alpha_bar(t_prev)
    if (ratio > 1 + 1e-12).any():
        raise ValueError("q_step needs t >= t_prev: the forward process only adds noise")
    ratio = broadcast(torch.atleast_1d(ratio.clamp(max=1)).to(x_prev), x_prev)
    return ratio.sqrt() * x_prev + (1 - ratio).sqrt() * noise
