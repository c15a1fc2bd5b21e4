"""Likelihoods of diffusion models in bits per dimension: the probability-flow ODE and the VLB.

sculpt's convention is x = x0 + sigma * eps, and a denoiser is any callable
``D(x, sigma[B]) -> x0_hat``. Two routes:

- `bpd_ode`: the instantaneous change of variables along the probability-flow ODE
  (Song et al. 2021, "Score-Based Generative Modeling through SDEs", sec. D.2), with
  Hutchinson's trace estimator (Grathwohl et al. 2019, FFJORD) or the exact trace.
- `bpd_vlb`: the discrete-time variational bound of DDPM (Ho et al. 2020, eqs. 5 and 13;
  Nichol & Dhariwal 2021's evaluation), for schedules with a table of noise levels.

**Units and dequantisation.** Images with ``bits`` b (levels L = 2^b, 256 for 8 bits) are
stored as v / ((L - 1) / 2) - 1 for integers v in 0..L-1 (exactly `sculpt.images.to_uint8`'s
grid for 8 bits): bins of width Δ = 2 / (L - 1) (2/255) centred on the stored values.
The continuous variable y = v + u, u ~ U(0, 1), lives on [0, L) and maps affinely onto
x = (y - 1/2) Δ - 1, so bin v is [x_v - Δ/2, x_v + Δ/2) and the data cube is
[-1 - Δ/2, 1 + Δ/2]^D. Uniform dequantisation adds U(-Δ/2, Δ/2) (U(-1/255, 1/255)) to each
stored value. Papers report bits per dimension of the discrete 0..L-1 data, i.e. of the
continuous y on [0, L) (a bound by Jensen: log P(v) >= E_u log p_y(v + u)). The Jacobian of
y -> x is Δ per dimension, so

    log p_y(y) = log p_x(x) + D log Δ,
    bpd = -(log p_x(x) + D log Δ) / (D ln 2) = -log p_x(x) / (D ln 2) + log2((L - 1) / 2),

``+ log2(127.5) = 6.994`` bits for 8-bit data. Check: a density uniform on the data cube,
side L Δ, gives exactly b bits per dimension (``bits_per_dim`` is tested for this).
With ``bits=None`` the data are continuous and bpd = -log p_x(x) / (D ln 2).
The VLB's decoder (Ho et al. eq. 13) assigns probability mass to the same bins, so both
routes report bits of the same discrete data.

**Where the ODE starts.** The ODE gives the density of the model's data blurred by
N(0, sigma_min^2), so its bound on the discrete data is E_u[-log p_sigma_min(x_v + u)]
- D log Δ: valid at every sigma_min (each is the likelihood of a proper model), tightest
at a sigma_min that depends on the model. For a model that has learned a point mass at
each bin centre the bound is, per dimension, 1/2 log(2 pi sigma^2) + Δ^2 / (24 sigma^2)
- log Δ nats, least at sigma = Δ / sqrt(12) (the dequantisation noise's own std, 2.26e-3
for 8 bits: `point_mass_sigma`), where it is 1/2 log2(2 pi e / 12) = 0.255 bits/dim
above the exact 0 (2.05 bits at sigma_min = 1e-3). Models of data smooth at the bin
scale (std s) lose O(sigma^2 / s^2) there, nothing to speak of, while for a model of
discretised Gaussian data of std 1 to 10 bins the tightest start is 1.4 to 3 times
Δ / sqrt(12) (by quadrature; the bound is flat there), 0.04-0.06 bits/dim tighter than
at Δ / sqrt(12) itself. So `bpd_ode`
starts at Δ / sqrt(12) by default and `choose_sigma_min` picks, on a pilot set that is
not then scored, the tightest of a few levels around it; the level used is recorded.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sculpt.denoiser import DenoiserFn, add_noise
from sculpt.schedules import Schedule, sigma_to_alpha_sigma

__all__ = [
    "LikelihoodResult",
    "SigmaChoice",
    "bits_per_dim",
    "bpd_ode",
    "bpd_vlb",
    "choose_sigma_min",
    "discretized_gaussian_log_likelihood",
    "point_mass_sigma",
    "quantize",
    "uniform_dequantize",
]

_F64 = torch.float64
SOLVERS = ("rk4", "heun", "dopri5")
PROBES = ("rademacher", "gaussian", "exact")


@dataclass(frozen=True)
class LikelihoodResult:
    """Bits per dimension of a set of samples, with what it took to get them.

    bpd: mean over samples. bpd_stderr: standard error of that mean (sample-to-sample
    spread, which includes dequantisation and probe noise). bpd_per_sample [N].
    log_prob [N]: nats; for the ODE, log p_x of the (dequantised) input in [-1, 1]
    coordinates; for the VLB, the bound on log P(discrete x0). log_prob_stderr [N]: the
    Hutchinson estimator's standard error per sample (ODE with probes >= 2; else None).
    nfe: denoiser evaluations per sample. terms: VLB only, mean nats per term, in the
    order [L_T (prior), L_{T-1}, ..., L_1, L_0 (decoder)] (unvisited terms are NaN when
    timesteps are subsampled).
    """

    bpd: float
    bpd_stderr: float
    bpd_per_sample: np.ndarray
    log_prob: np.ndarray
    nfe: int
    settings: dict[str, Any]
    log_prob_stderr: np.ndarray | None = None
    terms: np.ndarray | None = field(default=None, repr=False)


# ----------------------------------------------------------------------------- units


def _levels(bits: int) -> int:
    if not (isinstance(bits, int) and 1 <= bits <= 16):
        raise ValueError(f"bits must be an integer from 1 to 16 (8 for uint8 images), got {bits!r}")
    return 2**bits


def bits_per_dim(log_prob: Tensor | np.ndarray | float, num_dims: int, bits: int | None = 8) -> np.ndarray:
    """Convert log p_x (nats, density over [-1, 1] coordinates) to bits per dim of b-bit data.

    bpd = -log p_x / (D ln 2) + log2((2^b - 1) / 2); with ``bits=None`` (continuous data)
    the offset is 0. See the module docstring for the derivation.
    """
    log_prob = np.asarray(log_prob.detach().cpu() if isinstance(log_prob, Tensor) else log_prob, dtype=np.float64)
    offset = 0.0 if bits is None else math.log2((_levels(bits) - 1) / 2)
    return -log_prob / (num_dims * math.log(2)) + offset


def point_mass_sigma(bits: int = 8) -> float:
    """Δ / sqrt(12), Δ = 2 / (2^b - 1): the ODE's tightest start for a model of point masses at the bin centres.

    It minimises 1/2 log(2 pi sigma^2) + E[u^2] / (2 sigma^2), u ~ U(-Δ/2, Δ/2), the cost of
    a dequantised point under N(centre, sigma^2); 2.264e-3 for 8 bits.
    """
    return 2 / (_levels(bits) - 1) / math.sqrt(12)


def quantize(x: Tensor, bits: int = 8) -> Tensor:
    """Round to the b-bit grid in [-1, 1]: v = clamp(round((x + 1) (L - 1) / 2), 0, L - 1), back to [-1, 1].

    For 8 bits this is `sculpt.images.to_uint8`'s rounding (half to even) and its inverse.
    """
    half = (_levels(bits) - 1) / 2
    return ((x.to(_F64) + 1) * half).round().clamp(0, 2 * half) / half - 1


def uniform_dequantize(x: Tensor, bits: int = 8, *, generator: torch.Generator | None = None) -> Tensor:
    """Uniform dequantisation: the grid value plus U(-Δ/2, Δ/2) noise, Δ = 2 / (2^b - 1)."""
    delta = 2 / (_levels(bits) - 1)
    noise = torch.rand(x.shape, generator=generator, dtype=_F64).to(x.device)
    return quantize(x, bits) + (noise - 0.5) * delta


# ----------------------------------------------------------------------------- ODE route


def _call(denoiser: DenoiserFn, x: Tensor, sigma: float, dtype: torch.dtype, cond: Mapping[str, Tensor]) -> Tensor:
    """D at a scalar sigma for the whole batch; input in the model's dtype, output float64."""
    sigmas = torch.full((x.shape[0],), sigma, dtype=_F64)
    return denoiser(x.to(dtype), sigmas, **cond).to(_F64)


class _Drift:
    """The PF-ODE in s = log sigma, dx/ds = x - D(x, sigma), and its divergence.

    With f = dx/ds, div f = D - tr(dD/dx) (D the dimension). The trace is exact (one
    vector-Jacobian product per dimension) or Hutchinson's v^T (dD/dx) v with ``probes``
    fixed vectors v, the same along the whole path (so that the integrand is smooth and
    each probe's integral is unbiased).
    """

    def __init__(
        self, denoiser: DenoiserFn, dtype: torch.dtype, cond: Mapping[str, Tensor], probe_vectors: Tensor | None
    ):
        self.denoiser, self.dtype, self.cond = denoiser, dtype, cond
        self.probe_vectors = probe_vectors  # [K, B, ...] or None for the exact trace
        self.nfe = 0

    def __call__(self, x: Tensor, s: float) -> tuple[Tensor, Tensor]:
        """(dx/ds [B, ...], div f per probe [B, K])."""
        self.nfe += 1
        with torch.enable_grad():
            x_in = x.detach().to(self.dtype).requires_grad_(True)
            x0_hat = _call(self.denoiser, x_in, math.exp(s), self.dtype, self.cond)
            dims = x[0].numel()
            flat = lambda t: t.reshape(t.shape[0], -1)
            if self.probe_vectors is None:
                trace = torch.zeros(x.shape[0], dtype=_F64, device=x.device)
                for i in range(dims):
                    basis = torch.zeros_like(flat(x0_hat))
                    basis[:, i] = 1
                    (row,) = torch.autograd.grad(x0_hat, x_in, basis.reshape(x0_hat.shape), retain_graph=True)
                    trace = trace + flat(row.to(_F64))[:, i]
                traces = trace[:, None]
            else:
                columns = []
                for k, v in enumerate(self.probe_vectors):
                    last = k == len(self.probe_vectors) - 1
                    (vjp,) = torch.autograd.grad(x0_hat, x_in, v.to(x0_hat.dtype), retain_graph=not last)
                    columns.append((flat(vjp.to(_F64)) * flat(v)).sum(1))
                traces = torch.stack(columns, dim=1)
        return (x - x0_hat).detach(), (dims - traces).detach()


def _integrate_fixed(drift: _Drift, x: Tensor, s_grid: Tensor, solver: str) -> tuple[Tensor, Tensor]:
    """Fixed-step RK4 or Heun on the grid; returns (x at the end, integral of div per probe)."""
    integral = None
    for s0, s1 in zip(s_grid[:-1].tolist(), s_grid[1:].tolist(), strict=True):
        h = s1 - s0
        if solver == "rk4":
            k1, d1 = drift(x, s0)
            k2, d2 = drift(x + 0.5 * h * k1, s0 + 0.5 * h)
            k3, d3 = drift(x + 0.5 * h * k2, s0 + 0.5 * h)
            k4, d4 = drift(x + h * k3, s1)
            x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
            step = h / 6 * (d1 + 2 * d2 + 2 * d3 + d4)
        else:  # heun
            k1, d1 = drift(x, s0)
            k2, d2 = drift(x + h * k1, s1)
            x = x + h / 2 * (k1 + k2)
            step = h / 2 * (d1 + d2)
        integral = step if integral is None else integral + step
    return x, integral


# Dormand & Prince (1980) RK5(4)7M: nodes, stage weights, 5th-order weights, 5th - 4th difference.
_DP_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_DP_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_DP_B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
_DP_E = (
    35 / 384 - 5179 / 57600,
    0.0,
    500 / 1113 - 7571 / 16695,
    125 / 192 - 393 / 640,
    -2187 / 6784 + 92097 / 339200,
    11 / 84 - 187 / 2100,
    -1 / 40,
)


def _integrate_dopri5(
    drift: _Drift, x: Tensor, s_start: float, s_end: float, first_step: float, rtol: float, atol: float, max_steps: int
) -> tuple[Tensor, Tensor]:
    """Adaptive Dormand-Prince 5(4) with first-same-as-last stages and the standard step controller.

    The error of x is measured as an RMS over all values of the batch; that of the
    divergence integral per sample, relative to its own size, so that the log-density
    is held to the tolerance too. The step size is shared by the batch.
    """
    s, h = s_start, min(first_step, s_end - s_start)
    k_first, d_first = drift(x, s)
    integral = torch.zeros_like(d_first)
    for _ in range(max_steps):
        if s >= s_end - 1e-12 * abs(s_end):
            return x, integral
        h = min(h, s_end - s)
        ks, ds = [k_first], [d_first]
        for stage in range(1, 7):
            a = _DP_A[stage]
            x_stage = x + h * sum(coef * k for coef, k in zip(a, ks, strict=True) if coef)
            k, d = drift(x_stage, s + _DP_C[stage] * h)
            ks.append(k)
            ds.append(d)
        # Stage 7 is evaluated at the 5th-order solution (FSAL): x_new is x_stage of the last stage.
        x_new = x_stage
        step_integral = h * sum(b * d for b, d in zip(_DP_B, ds, strict=True) if b)
        error_x = h * sum(e * k for e, k in zip(_DP_E, ks, strict=True) if e)
        error_d = h * sum(e * d for e, d in zip(_DP_E, ds, strict=True) if e)
        scale_x = atol + rtol * torch.maximum(x.abs(), x_new.abs())
        scale_d = atol + rtol * (integral + step_integral).abs()
        norm = max(
            float(((error_x / scale_x) ** 2).mean().sqrt()),
            float((error_d / scale_d).abs().max()),
        )
        if norm <= 1:
            s, x, integral = s + h, x_new, integral + step_integral
            k_first, d_first = ks[-1], ds[-1]
        factor = 10.0 if norm == 0 else min(10.0, max(0.2, 0.9 * norm ** (-1 / 5)))
        h = h * factor
    raise RuntimeError(
        f"dopri5 needed more than {max_steps} steps (rtol={rtol}, atol={atol}); loosen the "
        "tolerances, or use a fixed-step solver ('rk4') on a log-spaced grid"
    )


def _check_images(x0_images: Tensor) -> None:
    if x0_images.ndim < 2 or x0_images.shape[0] == 0:
        raise ValueError(f"x0_images must be a batch [N, ...] with N >= 1, got shape {tuple(x0_images.shape)}")


def bpd_ode(
    denoiser: DenoiserFn,
    x0_images: Tensor,
    *,
    sigma_max: float,
    sigma_min: float | None = None,
    solver: str = "rk4",
    steps: int = 64,
    probes: int = 1,
    probe: str = "rademacher",
    generator: torch.Generator | None = None,
    dequantize: bool = True,
    bits: int | None = 8,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    max_steps: int = 10_000,
    batch_size: int | None = None,
    cond: Mapping[str, Tensor] | None = None,
) -> LikelihoodResult:
    """Bits per dimension by the probability-flow ODE (Song et al. 2021, instantaneous change of variables).

    Integrates dx/dsigma = (x - D(x, sigma)) / sigma from sigma_min (data side) to
    sigma_max in s = log sigma (where it reads dx/ds = x - D(x, sigma), well conditioned
    over many decades), together with the divergence of the drift; then

        log p_{sigma_min}(x) = log N(x(sigma_max); 0, sigma_max^2 I) + int div(dx/ds) ds.

    The prior N(0, sigma_max^2 I) is Song et al.'s for VE processes. It ignores the data's
    own spread: per sample an error of order |x0| / sigma_max nats (zero on average) plus
    D Var(x0) / (2 sigma_max^2), so take sigma_max >> 1 (80 for EDM models on 32x32x3
    images: under 1e-3 bits/dim). The result is the density of the data blurred by
    N(0, sigma_min^2); ``sigma_min=None`` (with ``bits``) starts at `point_mass_sigma`,
    Δ / sqrt(12), where the bound is tightest for a model that has learned the data are
    discrete and costs smooth models nothing to speak of (module docstring);
    `choose_sigma_min` picks the tightest of a few levels for a given model. Continuous
    data (``bits=None``) need an explicit sigma_min, well below the data's own scale.

    Args:
        denoiser: ``D(x, sigma[B], **cond) -> x0_hat``; called on x in ``x0_images``'s dtype
            (float64 states and integrals otherwise). It must act on each sample alone
            (eval mode). Runs under ``torch.enable_grad`` even if called in no_grad.
        x0_images: [N, ...] in [-1, 1].
        solver: "rk4" (4 evaluations per step) or "heun" (2) on ``steps`` steps uniform in
            log sigma, or "dopri5", adaptive Dormand-Prince with ``rtol``/``atol``
            (``steps`` sets its first step).
        probes, probe: Hutchinson probes per evaluation ("rademacher" or "gaussian"; each a
            vector-Jacobian product), or ``probe="exact"``, the full trace by one VJP per
            dimension (small D only; then ``probes`` is ignored).
        generator: for dequantisation noise and probes.
        dequantize, bits: with ``bits`` (8: uint8 images) the inputs are rounded to the grid
            and, if ``dequantize``, given uniform noise within their bin; bpd is of the
            discrete data (module docstring), an upper bound in expectation. Without
            dequantisation the density at the bin centre times the bin volume estimates the
            bin's mass (no bound). ``bits=None``: continuous data, no rounding.
        batch_size: split the set into batches of this size (the solver's steps are shared
            within a batch; dopri5's depend on the batch).
    """
    _check_images(x0_images)
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; valid: {', '.join(SOLVERS)}")
    if probe not in PROBES:
        raise ValueError(f"unknown probe {probe!r}; valid: {', '.join(PROBES)}")
    if probe != "exact" and probes < 1:
        raise ValueError(f"probes must be >= 1, got {probes}")
    if sigma_min is None:
        if bits is None:
            raise ValueError("continuous data (bits=None) need an explicit sigma_min, well below the data's own scale")
        sigma_min = point_mass_sigma(bits)
    if not math.isfinite(sigma_max):
        raise ValueError(
            f"sigma_max must be finite, got {sigma_max} (a zero-terminal-SNR schedule's sigma_max is inf): "
            "the ODE starts its prior N(0, sigma_max^2) there; pass e.g. min(schedule.sigma_max, 200)"
        )
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max < inf, got {sigma_min}, {sigma_max}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    cond = dict(cond or {})
    dtype = x0_images.dtype
    dims = x0_images[0].numel()
    s_start, s_end = math.log(sigma_min), math.log(sigma_max)
    s_grid = torch.linspace(s_start, s_end, steps + 1, dtype=_F64)
    batch_size = batch_size or x0_images.shape[0]

    log_probs, stderrs, nfe = [], [], 0
    for start in range(0, x0_images.shape[0], batch_size):
        batch = x0_images[start : start + batch_size]
        batch_cond = {key: value[start : start + batch_size] for key, value in cond.items()}
        if bits is None:
            x = batch.to(_F64)
        elif dequantize:
            x = uniform_dequantize(batch, bits, generator=generator)
        else:
            x = quantize(batch, bits)
        if probe == "exact":
            vectors = None
        elif probe == "rademacher":
            vectors = torch.randint(0, 2, (probes, *x.shape), generator=generator).to(_F64) * 2 - 1
        else:
            vectors = torch.randn((probes, *x.shape), generator=generator, dtype=_F64)
        drift = _Drift(denoiser, dtype, batch_cond, None if vectors is None else vectors.to(x.device))
        if solver == "dopri5":
            first = (s_end - s_start) / steps
            x_end, integral = _integrate_dopri5(drift, x, s_start, s_end, first, rtol, atol, max_steps)
        else:
            x_end, integral = _integrate_fixed(drift, x, s_grid, solver)
        prior = -0.5 * (x_end.reshape(x_end.shape[0], -1) ** 2).sum(1) / sigma_max**2 - dims * (
            math.log(sigma_max) + 0.5 * math.log(2 * math.pi)
        )
        per_probe = prior[:, None] + integral  # [B, K]: one unbiased estimate per probe
        log_probs.append(per_probe.mean(1).cpu())
        k = per_probe.shape[1]
        stderrs.append(per_probe.std(1).cpu() / math.sqrt(k) if k > 1 else None)
        nfe = max(nfe, drift.nfe)
    log_prob = torch.cat(log_probs).numpy()
    log_prob_stderr = None if any(e is None for e in stderrs) else torch.cat(stderrs).numpy()
    settings = {
        "method": "ode",
        "sigma_min": sigma_min,
        "sigma_max": sigma_max,
        "solver": solver,
        "steps": steps,
        "probes": None if probe == "exact" else probes,
        "probe": probe,
        "dequantize": bool(dequantize and bits is not None),
        "bits": bits,
        "rtol": rtol if solver == "dopri5" else None,
        "atol": atol if solver == "dopri5" else None,
        "n": int(x0_images.shape[0]),
        "dims": dims,
    }
    return _result(bits_per_dim(log_prob, dims, bits), log_prob, nfe, settings, log_prob_stderr)


@dataclass(frozen=True)
class SigmaChoice:
    """What `choose_sigma_min` found: the level to start at and the pilot bound at each candidate."""

    sigma_min: float
    candidates: tuple[float, ...]
    pilot_bpd: tuple[float, ...]
    pilot_n: int

    def as_record(self) -> dict[str, Any]:
        return {"candidates": list(self.candidates), "pilot_bpd": list(self.pilot_bpd), "pilot_n": self.pilot_n}


#: Multiples of Δ / sqrt(12) that `choose_sigma_min` tries by default (module docstring).
SIGMA_MIN_FACTORS = (0.5, 1.0, 2.0, 4.0)


def choose_sigma_min(
    denoiser: DenoiserFn,
    pilot_images: Tensor,
    *,
    sigma_max: float,
    candidates: tuple[float, ...] | list[float] | None = None,
    bits: int = 8,
    seed: int = 0,
    cond: Mapping[str, Tensor] | None = None,
    **options: Any,
) -> SigmaChoice:
    """The start level of the ODE whose bound is tightest for this model, measured on a pilot set.

    Runs `bpd_ode` from each candidate (default ``SIGMA_MIN_FACTORS`` times
    `point_mass_sigma`) on ``pilot_images`` with the same seed, so the candidates see the
    same dequantisation noise and probes and are compared pair by pair, and returns the
    one with the least mean bits/dim. Every candidate's bound is valid; score other images
    than the pilot's at the chosen level, so that the reported number is not the minimum of
    noisy estimates. ``options`` go to `bpd_ode` (solver, steps, probes, batch_size, ...).
    """
    _check_images(pilot_images)
    if candidates is None:
        candidates = tuple(factor * point_mass_sigma(bits) for factor in SIGMA_MIN_FACTORS)
    candidates = tuple(sorted({float(c) for c in candidates}))
    if not candidates or candidates[0] <= 0 or candidates[-1] >= sigma_max:
        raise ValueError(f"candidates must be noise levels in (0, sigma_max={sigma_max}), got {list(candidates)}")
    bpds = []
    for sigma in candidates:
        result = bpd_ode(
            denoiser,
            pilot_images,
            sigma_min=sigma,
            sigma_max=sigma_max,
            bits=bits,
            generator=torch.Generator().manual_seed(seed),
            cond=cond,
            **options,
        )
        bpds.append(result.bpd)
    best = int(np.argmin(bpds))
    return SigmaChoice(candidates[best], candidates, tuple(bpds), int(pilot_images.shape[0]))


def _result(
    bpd: np.ndarray,
    log_prob: np.ndarray,
    nfe: int,
    settings: dict[str, Any],
    log_prob_stderr: np.ndarray | None = None,
    terms: np.ndarray | None = None,
) -> LikelihoodResult:
    n = bpd.shape[0]
    stderr = float(bpd.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    return LikelihoodResult(float(bpd.mean()), stderr, bpd, log_prob, nfe, settings, log_prob_stderr, terms)


# ----------------------------------------------------------------------------- VLB route


def _log_normal_cdf_difference(upper: Tensor, lower: Tensor) -> Tensor:
    """log(Phi(upper) - Phi(lower)) for upper > lower, accurate in both tails.

    Where lower > 0 both CDFs are near 1; the reflection Phi(b) - Phi(a) = Phi(-a) - Phi(-b)
    turns that into a difference of small tails, which log_ndtr keeps to full precision.
    """
    flip = lower > 0
    high = torch.where(flip, -lower, upper)
    low = torch.where(flip, -upper, lower)
    log_high, log_low = torch.special.log_ndtr(high), torch.special.log_ndtr(low)
    return log_high + torch.log1p(-torch.exp(log_low - log_high))


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, std: Tensor | float, bits: int = 8) -> Tensor:
    """Ho et al. 2020, eq. 13: log of the N(mean, std^2) mass of each value's bin, summed per sample.

    Bins are [x - Δ/2, x + Δ/2], Δ = 2 / (2^b - 1) (x ± 1/255 for 8 bits), except that the
    bin of -1 reaches down to -inf and that of +1 up to +inf, so the masses sum to 1.
    ``x`` must lie on the grid (see `quantize`). Returns float64 [N] (nats).
    """
    half_bin = 1 / (_levels(bits) - 1)
    x, mean = x.to(_F64), mean.to(_F64)
    std = torch.as_tensor(std, dtype=_F64, device=x.device)
    upper = torch.where(x > 1 - half_bin, math.inf, (x + half_bin - mean) / std)
    lower = torch.where(x < -1 + half_bin, -math.inf, (x - half_bin - mean) / std)
    return _log_normal_cdf_difference(upper, lower).reshape(x.shape[0], -1).sum(1)


def bpd_vlb(
    denoiser: DenoiserFn,
    schedule: Schedule,
    x0_images: Tensor,
    *,
    timesteps: int | None = None,
    bits: int = 8,
    clip_denoised: bool = True,
    decoder_variance: str = "posterior",
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
    sampling: str = "logsnr",
    return_terms: bool = False,
    cond: Mapping[str, Tensor] | None = None,
) -> LikelihoodResult:
    """Bits per dimension from the DDPM variational bound (Ho et al. 2020; Nichol & Dhariwal 2021).

    With the schedule's T noise levels sigma_1 < ... < sigma_T (``schedule.sigmas``) and
    the forward process q(x_t | x0) = N(x0, sigma_t^2 I) (VP: scaled by sqrt(alpha_bar_t)),

        -log P(x0) <= L_T + sum_{t=2..T} L_{t-1} + L_0,
        L_T     = KL(q(x_T | x0) || N(0, I)) in VP form
                = 1/2 sum_i (alpha_bar_T x0_i^2 + (1 - alpha_bar_T) - 1 - log(1 - alpha_bar_T)),
        L_{t-1} = KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t))
                = 1/2 (1/sigma_{t-1}^2 - 1/sigma_t^2) ||x0 - D(x_t, sigma_t)||^2,
        L_0     = -log p(x0 | x_1), the discretised Gaussian (eq. 13) with mean D(x_1, sigma_1).

    The reverse steps use the model's posterior mean (the true posterior's with x0 replaced
    by D, clipped to [-1, 1] if ``clip_denoised``, as the published evaluation code does)
    and Ho's "fixed_small" variance, the true posterior variance beta~_t; with equal
    variances the KL is the squared distance of the means, which reduces to the SNR-
    difference form above (the VDM form, Kingma et al. 2021). The decoder's variance is
    ``decoder_variance="posterior"``: beta~_2 (beta~_1 = 0; Nichol & Dhariwal's clipped
    log-variance, the default), in sigma terms sigma_1^2 (sigma_2^2 - sigma_1^2) /
    ((1 + sigma_1^2) sigma_2^2); or ``"beta"``: beta_1 = sigma_1^2 / (1 + sigma_1^2) (Ho et
    al.'s sigma_1^2 = beta_1). beta~_2 shrinks with the first step's size, so on fine grids
    the "posterior" decoder is over-confident and "beta" is the tighter bound.

    How tight: where the data look continuous (E||x0 - D||^2 ~ sigma^2 per dimension), a
    step from sigma_{t-1} to sigma_t = r sigma_{t-1} costs 1/2 (r^2 - 1) - ln r ~ (r - 1)^2
    nats per dimension more than the continuous-time bound. The 1000-step linear schedule
    starts with r = 1.48, 1.28, 1.20, ..., about 0.6-0.7 bits/dim in all for data smooth
    below the bin scale; learned models of real images, which learn that the data are
    discrete, lose much less.

    ``timesteps=k`` estimates the sum over t = 2..T without bias by stratified importance
    sampling: each sample draws k timesteps t_j = Q^-1((j + u_j) / k), u_j ~ U(0, 1), from
    the proposal q (CDF Q) and weights each term by 1 / (k q(t_j)). ``sampling="uniform"``
    takes q(t) = 1 / (T - 1), the plain (T - 1) / k scaling; ``"logsnr"`` (default) takes
    q(t) proportional to log(s_t / s_{t-1}) with s = sigma / sqrt(1 + sigma^2), the VP
    noise std: the log-SNR each step covers where sigma << 1, which is where the terms are
    large (uniform sampling rarely draws the first, largest terms, and its estimate is
    heavy-tailed), falling off like the terms themselves where sigma >> 1 (it is the
    continuous-time VLB of unit-variance Gaussian data, 1/2 log(1 + SNR) between the two
    levels). L_T and L_0 are always exact.

    Zero terminal SNR (sigma_T = inf, `sculpt.schedules.rescale_zero_terminal_snr`): the
    limits are taken exactly. x_T holds the unit noise (sculpt's convention for sigma = inf),
    L_T = 0 (q(x_T | x0) is the prior), L_{T-1} = 1/2 ||x0 - D(x_T, inf)||^2 / sigma_{T-1}^2
    (q(x_{T-1} | x_T, x0) = q(x_{T-1} | x0) there), and the proposal's last weight is
    -log s_{T-1}, finite.
    Each term draws fresh noise for x_t. The result is in bits per dim of the discrete
    b-bit data (inputs are rounded to the grid first), directly comparable with `bpd_ode`
    on dequantised data. ``nfe`` is the number of denoiser calls per sample.
    """
    _check_images(x0_images)
    if not schedule.num_steps:
        raise ValueError(
            f"bpd_vlb needs a discrete schedule (DDPM-style, with num_steps and a sigmas table); "
            f"{schedule.name!r} is continuous: use bpd_ode"
        )
    if decoder_variance not in ("posterior", "beta"):
        raise ValueError(f"decoder_variance must be 'posterior' or 'beta', got {decoder_variance!r}")
    sigmas = schedule.sigmas.to(_F64)  # [T]: Ho's t = 1..T at index t - 1
    num_steps = sigmas.shape[0]
    num_kl = num_steps - 1  # the terms L_1 .. L_{T-1}, from t = 2..T
    if timesteps is not None and timesteps < 1:
        raise ValueError(f"timesteps must be >= 1 (or None for all {num_steps}), got {timesteps}")
    if sampling not in ("logsnr", "uniform"):
        raise ValueError(f"sampling must be 'logsnr' or 'uniform', got {sampling!r}")
    strata = num_kl if timesteps is None else min(timesteps, num_kl)
    if sampling == "logsnr":
        vp_std = sigma_to_alpha_sigma(sigmas)[1]  # sigma / sqrt(1 + sigma^2): 1 at sigma = inf
        proposal = torch.log(vp_std[1:] / vp_std[:-1])
    else:
        proposal = torch.ones(num_kl, dtype=_F64)
    proposal = proposal / proposal.sum()  # q over t = 2..T (index t - 2)
    cdf = torch.cumsum(proposal, 0)
    s1, s2 = float(sigmas[0]), float(sigmas[1])
    if decoder_variance == "posterior":
        decoder_std = math.sqrt(s1**2 * (s2**2 - s1**2) / ((1 + s1**2) * s2**2))  # sqrt(beta~_2)
    else:
        decoder_std = math.sqrt(s1**2 / (1 + s1**2))  # sqrt(beta_1)
    alpha_bar_T = 1 / (1 + float(sigmas[-1]) ** 2)  # 0 at zero terminal SNR: L_T = 0
    cond = dict(cond or {})
    dtype = x0_images.dtype
    dims = x0_images[0].numel()
    batch_size = batch_size or x0_images.shape[0]
    flat = lambda t: t.reshape(t.shape[0], -1)

    def denoise(x0: Tensor, sigma: Tensor, batch_cond: dict[str, Tensor]) -> Tensor:
        noise = torch.randn(x0.shape, generator=generator, dtype=_F64).to(x0.device)
        x_t = add_noise(x0, sigma, noise)  # the noise itself where sigma = inf
        x0_hat = denoiser(x_t.to(dtype), sigma, **batch_cond).to(_F64)
        return x0_hat.clamp(-1, 1) if clip_denoised else x0_hat

    nlls = []
    term_sums = torch.zeros(num_steps + 1, dtype=_F64)  # [L_T, L_{T-1}, ..., L_1, L_0]
    term_counts = torch.zeros(num_steps + 1, dtype=_F64)
    with torch.no_grad():
        for start in range(0, x0_images.shape[0], batch_size):
            x0 = quantize(x0_images[start : start + batch_size], bits)
            n = x0.shape[0]
            batch_cond = {key: value[start : start + batch_size] for key, value in cond.items()}
            # L_T: the prior term in VP coordinates, alpha_bar_T = 1 / (1 + sigma_T^2).
            # At alpha_bar_T = 0 every term is 0 exactly (-log1p(-0) = 0).
            prior = 0.5 * (alpha_bar_T * flat(x0) ** 2 + (1 - alpha_bar_T) - 1 - math.log1p(-alpha_bar_T)).sum(1)
            total = prior.clone()
            term_sums[0] += prior.sum()
            term_counts[0] += n
            for j in range(strata):
                if strata == num_kl:  # every term, weight 1
                    t, weight = torch.full((n,), j + 2), torch.ones(n, dtype=_F64)
                else:
                    u = (j + torch.rand(n, generator=generator, dtype=_F64)) / strata
                    index = torch.searchsorted(cdf, u.contiguous(), right=True).clamp(max=num_kl - 1)
                    t, weight = index + 2, 1 / (strata * proposal[index])
                sigma_t, sigma_prev = sigmas[t - 1], sigmas[t - 2]
                snr_gap = (1 / sigma_prev**2 - 1 / sigma_t**2).to(x0.device)  # 1 / inf^2 = 0: finite
                term = 0.5 * snr_gap * (flat(x0 - denoise(x0, sigma_t, batch_cond)) ** 2).sum(1)
                total += weight.to(x0.device) * term
                slot = num_steps + 1 - t  # L_{t-1} sits at index T + 1 - t
                term_sums.index_add_(0, slot, term.cpu())
                term_counts.index_add_(0, slot, torch.ones(n, dtype=_F64))
            x0_hat = denoise(x0, torch.full((n,), s1, dtype=_F64), batch_cond)
            decoder = -discretized_gaussian_log_likelihood(x0, x0_hat, decoder_std, bits)
            total += decoder
            term_sums[-1] += decoder.sum()
            term_counts[-1] += n
            nlls.append(total.cpu())
    nll = torch.cat(nlls).numpy()
    terms = (term_sums / term_counts).numpy() if return_terms else None  # NaN where never visited
    settings = {
        "method": "vlb",
        "schedule": schedule.name,
        "num_steps": num_steps,
        "timesteps": strata,
        "bits": bits,
        "clip_denoised": clip_denoised,
        "decoder_variance": decoder_variance,
        "sampling": sampling if strata < num_kl else "all",
        "n": int(x0_images.shape[0]),
        "dims": dims,
    }
    bpd = nll / (dims * math.log(2))  # discrete data: no Jacobian term
    return _result(bpd, -nll, strata + 1, settings, None, terms)
