"""Samplers: one plain function each, ``sampler(D, x, sigmas, *, generator, callback, **options) -> x``.

D is any ``DenoiserFn``, ``D(x, sigma[B]) -> x0_hat`` (a ``Denoiser``, a guided wrapper,
a closed-form denoiser); ``sigmas`` is a decreasing grid (see ``sculpt.schedules.GRIDS``)
or any segment of one: a teacher's two steps are ``ddim(D, x, sigmas[i:i + 3])``, and
only ``sample`` insists on ending at 0. No sampler branches on the prediction target or
keeps state between calls, so a multistep method restarts its history on each segment.
Every update is written with x0_hat and eps_hat = (x - x0_hat)/sigma only, which makes
a first step from sigma = inf (zero terminal SNR, where x holds the unit noise) exact
without special cases.

In sigma coordinates several classic algorithms coincide, which the code makes plain:
DDIM (eta = 0) is the Euler method on the probability-flow ODE; DDPM's ancestral step
is DDIM with eta = 1; k-diffusion's Euler-ancestral is the same step again.

Denoiser calls (NFE) for ``steps`` = len(sigmas) - 1:

=================  ==============  ===========================================
sampler            NFE             kind
=================  ==============  ===========================================
ddpm               steps           ancestral, Ho et al. 2020 posterior variance
ddim               steps           Song et al. 2021; eta = 0 deterministic
euler              steps           1st-order ODE (= ddim, eta = 0)
euler_ancestral    steps           = ddim with eta (default 1)
heun               2 steps - 1     2nd-order ODE, EDM Alg. 2 with churn
dpmpp_2m           steps           DPM-Solver++(2M), 2nd-order multistep ODE
dpmpp_3m           steps           DPM-Solver++(3M) as published (2nd order measured)
ipndm              steps           iPNDM (Zhang & Chen 2023), Adams-Bashforth in sigma
ipndm3             steps           iPNDM with its order capped at 3
ipndm_v            steps           iPNDM with variable-step weights
dpmpp_2m_sde       steps           DPM-Solver++(2M) SDE, midpoint
unipc              steps           UniPC-bh2 predictor-corrector, order 3 (Zhao et al. 2023)
consistency        steps           multistep consistency sampling (Song et al. 2023)
=================  ==============  ===========================================

The counts are for a grid from a finite sigma_max to 0. heun spends one call on a step
to 0 or from sigma = inf and two on every other, so a segment ending above 0 costs 2 steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .denoiser import DenoiserFn
from .runtime import autocast
from .schedules import Schedule, _check_steps, cosine_uniform, grid, resolve_spacing

__all__ = [
    "SAMPLERS",
    "NFE",
    "StepInfo",
    "ddpm",
    "ddim",
    "euler",
    "euler_ancestral",
    "heun",
    "dpmpp_2m",
    "dpmpp_3m",
    "ipndm",
    "ipndm3",
    "ipndm_v",
    "dpmpp_2m_sde",
    "unipc",
    "consistency",
    "check_sigmas",
    "AUTO",
    "auto_sampler",
    "resolve_sampling",
    "resolve_first_step",
    "first_step_of",
    "analytic_grid",
    "analytic_start",
    "FIRST_STEPS",
    "sample",
    "generate",
    "class_rows",
]

Callback = Callable[["StepInfo"], None]


@dataclass(frozen=True)
class StepInfo:
    """What a sampler reports after each step (for progress bars and trajectory pictures)."""

    index: int  #: step number, 0 .. steps - 1
    sigma: float  #: noise level the step started from
    sigma_next: float  #: noise level it reached
    x: Tensor  #: the state after the step (at sigma_next)
    x0_hat: Tensor  #: the denoiser's estimate of the clean image at sigma


def check_sigmas(sigmas: Tensor | list[float], *, end_at_zero: bool = True) -> Tensor:
    """Validate a step grid: 1-D, >= 2 entries, non-negative, strictly decreasing, ending in 0.

    ``end_at_zero=False`` accepts any segment of a grid (what every sampler takes): the
    same checks without the final 0. Returns the grid as float64 on the CPU.
    """
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64).detach().cpu()
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError(f"sigmas must be a 1-D grid with at least 2 entries (got shape {tuple(sigmas.shape)})")
    if torch.isnan(sigmas).any() or (sigmas < 0).any():
        raise ValueError("sigmas must be >= 0 and not NaN (noise levels of x = x0 + sigma * eps)")
    if not (sigmas[1:] < sigmas[:-1]).all():
        raise ValueError("sigmas must be strictly decreasing (a grid runs from noise to data)")
    if math.isinf(sigmas[1]):
        raise ValueError("only the first sigma may be infinite")
    if end_at_zero and sigmas[-1] != 0:
        raise ValueError(f"sigmas must end in 0 (got {sigmas[-1].item():.4g}); append 0 to finish at the data")
    return sigmas


def _denoise(D: DenoiserFn, x: Tensor, sigma: float) -> tuple[Tensor, Tensor]:
    """x0_hat and eps_hat at one noise level, with the checks every sampler needs."""
    x0_hat = D(x, x.new_full((x.shape[0],), sigma if math.isfinite(sigma) else math.inf))
    if not isinstance(x0_hat, Tensor) or x0_hat.shape != x.shape:
        shape = tuple(x0_hat.shape) if isinstance(x0_hat, Tensor) else type(x0_hat).__name__
        raise ValueError(
            f"the denoiser returned {shape} for input of shape {tuple(x.shape)}; it must return x0_hat of that shape"
        )
    if not torch.isfinite(x0_hat).all():
        raise ValueError(
            f"the denoiser returned NaN or inf at sigma={sigma:.4g}; check the model weights, "
            "its dtype (fp16 overflows), and that an eps model is not asked to denoise at sigma = inf"
        )
    # At sigma = inf the state is the unit noise itself: eps_hat = x exactly.
    eps_hat = x if math.isinf(sigma) else (x - x0_hat) / sigma
    return x0_hat, eps_hat


def _ratio(sigma_next: float, sigma: float) -> float:
    """sigma_next / sigma, 0 when sigma is infinite."""
    return 0.0 if math.isinf(sigma) else sigma_next / sigma


def _noise_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    # Drawn on the generator's device so CPU generators give the same numbers everywhere.
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def _report(callback: Callback | None, i: int, sigma: float, sigma_next: float, x: Tensor, x0_hat: Tensor) -> None:
    if callback is not None:
        callback(StepInfo(i, sigma, sigma_next, x, x0_hat))


def _steps(sigmas: Tensor) -> list[tuple[int, float, float]]:
    """(index, sigma, sigma_next) of each step of a grid segment (it need not end in 0)."""
    values = check_sigmas(sigmas, end_at_zero=False).tolist()
    return [(i, values[i], values[i + 1]) for i in range(len(values) - 1)]


def _ancestral_split(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """(sigma_down, sigma_up) of an ancestral step: sigma_down^2 + sigma_up^2 = sigma_next^2.

    sigma_up = eta * sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2) is DDIM's sigma_t
    written in sigma coordinates; eta = 1 makes it DDPM's posterior standard deviation.
    """
    if eta == 0 or sigma_next == 0:
        return sigma_next, 0.0
    r = _ratio(sigma_next, sigma)
    sigma_up = min(sigma_next, eta * sigma_next * math.sqrt(max(1 - r * r, 0.0)))
    return math.sqrt(max(sigma_next**2 - sigma_up**2, 0.0)), sigma_up


def ddim(
    D: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    eta: float = 0.0,
) -> Tensor:
    """DDIM (Song et al. 2021): x_next = x0_hat + sigma_down eps_hat + sigma_up z.

    eta = 0 is deterministic (the Euler method in sigma); eta = 1 is DDPM's ancestral step.
    """
    for i, sigma, sigma_next in _steps(sigmas):
        x0_hat, eps_hat = _denoise(D, x, sigma)
        sigma_down, sigma_up = _ancestral_split(sigma, sigma_next, eta)
        x = x0_hat + sigma_down * eps_hat
        if sigma_up > 0:
            x = x + sigma_up * _noise_like(x, generator)
        _report(callback, i, sigma, sigma_next, x, x0_hat)
    return x


def ddpm(
    D: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """DDPM ancestral sampling (Ho et al. 2020) with the posterior variance ("fixed small").

    In sigma coordinates the posterior q(x_s | x_t, x0) is
    N(x0 + (s^2/t^2)(x_t - x0), s^2 (t^2 - s^2)/t^2), which is DDIM's step with eta = 1.
    Run it on every level of a discrete schedule (steps = num_steps) for the original.
    """
    return ddim(D, x, sigmas, generator=generator, callback=callback, eta=1.0)


def euler(
    D: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """Euler's method on the probability-flow ODE dx/dsigma = eps_hat (Karras et al. 2022)."""
    return ddim(D, x, sigmas, generator=generator, callback=callback, eta=0.0)


def euler_ancestral(
    D: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    eta: float = 1.0,
) -> Tensor:
    """Euler ancestral (k-diffusion): an Euler step to sigma_down, then fresh noise sigma_up."""
    return ddim(D, x, sigmas, generator=generator, callback=callback, eta=eta)


def heun(
    D: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
) -> Tensor:
    """Heun's 2nd-order method, EDM Algorithm 2 (Karras et al. 2022); churn 0 gives Algorithm 1.

    With churn, noise raises sigma to sigma_hat = sigma (1 + gamma) before each step;
    gamma = s_churn / steps counts the steps of the grid given, so on a segment pass the
    segment's share of the full grid's s_churn. A step to sigma = 0 and a first step from
    sigma = inf are Euler steps: the trapezoid needs a finite interval with a denoiser call
    at its far end. A segment that ends above 0 ends with a full Heun step.
    """
    steps = _steps(sigmas)
    gamma_max = min(s_churn / len(steps), math.sqrt(2) - 1)
    for i, sigma, sigma_next in steps:
        gamma = gamma_max if s_tmin <= sigma <= s_tmax and math.isfinite(sigma) else 0.0
        sigma_hat = sigma * (1 + gamma)
        if gamma > 0:
            x = x + s_noise * math.sqrt(sigma_hat**2 - sigma**2) * _noise_like(x, generator)
        x0_hat, eps_hat = _denoise(D, x, sigma_hat)
        x_next = x0_hat + sigma_next * eps_hat  # Euler: x + (sigma_next - sigma_hat) eps_hat
        if sigma_next > 0 and math.isfinite(sigma_hat):
            x0_next, eps_next = _denoise(D, x_next, sigma_next)
            x_next = x + (sigma_next - sigma_hat) * (eps_hat + eps_next) / 2
        x = x_next
        _report(callback, i, sigma, sigma_next, x, x0_hat)
    return x


def _lambda(sigma: float) -> float:
    """log-SNR / 2 = -log sigma (DPM-Solver's lambda); -inf at sigma = inf, +inf at 0."""
    return -math.log(sigma) if sigma > 0 else math.inf


def _data_step(x0_hat: Tensor, eps_hat: Tensor, sigma: float, sigma_next: float, d: Tensor) -> Tensor:
    """Exponential-integrator step in data prediction: x_next = (s'/s) x + (1 - s'/s) d.

    Written as s' eps_hat + (s'/s) x0_hat + (1 - s'/s) d since x = x0_hat + s eps_hat;
    d is the (extrapolated) data estimate. With d = x0_hat it is DDIM.
    """
    r = _ratio(sigma_next, sigma)
    return sigma_next * eps_hat + r * x0_hat + (1 - r) * d


def dpmpp_2m(
    D: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022): 2nd-order multistep in log-SNR with data prediction."""
    x0_prev, h_prev = None, None
    for i, sigma, sigma_next in _steps(sigmas):
        x0_hat, eps_hat = _denoise(D, x, sigma)
        h = _lambda(sigma_next) - _lambda(sigma)
        d = x0_hat
        # A step to 0 is exact with d = x0_hat (h = inf); any step above 0, a segment's last included, is 2nd order.
        if x0_prev is not None and sigma_next > 0:
            c = h / (2 * h_prev)  # 1 / (2 r), r = h_prev / h; 0 after a step from infinity
            d = (1 + c) * x0_hat - c * x0_prev
        x = _data_step(x0_hat, eps_hat, sigma, sigma_next, d)
        x0_prev, h_prev = x0_hat, h
        _report(callback, i, sigma, sigma_next, x, x0_hat)
    return x


def _phi_weights(h: float) -> tuple[float, float, float]:
    """Integrals of e^{-(h - s)} s^k / k! over [0, h] for k = 0, 1, 2 (exponential-integrator weights)."""
    i0 = -math.expm1(-h)  # 1 - e^{-h}
    return i0, h - i0, h * h / 2 - h + i0


def _extrapolated_data(x0_hat: Tensor, lam: float, history: list[tuple[float, Tensor]], h: float) -> Tensor:
    """DPM-Solver++(3M)'s data estimate d, with x_next = r x + (1 - r) d.

    Newton's divided differences give p'(lam) and the second divided difference c of the
    polynomial p through the history. The step integrates p' against its phi-weight and c
    (not p'' = 2c) against the next one, as the published method does (Lu et al. 2022, the
    official code and k-diffusion). The Taylor-consistent 2c makes a 3rd-order method, but
    it lost to this one at every NFE from 3 to 20 on benchmarks/samplers.py's mixtures (by
    up to 1.9x), so it is not kept.
    """
    i0, i1, i2 = _phi_weights(h)
    lam1, x01 = history[-1]
    slope = (x0_hat - x01) / (lam - lam1)
    if len(history) < 2:
        return x0_hat + (i1 / i0) * slope
    lam2, x02 = history[-2]
    curvature = (slope - (x01 - x02) / (lam1 - lam2)) / (lam - lam2)
    first = slope + curvature * (lam - lam1)  # p'(lam)
    return x0_hat + (i1 / i0) * first + (i2 / i0) * curvature


def dpmpp_3m(
    D: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """DPM-Solver++(3M) as published (Lu et al. 2022; the official code, k-diffusion's dpmpp_3m_sde at eta 0).

    Data prediction, multistep in lambda = -log sigma through the last three estimates. Its
    second-difference term is half the Taylor-consistent one, so the measured global order
    is 2, not 3. Lower order on the first two steps (of each segment: the history starts
    with the call) and on a step to sigma = 0, where the exact step is x0_hat itself.
    """
    history: list[tuple[float, Tensor]] = []  # (lambda, x0_hat) at finite lambda, newest last
    for i, sigma, sigma_next in _steps(sigmas):
        x0_hat, eps_hat = _denoise(D, x, sigma)
        lam = _lambda(sigma)
        d = x0_hat
        if sigma_next > 0 and history and math.isfinite(lam):
            d = _extrapolated_data(x0_hat, lam, history[-2:], _lambda(sigma_next) - lam)
        x = _data_step(x0_hat, eps_hat, sigma, sigma_next, d)
        if math.isfinite(lam):
            history.append((lam, x0_hat))
        _report(callback, i, sigma, sigma_next, x, x0_hat)
    return x


#: Adams-Bashforth coefficients for equal steps, newest first (iPNDM's fixed multistep weights).
_ADAMS_BASHFORTH = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def _adams_bashforth_weights(nodes: list[float], start: float, end: float) -> list[float]:
    """Variable-step Adams-Bashforth: w_j = (1 / (end - start)) integral_start^end L_j(s) ds.

    L_j is the Lagrange basis polynomial of ``nodes`` (newest first); integrating the
    polynomial through the slopes at the nodes exactly gives a step of order len(nodes).
    Computed in the shifted variable s - start, where the numbers stay of order one.
    """
    span = end - start
    points = [(node - start) / span for node in nodes]
    weights = []
    for j, pj in enumerate(points):
        coefficients = [1.0]  # polynomial in u = (s - start) / span, lowest power first
        for m, pm in enumerate(points):
            if m == j:
                continue
            scale = 1 / (pj - pm)
            shifted = [0.0] + coefficients  # u * p(u)
            coefficients = [(a - pm * b) * scale for a, b in zip(shifted, coefficients + [0.0], strict=True)]
        weights.append(sum(c / (k + 1) for k, c in enumerate(coefficients)))  # integral over u in [0, 1]
    return weights


def _ipndm_loop(
    D: DenoiserFn, x: Tensor, sigmas: Tensor, callback: Callback | None, order: int, variable: bool
) -> Tensor:
    if order not in _ADAMS_BASHFORTH:
        raise ValueError(f"ipndm order must be 1, 2, 3 or 4 (got {order})")
    history: list[tuple[float, Tensor]] = []  # (sigma, eps_hat) at finite sigma, newest first
    for i, sigma, sigma_next in _steps(sigmas):
        x0_hat, eps_hat = _denoise(D, x, sigma)
        if math.isinf(sigma):
            x = x0_hat + sigma_next * eps_hat  # from pure noise the exact step is DDIM's
        else:
            history = [(sigma, eps_hat), *history][:order]
            if variable:
                weights = _adams_bashforth_weights([s for s, _ in history], sigma, sigma_next)
            else:
                weights = _ADAMS_BASHFORTH[len(history)]
            slope = sum(w * e for w, (_, e) in zip(weights, history, strict=True))
            x = x + (sigma_next - sigma) * slope
        _report(callback, i, sigma, sigma_next, x, x0_hat)
    return x


def ipndm(
    D: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    order: int = 4,
) -> Tensor:
    """iPNDM (Zhang & Chen 2023, the DEIS paper): Adams-Bashforth on dx/dsigma = eps_hat, fixed weights.

    The slope of each step is the equal-step Adams-Bashforth combination of the last
    ``order`` eps_hat (order 1, 2, 3, 4 as the history grows), whatever the step sizes;
    the GITS and AMED papers' best solver at NFE 5. A step from sigma = inf is DDIM's, and
    the history restarts on each segment.
    """
    return _ipndm_loop(D, x, sigmas, callback, order, variable=False)


def ipndm3(
    D: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """iPNDM with its order capped at 3: the best solver on exact denoisers from 4 to 9 steps.

    On few-step grids the 4th-order extrapolation overshoots at 4 and 6 steps (benchmarks/defaults.py);
    with 3 steps or fewer it is ``ipndm`` itself. On trained networks ``unipc`` is better (``auto_sampler``).
    """
    return _ipndm_loop(D, x, sigmas, callback, 3, variable=False)


def ipndm_v(
    D: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    order: int = 4,
) -> Tensor:
    """iPNDM with variable-step Adams-Bashforth weights (the AMED code's ``ipndm_v``).

    The slope integrates the polynomial through the last ``order`` (sigma, eps_hat) exactly
    over the step, so uneven grids keep the method's order.
    """
    return _ipndm_loop(D, x, sigmas, callback, order, variable=True)


def dpmpp_2m_sde(
    D: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> Tensor:
    """DPM-Solver++(2M) SDE (Lu et al. 2022; k-diffusion's midpoint variant)."""
    x0_prev, h_prev = None, None
    for i, sigma, sigma_next in _steps(sigmas):
        x0_hat, eps_hat = _denoise(D, x, sigma)
        if sigma_next == 0:
            x = x0_hat
        else:
            h = _lambda(sigma_next) - _lambda(sigma)
            eta_h = eta * h if eta > 0 else 0.0  # 0 * inf is NaN: from sigma = inf with eta = 0 this is DDIM
            decay = _ratio(sigma_next, sigma) * math.exp(-eta_h)  # multiplies x
            # decay * x = decay * x0_hat + decay * sigma * eps_hat; decay * sigma = s' e^{-eta h}
            x = decay * x0_hat + sigma_next * math.exp(-eta_h) * eps_hat
            x = x + (-math.expm1(-h - eta_h)) * x0_hat
            if x0_prev is not None and math.isfinite(h_prev):
                r = h_prev / h
                x = x + 0.5 * (-math.expm1(-h - eta_h)) * (1 / r) * (x0_hat - x0_prev)
            if eta > 0:
                x = x + _noise_like(x, generator) * sigma_next * math.sqrt(-math.expm1(-2 * eta_h)) * s_noise
            x0_prev, h_prev = x0_hat, h
        _report(callback, i, sigma, sigma_next, x, x0_hat)
    return x


def _unipc_coefficients(h: float, rks: list[float]) -> tuple[Tensor, Tensor]:
    """UniPC's linear system (Zhao et al. 2023, Alg. 2 with B(h) = e^h - 1): R rho = b.

    R[i, k] = rks[k]^i and b_i = i! phi_{i+1}(h) / B(h), in data prediction (hh = -h).
    """
    hh = -h
    b_h = math.expm1(hh)
    h_phi_k = b_h / hh - 1
    factorial = 1
    b = []
    for i in range(1, len(rks) + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    r = torch.tensor(rks, dtype=torch.float64)
    R = torch.stack([r**i for i in range(len(rks))])
    return R, torch.tensor(b, dtype=torch.float64)


def _unipc_data(
    x0_hat: Tensor, lam: float, h: float, history: list[tuple[float, Tensor]], x0_new: Tensor | None
) -> Tensor:
    """The data estimate d of a UniP predictor (x0_new None) or UniC corrector step.

    history holds the earlier (lambda, x0_hat) pairs, newest last, excluding (lam, x0_hat).
    The update is x_next = r x + (1 - r) d, as for every data-prediction step here.
    """
    rks = [(lam_k - lam) / h for lam_k, _ in reversed(history)]
    diffs = [(x0_k - x0_hat) / rk for rk, (_, x0_k) in zip(rks, reversed(history), strict=True)]
    if x0_new is not None:  # the corrector also uses the fresh estimate at lambda + h (rk = 1)
        rks.append(1.0)
        diffs.append(x0_new - x0_hat)
        if len(rks) == 1:
            rhos = torch.tensor([0.5], dtype=torch.float64)
        else:
            R, b = _unipc_coefficients(h, rks)
            rhos = torch.linalg.solve(R, b)
    elif not diffs:
        return x0_hat
    elif len(diffs) == 1:
        rhos = torch.tensor([0.5], dtype=torch.float64)
    else:
        R, b = _unipc_coefficients(h, rks + [1.0])
        rhos = torch.linalg.solve(R[:-1, :-1], b[:-1])
    # x_next = r x - B(h) (1 - r)... in data form: (1 - r) d = (1 - r) x0_hat - B(h) sum rho_k D_k,
    # and B(h) = e^{-h} - 1 = -(1 - r), so d = x0_hat + sum rho_k D_k.
    return x0_hat + sum(float(rho) * diff for rho, diff in zip(rhos, diffs, strict=True))


def unipc(
    D: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    order: int = 3,
) -> Tensor:
    """UniPC (Zhao et al. 2023), B(h) = e^h - 1 ("bh2"), data prediction, multistep.

    Each step predicts with UniP of the given order, and the next denoiser call, made
    anyway, also corrects that prediction (UniC) at no extra NFE. Orders drop near the
    start (not enough history) and the end of the grid given (diffusers' lower_order_final,
    which on a segment ending above 0 makes its last step a DDIM step: still consistent,
    and the last prediction has no next call to correct it); a step to sigma = 0 returns
    x0_hat.
    """
    if order not in (1, 2, 3):
        raise ValueError(f"unipc order must be 1, 2 or 3 (got {order})")
    steps = _steps(sigmas)
    history: list[tuple[float, Tensor]] = []  # finite (lambda, x0_hat), newest last
    last: tuple[Tensor, float, int] | None = None  # (x before the previous step, its sigma, its order)
    for i, sigma, sigma_next in steps:
        x0_hat, eps_hat = _denoise(D, x, sigma)
        lam = _lambda(sigma)
        if last is not None and math.isfinite(last[1]):
            x_last, sigma_last, last_order = last
            lam_last, x0_last = history[-1]
            older = history[:-1][len(history) - last_order :]  # the last_order - 1 before it
            d = _unipc_data(x0_last, lam_last, lam - lam_last, older, x0_hat)
            x = _data_step_from(x_last, x0_last, sigma_last, sigma, d)
            eps_hat = (x - x0_hat) / sigma
        this_order = min(order, len(steps) - i, len(history) + 1) if math.isfinite(lam) else 1
        if sigma_next == 0 or this_order == 1 or not math.isfinite(lam):
            d = x0_hat
        else:
            older = history[len(history) + 1 - this_order :]  # the this_order - 1 most recent
            d = _unipc_data(x0_hat, lam, _lambda(sigma_next) - lam, older, None)
        last = (x, sigma, this_order)
        if math.isfinite(lam):
            history.append((lam, x0_hat))
        x = _data_step(x0_hat, eps_hat, sigma, sigma_next, d)
        _report(callback, i, sigma, sigma_next, x, x0_hat)
    return x


def _data_step_from(x: Tensor, x0_hat: Tensor, sigma: float, sigma_next: float, d: Tensor) -> Tensor:
    """_data_step from an explicit state x at finite sigma: x_next = (s'/s) x + (1 - s'/s) d."""
    r = sigma_next / sigma
    return r * x + (1 - r) * d


def consistency(
    D: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """Multistep consistency sampling (Song et al. 2023, "Consistency Models", Algorithm 1).

    At each level x0_hat = D(x, sigma), then fresh noise straight to the next level:
    x_next = x0_hat + sigma_next * z, z ~ N(0, I) (DDIM's ancestral step with all of
    sigma_next as new noise); a step to 0 returns x0_hat. Algorithm 1 adds
    sqrt(sigma_next^2 - sigma_min^2) * z because its consistency function is the identity
    at sigma_min; a sculpt denoiser's boundary is sigma = 0, so the scale is sigma_next
    exactly. One step is one call D(x_T, sigma_max). Meant for a consistency model: with an
    MMSE denoiser each step lands on a posterior mean, and the samples come out too narrow.
    """
    for i, sigma, sigma_next in _steps(sigmas):
        x0_hat, _ = _denoise(D, x, sigma)
        x = x0_hat + sigma_next * _noise_like(x0_hat, generator) if sigma_next > 0 else x0_hat
        _report(callback, i, sigma, sigma_next, x, x0_hat)
    return x


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "ddpm": ddpm,
    "ddim": ddim,
    "euler": euler,
    "euler_ancestral": euler_ancestral,
    "heun": heun,
    "dpmpp_2m": dpmpp_2m,
    "dpmpp_3m": dpmpp_3m,
    "ipndm": ipndm,
    "ipndm3": ipndm3,
    "ipndm_v": ipndm_v,
    "dpmpp_2m_sde": dpmpp_2m_sde,
    "unipc": unipc,
    "consistency": consistency,
}

#: Denoiser calls as a function of steps, for a grid from a finite sigma_max to 0 (heun: see the module docstring).
NFE: dict[str, Callable[[int], int]] = {name: (lambda steps: steps) for name in SAMPLERS}
NFE["heun"] = lambda steps: 2 * steps - 1


#: The sampler name that means "the rule's choice for this many steps" (``auto_sampler``).
AUTO = "auto"
#: Samplers whose default grid is the schedule's own rather than ``auto_spacing``'s (see ``resolve_sampling``).
OWN_GRID_SAMPLERS = ("heun", "ddpm", "euler_ancestral", "dpmpp_2m_sde")
#: Single-evaluation solvers whose first call may be the analytic first step (``first_step``).
ANALYTIC_FIRST_SAMPLERS = ("ddim", "euler", "dpmpp_2m", "dpmpp_3m", "ipndm", "ipndm3", "ipndm_v", "unipc")
FIRST_STEPS = (AUTO, "analytic", "model")
#: The analytic first step is taken by default only from this noise level up: its x0_hat is off by
#: about |S - diag S| / sigma_max per unit of noise (S the data covariance; ``sculpt.moments``).
ANALYTIC_MIN_SIGMA = 50.0


#: Where the first network call goes after the analytic first step on the default grid (sigma; data in [-1, 1]).
ANALYTIC_FIRST_CALL = 10.0


def analytic_grid(
    schedule: Schedule, steps: int, spacing: str | None = None, moments=None, cond: dict | None = None
) -> Tensor:
    """The grid for ``steps`` network calls after the analytic first step: ``steps + 1`` steps.

    The first step (sigma_max to the second level) is the Gaussian's closed-form flow
    (``analytic_start``); the network is called from the second level on. On the default grid
    (``cosine_uniform``):

    - with ``moments`` whose covariance the draw ``cond`` uses (``DataMoments.uses_covariance``), the network's
      first call goes to the grid for ``steps + 1``'s second level, or down to no lower than
      ``moments.gaussian_until`` (sqrt of the largest principal variance: 1.67 on the 8x8
      digits, 4.5 on MNIST), where the data stops looking Gaussian; the calls then walk the
      default spacing from there. Few calls spend all of their budget where the network knows
      more than the Gaussian: FD at NFE 3 / 4 / 5 / 6 (README.md, stop 23) on digits 7.77 /
      6.62 / 5.90 / 5.79 against 9.86 / 6.94 / 6.16 / 5.84 with the variances and the level at
      10 below, on MNIST trained 500 steps 190 / 147 / 134 / 137 against 214 / 171 / 149 / 148;
    - without them (per-coordinate variances only: a conditional draw, larger images, an older
      run), from 3 calls it is that grid for ``steps`` with one level inserted at sigma =
      ``ANALYTIC_FIRST_CALL`` (10), after sigma_max: the structure of images forms well above
      the default grid's second level, and the diagonal Gaussian is far off there. Measured
      (stop 22; FD at NFE 3 / 4 / 5 / 6 / 8 / 10 against the default grid respaced for steps
      + 1): the MNIST run trained 2000 steps 148 / 98.3 / 78.9 / 73.8 / 71.2 / 67.8 against
      255 / 159 / 123 / 103 / 82.8 / 66.9.

    Other grids, fewer calls, or a second level already above 10: the grid for ``steps + 1``.
    """
    spacing = resolve_spacing(schedule, steps, spacing)
    labels = (cond or {}).get("class_labels")
    floor = moments.gaussian_until if moments is not None and moments.uses_covariance(labels) else None
    if spacing == "cosine_uniform" and floor is not None:
        longer = grid(schedule, steps + 1, spacing)
        first = max(float(longer[1]), floor)
        if first < float(longer[0]):
            try:
                rest = cosine_uniform(schedule, steps, top=first)
            except ValueError:  # hundreds of calls below a low first level: the plain longer grid
                return check_sigmas(longer)
            return check_sigmas(torch.cat([longer[:1], rest]))
    if spacing == "cosine_uniform" and steps >= 3:
        base = grid(schedule, steps, spacing)
        if float(base[1]) < ANALYTIC_FIRST_CALL < float(base[0]):
            return check_sigmas(torch.cat([base[:1], base.new_tensor([ANALYTIC_FIRST_CALL]), base[1:]]))
    return check_sigmas(grid(schedule, steps + 1, spacing))


def analytic_start(
    moments, x: Tensor, sigmas: Tensor, cond: dict | None = None, callback: Callback | None = None
) -> tuple[Tensor, Tensor, Callback | None]:
    """The grid's first step solved in closed form: x carried from sigmas[0] to sigmas[1] by the flow of the
    Gaussian with the data's moments (``DataMoments.flow``), the rest of the grid, and the callback shifted by
    the step it reported (its x0_hat the Gaussian's posterior mean at sigmas[0]: the data mean at infinity)."""
    labels = (cond or {}).get("class_labels")
    sigma, sigma_next = float(sigmas[0]), float(sigmas[1])
    x_next = moments.flow(x, sigma, sigma_next, labels)
    if callback is None:
        return x_next, sigmas[1:], None
    callback(StepInfo(0, sigma, sigma_next, x_next, moments.denoise(x, sigma, labels)))
    return x_next, sigmas[1:], lambda info: callback(replace(info, index=info.index + 1))


def resolve_first_step(
    first_step: str,
    sampler: str,
    D: DenoiserFn,
    *,
    cond: dict | None = None,
    sigma_max: float | None = None,
    steps: int | None = None,
    grid_given: bool = False,
) -> str:
    """``analytic`` or ``model``: whether the first step is the data moments' Gaussian flow (``sculpt.moments``).

    ``auto`` takes the analytic first step where it is exact to float error and the grid is
    the rule's own: D carries its training data's moments (a sculpt run trained since they are
    recorded) for the condition asked for, the sampler is one of ``ANALYTIC_FIRST_SAMPLERS``,
    sigma_max >= ``ANALYTIC_MIN_SIGMA`` and no explicit grid was passed (a tuned or hand-made
    grid runs as it was made). The step costs no network call, and ``sample`` spends the one it
    saves on one more step: ``steps`` network calls walk a grid of ``steps + 1``. Measured on
    trained models (benchmarks/samplers.py ``--models``), FD at NFE 3 / 5 / 10 with it and
    without: digits 9.27 / 6.42 / 6.24 against 12.6 / 6.61 / 5.84, EDM-recipe digits 9.15 /
    6.25 / 6.43 against 13.3 / 6.65 / 6.44, MNIST 311 / 214 / 186 against 314 / 238 / 209.
    The digits' loss from 6 steps on lies at their real-vs-real floor (6.17), where a sampler
    scoring below the floor is no better a model of the data; the MNIST gain is far above its
    floor (50). ``steps`` is taken so that a rule may use it.
    ``analytic`` insists (and says why it cannot), ``model`` never takes it.
    """
    if first_step not in FIRST_STEPS:
        raise ValueError(f"first_step must be one of {', '.join(FIRST_STEPS)} (got {first_step!r})")
    if first_step == "model":
        return "model"
    moments = getattr(D, "data_moments", None)
    why = None
    if sampler not in ANALYTIC_FIRST_SAMPLERS:
        why = f"{sampler} is not a single-evaluation ODE solver ({', '.join(ANALYTIC_FIRST_SAMPLERS)})"
    elif moments is None:
        why = (
            "the denoiser carries no data moments (a run trained by an older sculpt, or a denoiser built by hand: "
            "set D.data_moments = sculpt.moments.measure_moments(dataset))"
        )
    elif not moments.knows(cond):
        why = f"the recorded moments have no class means for the condition {sorted(cond or {})}"
    elif sigma_max is not None and math.isfinite(sigma_max) and sigma_max < ANALYTIC_MIN_SIGMA:
        why = f"sigma_max {sigma_max:.4g} < {ANALYTIC_MIN_SIGMA:g}, where the Gaussian approximation is not exact"
    if first_step == "analytic":
        if why is not None:
            raise ValueError(f"first_step='analytic' is not possible here: {why}; use first_step='model'")
        return "analytic"
    return "analytic" if why is None and not grid_given else "model"


def first_step_of(
    D: DenoiserFn,
    sampler: str,
    steps: int,
    spacing: str | None,
    *,
    sigmas: Tensor | None = None,
    first_step: str = AUTO,
    conditional: bool = False,
) -> str:
    """What ``sample`` will do with ``first_step`` for this concrete sampler and grid (what a record says)."""
    schedule = getattr(D, "schedule", None)
    if sigmas is not None:
        sigma_max = float(sigmas[0])
    elif schedule is not None:
        sigma_max = float(grid(schedule, steps, resolve_spacing(schedule, steps, spacing))[0])
    else:
        sigma_max = None
    cond = {"class_labels": torch.zeros(1, dtype=torch.long)} if conditional else None
    return resolve_first_step(
        first_step, sampler, D, cond=cond, sigma_max=sigma_max, steps=steps, grid_given=sigmas is not None
    )


def auto_sampler(steps: int, schedule: Schedule | None = None) -> str:
    """The solver ``sample`` uses when the sampler is ``auto``: ``unipc``, at every step count.

    Fitted on trained models, each on the grid ``auto_spacing`` picks (benchmarks/samplers.py
    ``--models``; figures in benchmarks/README.md): UniPC's corrector reuses the new evaluation,
    and on the digits, MNIST and EDM-recipe digits runs it is the best solver from 4 to 20 steps
    (digits FD 8.2 / 6.61 / 5.84 at NFE 4 / 5 / 10 against iPNDM-3's 10.3 / 6.78 / 6.18 and
    DPM-Solver++(2M)'s 10.1 / 7.97 / 6.2) and at 3 steps within 11% of iPNDM-3 (best on both
    digits runs, 1.5x worse on MNIST). On the Gaussian mixtures' exact denoisers iPNDM-3's
    extrapolation wins from 4 to 9 steps; trained networks' errors make it overshoot. The
    schedule does not change the choice (it is an argument so that a rule may use it).
    """
    _check_steps(steps)
    return "unipc"


def resolve_sampling(sampler: str, steps: int, schedule: Schedule, spacing: str | None = None) -> tuple[str, str]:
    """The concrete (sampler, grid) that ``sample`` runs: ``auto`` / None replaced by the rule's choice.

    The solver comes from ``auto_sampler``. The grid comes from ``auto_spacing`` for the
    deterministic single-evaluation solvers (ddim, euler, the dpmpp_2m/3m, ipndm and unipc
    families); ``consistency`` takes its ``consistency`` levels, and heun and
    the stochastic samplers keep the schedule's own grid (``Schedule.default_spacing``:
    uniform-time for VP, Karras for EDM), since a Heun step or fresh noise across the few-step
    grid's one big jump is far off (all discrete levels give the original DDPM). What an
    evaluation records, so that a record says what really ran.
    """
    if sampler == AUTO:
        sampler = auto_sampler(steps, schedule)
    elif sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; valid names: {AUTO}, {', '.join(SAMPLERS)}")
    if spacing in (None, AUTO):
        spacing = "consistency" if sampler == "consistency" else None
        if sampler in OWN_GRID_SAMPLERS:
            spacing = schedule.default_spacing
    return sampler, resolve_spacing(schedule, steps, spacing)


def sample(
    D: DenoiserFn,
    shape: tuple[int, ...] | list[int],
    *,
    sampler: str = AUTO,
    steps: int | None = None,
    schedule: Schedule | None = None,
    spacing: str | None = None,
    sigmas: Tensor | None = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    noise: Tensor | None = None,
    cond: dict[str, Tensor] | None = None,
    precision: str = "fp32",
    first_step: str = AUTO,
    **options: float,
) -> Tensor:
    """Draw samples: build the step grid, start from noise at sigma_max, run the sampler.

    ``D`` is any callable with the denoiser signature; its ``schedule`` attribute is used
    when ``schedule`` is not given. ``steps`` defaults to 20 (all levels of a discrete
    schedule for ``ddpm``); ``spacing`` to the schedule's own grid (``GRIDS``), or pass
    ``sigmas`` directly. The start is the VP prior N(0, I) seen in sigma coordinates,
    sqrt(1 + sigma_max^2) * z, which is exactly the unit noise z when sigma_max = inf.
    ``cond`` (e.g. ``{"class_labels": y}``) is passed to D at every call. ``precision``
    bf16 / fp16 runs the network under autocast while the sampler's own arithmetic stays
    in ``dtype``. ``first_step`` (``resolve_first_step``): with ``auto`` a run that recorded
    its data's moments takes the analytic first step, and ``steps`` network calls then walk a
    grid of ``steps + 1``. Runs under ``torch.inference_mode``; call a sampler function
    directly when gradients are needed.
    """
    if sampler != AUTO and sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; valid names: {AUTO}, {', '.join(SAMPLERS)}")
    shape = tuple(shape)
    if not shape or not all(isinstance(n, int) and n > 0 for n in shape):
        raise ValueError(f"shape must be a tuple of positive ints like (16, 1, 28, 28) (got {shape!r})")
    grid_given = sigmas is not None
    if sigmas is None:
        schedule = schedule if schedule is not None else getattr(D, "schedule", None)
        if schedule is None:
            raise ValueError("pass schedule= (D has no .schedule attribute) or an explicit sigmas= grid")
        if steps is None:
            steps = schedule.num_steps if sampler == "ddpm" and schedule.num_steps else 20
        sampler, spacing = resolve_sampling(sampler, steps, schedule, spacing)
        sigmas = grid(schedule, steps, spacing)
    sigmas = check_sigmas(sigmas)
    if sampler == AUTO:
        sampler = auto_sampler(len(sigmas) - 1, schedule if schedule is not None else getattr(D, "schedule", None))
    analytic = "analytic" == resolve_first_step(
        first_step, sampler, D, cond=cond, sigma_max=float(sigmas[0]), steps=len(sigmas) - 1, grid_given=grid_given
    )
    if analytic and not grid_given:  # the saved call buys one more step
        sigmas = analytic_grid(schedule, steps, spacing, D.data_moments, cond)
    if device is None:
        params = getattr(D, "parameters", None)
        first = next(iter(params()), None) if callable(params) else None
        device = first.device if first is not None else "cpu"
    if noise is None:
        noise = torch.randn(
            shape, generator=generator, dtype=dtype, device=generator.device if generator is not None else device
        )
    elif tuple(noise.shape) != shape:
        raise ValueError(f"noise has shape {tuple(noise.shape)} but shape={shape}; pass matching noise or none")
    noise = noise.to(device=device, dtype=dtype)
    sigma_max = float(sigmas[0])
    x = noise if math.isinf(sigma_max) else noise * math.sqrt(1 + sigma_max**2)
    denoise = D if not cond else (lambda x, sigma: D(x, sigma, **cond))
    with torch.inference_mode(), autocast(device, precision):
        if analytic:
            x, sigmas, callback = analytic_start(D.data_moments, x, sigmas, cond, callback)
            if float(sigmas[0]) == 0:  # a one-step grid: the Gaussian's sample is the answer
                return x
        return SAMPLERS[sampler](denoise, x, sigmas, generator=generator, callback=callback, **options)


def class_rows(num_classes: int, n: int) -> Tensor:
    """Labels for a class-by-class grid: ceil(n / num_classes) of each class in turn, one row per class."""
    if num_classes < 1:
        raise ValueError(f"class_rows needs num_classes >= 1 (got {num_classes})")
    per_class = max(1, math.ceil(n / num_classes))
    return torch.arange(num_classes).repeat_interleave(per_class)


def generate(
    denoiser: DenoiserFn,
    shape: tuple[int, ...],
    n: int,
    *,
    sampler: str = AUTO,
    steps: int = 20,
    spacing: str | None = None,
    sigmas: Tensor | None = None,
    seed: int = 0,
    batch_size: int = 256,
    num_classes: int = 0,
    labels: Tensor | None = None,
    callback: Callback | None = None,
    progress: bool = True,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    first_step: str = AUTO,
) -> Tensor:
    """n samples of ``shape`` in batches, in [-1, 1] on the CPU.

    The noise of sample i depends only on seed and i // batch_size. A latent model (one
    with a ``codec``, ``sculpt.latent.LatentDenoiser``) samples in its latent space and
    decodes before clamping: ``shape`` is always the pixels'. A class-conditional
    model (``num_classes`` > 0) gets ``labels`` [n], or labels cycling through the classes,
    so class balance is exact. ``callback`` (a sampler's ``StepInfo`` callback) follows the
    first batch. ``precision`` bf16 / fp16 runs the network under autocast (``sample``).
    ``sigmas`` (a tuned grid, ``sculpt.tune``) replaces ``steps`` and ``spacing``.
    ``first_step``: the analytic first step (``resolve_first_step``).
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
    schedule = getattr(denoiser, "schedule", None)
    if schedule is not None:
        sampler, spacing = resolve_sampling(sampler, steps, schedule, spacing)
    if num_classes and labels is None:
        labels = torch.arange(n) % num_classes
    codec = getattr(denoiser, "codec", None)
    sample_shape = tuple(codec.latent_shape(shape)) if codec is not None else tuple(shape)
    out = []
    bar = tqdm(total=n, desc=f"sampling ({sampler}, {steps} steps)", unit="img", disable=not progress, leave=False)
    for start in range(0, n, batch_size):
        count = min(batch_size, n - start)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + start)
        cond = {"class_labels": labels[start : start + count].to(device)} if num_classes else None
        images = sample(
            denoiser,
            (count, *sample_shape),
            sampler=sampler,
            steps=steps,
            spacing=spacing,
            sigmas=sigmas,
            generator=generator,
            callback=callback if start == 0 else None,
            cond=cond,
            device=device,
            precision=precision,
            first_step=first_step,
        )
        if codec is not None:
            images = codec.decode(images)
        out.append(images.float().clamp(-1, 1).cpu())  # data lives in [-1, 1]; overshoot is not information
        bar.update(count)
    bar.close()
    return torch.cat(out)
