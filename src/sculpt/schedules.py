"""Noise schedules and step grids.

One convention everywhere (EDM / k-diffusion): ``x = x0 + sigma * eps``. A variance-
preserving (VP) schedule is the same process seen through a scale,

    x_vp = x / sqrt(1 + sigma^2),   alpha_bar = 1 / (1 + sigma^2),   logsnr = -2 log sigma,

so a schedule is only a monotone map between a model's native time t in [0, 1]
(0 clean, 1 noisiest) and sigma. It never needs a sampler of its own.

Build one with ``make(name, **options)``; a step grid is a plain function
``grid(schedule, steps) -> sigmas`` returning a decreasing tensor that ends in 0.

Schedule maths runs in float64: DDPM's alpha_bar reaches 4e-5, and float32 round-off
there is visible in sigma (~157).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "Schedule",
    "DiscreteSchedule",
    "EDMSchedule",
    "SigmoidSchedule",
    "Warped",
    "SCHEDULES",
    "GRIDS",
    "make",
    "grid",
    "uniform_t",
    "karras",
    "logsnr_uniform",
    "few_step",
    "cosine_uniform",
    "auto_spacing",
    "resolve_spacing",
    "sigma_to_alpha_sigma",
    "shifted",
    "rescale_zero_terminal_snr",
]

_F64 = torch.float64


def _as_tensor(value: Tensor | float, name: str = "t") -> Tensor:
    """float64 tensor on the CPU (schedules are tiny; callers move results where needed)."""
    out = torch.as_tensor(value, dtype=_F64).detach().cpu()
    if torch.isnan(out).any():
        raise ValueError(f"{name} contains NaN; pass finite values")
    return out


def _check_sigma(sigma: Tensor | float) -> Tensor:
    sigma = _as_tensor(sigma, "sigma")
    if (sigma < 0).any():
        raise ValueError(
            f"sigma must be >= 0 (got min {sigma.min().item():.4g}); "
            "sigma is a noise standard deviation in x = x0 + sigma * eps"
        )
    return sigma


def sigma_to_alpha_sigma(sigma: Tensor) -> tuple[Tensor, Tensor]:
    """VP coefficients (alpha, sigma_vp) with x_vp = alpha * x0 + sigma_vp * eps.

    alpha = 1 / sqrt(1 + sigma^2) and sigma_vp = sigma * alpha, written so that both
    sigma = 0 and sigma = inf give exact, finite answers ((1, 0) and (0, 1)).
    """
    alpha = torch.rsqrt(1 + sigma**2)
    sigma_vp = torch.rsqrt(1 + sigma.reciprocal() ** 2)  # sigma / sqrt(1 + sigma^2), limit-safe
    return alpha, sigma_vp


class Schedule:
    """A monotone map between native time t in [0, 1] and the noise level sigma.

    Subclasses implement ``_sigma(t)`` and ``_t(sigma)`` on float64 tensors, the
    training noise distribution ``sample_sigma``, and say whether they are discrete.
    """

    name: str = "schedule"
    #: Discrete schedules (DDPM-style) have ``num_steps`` levels and a table ``sigmas``.
    num_steps: int | None = None
    #: The schedule's own uniform grid, for ancestral DDPM sampling (``sculpt.sample`` otherwise uses ``auto_spacing``).
    default_spacing: str = "trailing"

    # -- the map ---------------------------------------------------------------------
    def sigma(self, t: Tensor | float) -> Tensor:
        """Noise level at native time t (float64)."""
        t = _as_tensor(t)
        if ((t < 0) | (t > 1)).any():
            raise ValueError(f"t must lie in [0, 1] (got {t.min().item():.4g}..{t.max().item():.4g})")
        return self._sigma(t)

    def t(self, sigma: Tensor | float) -> Tensor:
        """Native time of noise level sigma, the inverse of ``sigma(t)`` (clamped to [0, 1])."""
        return self._t(_check_sigma(sigma)).clamp(0, 1)

    def logsnr(self, t: Tensor | float) -> Tensor:
        """log-SNR lambda(t) = log(alpha^2 / sigma_vp^2) = -2 log sigma(t)."""
        return -2 * torch.log(self.sigma(t))

    def alpha_sigma(self, t: Tensor | float) -> tuple[Tensor, Tensor]:
        """VP form (alpha, sigma_vp) at time t: x_vp = alpha * x0 + sigma_vp * eps."""
        return sigma_to_alpha_sigma(self.sigma(t))

    def alpha_bar(self, t: Tensor | float) -> Tensor:
        """DDPM's alpha_bar(t) = alpha^2 = 1 / (1 + sigma^2)."""
        return self.alpha_sigma(t)[0] ** 2

    @property
    def sigma_min(self) -> float:
        return float(self._sigma(torch.zeros((), dtype=_F64)))

    @property
    def sigma_max(self) -> float:
        return float(self._sigma(torch.ones((), dtype=_F64)))

    @property
    def time_scale(self) -> float:
        """Factor from t to the network's noise input for VP targets (DDPM feeds 0..999)."""
        return float(self.num_steps - 1) if self.num_steps else 1000.0

    def sample_sigma(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """Training noise levels for a batch of n: uniform t (discrete levels when discrete)."""
        if self.num_steps:
            return self.sigmas[torch.randint(self.num_steps, (n,), generator=generator)]
        return self._sigma(torch.rand(n, generator=generator, dtype=_F64))

    def quantile(self, u: Tensor) -> Tensor:
        """The training distribution's inverse CDF: ``quantile(u)`` for u uniform in (0, 1) is distributed
        as ``sample_sigma`` (the level index floor(u N) when discrete)."""
        u = _as_tensor(u)
        if self.num_steps:
            return self.sigmas[(u * self.num_steps).long().clamp(0, self.num_steps - 1)]
        return self._sigma(u)

    @property
    def sigmas(self) -> Tensor:
        """The exact discrete noise levels, index 0 (least noise) .. num_steps - 1."""
        if not self.num_steps:
            raise ValueError(f"schedule {self.name!r} is continuous: it has no discrete sigmas table")
        return self._sigma(torch.linspace(0, 1, self.num_steps, dtype=_F64))

    # -- to implement ----------------------------------------------------------------
    def _sigma(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def _t(self, sigma: Tensor) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        steps = f", num_steps={self.num_steps}" if self.num_steps else ""
        return f"{type(self).__name__}({self.name!r}{steps}, sigma in [{self.sigma_min:.4g}, {self.sigma_max:.4g}])"


class DiscreteSchedule(Schedule):
    """A DDPM-style schedule: N noise levels from betas, alpha_bar = cumprod(1 - beta).

    Level i sits at t = i / (N - 1), so the network's noise input (N - 1) * t is DDPM's
    integer timestep. Between levels log sigma is interpolated linearly (k-diffusion's
    choice), which keeps every discrete value exact and the map strictly monotone.
    """

    def __init__(self, betas: Tensor, name: str = "discrete") -> None:
        betas = torch.as_tensor(betas, dtype=_F64)
        if betas.ndim != 1 or len(betas) < 2:
            raise ValueError("betas must be a 1-D tensor with at least 2 entries")
        if ((betas <= 0) | (betas >= 1)).any():
            raise ValueError("betas must lie strictly between 0 and 1")
        self.name = name
        self.num_steps = len(betas)
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        # sigma^2 = (1 - alpha_bar) / alpha_bar
        self._table = torch.sqrt((1 - self.alphas_cumprod) / self.alphas_cumprod)
        self._log_table = torch.log(self._table)

    @property
    def sigmas(self) -> Tensor:
        return self._table.clone()

    def _sigma(self, t: Tensor) -> Tensor:
        position = t * (self.num_steps - 1)
        # Snap round-off (i / (N - 1) * (N - 1) = i - 1e-13) so every level is hit exactly.
        low = (position + 1e-9).floor().long().clamp(0, self.num_steps - 2)
        frac = (position - low).clamp(min=0)
        log_sigma = torch.lerp(self._log_table[low], self._log_table[low + 1], frac)
        return torch.exp(log_sigma)

    def _t(self, sigma: Tensor) -> Tensor:
        log_sigma = torch.log(sigma).clamp(self._log_table[0], self._log_table[-1])
        high = torch.searchsorted(self._log_table, log_sigma.contiguous()).clamp(1, self.num_steps - 1)
        low = high - 1
        frac = (log_sigma - self._log_table[low]) / (self._log_table[high] - self._log_table[low])
        return (low + frac) / (self.num_steps - 1)


class EDMSchedule(Schedule):
    """Karras et al. 2022 (EDM): sigma(t) = (s_min^(1/rho) + t (s_max^(1/rho) - s_min^(1/rho)))^rho.

    Training draws ln sigma ~ N(p_mean, p_std^2) (EDM's log-normal), not uniform t.
    """

    default_spacing = "karras"

    def __init__(
        self,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        rho: float = 7.0,
        p_mean: float = -1.2,
        p_std: float = 1.2,
    ) -> None:
        if not 0 < sigma_min < sigma_max < math.inf:
            raise ValueError(f"need 0 < sigma_min < sigma_max < inf (got {sigma_min}, {sigma_max})")
        self.name = "edm"
        self.rho, self.p_mean, self.p_std = rho, p_mean, p_std
        self._lo, self._hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)

    def _sigma(self, t: Tensor) -> Tensor:
        return (self._lo + t * (self._hi - self._lo)) ** self.rho

    def _t(self, sigma: Tensor) -> Tensor:
        return (sigma ** (1 / self.rho) - self._lo) / (self._hi - self._lo)

    def sample_sigma(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        z = torch.randn(n, generator=generator, dtype=_F64)
        return torch.exp(self.p_mean + self.p_std * z)

    def quantile(self, u: Tensor) -> Tensor:
        z = math.sqrt(2) * torch.erfinv(2 * _as_tensor(u) - 1)
        return torch.exp(self.p_mean + self.p_std * z)


class SigmoidSchedule(Schedule):
    """Sigmoid schedule (Jabri et al. 2022; Chen 2023, "On the importance of noise scheduling").

    alpha_bar(t) = (sigmoid(e/tau) - sigmoid((t(e - s) + s)/tau)) / (sigmoid(e/tau) - sigmoid(s/tau)),
    clipped to [clip_min, 1 - clip_min] so that sigma stays finite and positive at the ends.
    """

    def __init__(self, start: float = -3.0, end: float = 3.0, tau: float = 1.0, clip_min: float = 1e-9):
        if not end > start or tau <= 0:
            raise ValueError("sigmoid schedule needs end > start and tau > 0")
        self.name = "sigmoid"
        self.start, self.end, self.tau, self.clip_min = start, end, tau, clip_min
        self._v_start = torch.sigmoid(torch.tensor(start / tau, dtype=_F64))
        self._v_end = torch.sigmoid(torch.tensor(end / tau, dtype=_F64))

    def _sigma(self, t: Tensor) -> Tensor:
        v = torch.sigmoid((t * (self.end - self.start) + self.start) / self.tau)
        span = self._v_end - self._v_start
        # sigma^2 = (1 - alpha_bar) / alpha_bar, each side computed directly (no 1 - (1 - tiny))
        alpha_bar = ((self._v_end - v) / span).clamp(self.clip_min, 1 - self.clip_min)
        one_minus = ((v - self._v_start) / span).clamp(self.clip_min, 1 - self.clip_min)
        return torch.sqrt(one_minus / alpha_bar)

    def _t(self, sigma: Tensor) -> Tensor:
        one_minus = (sigma_to_alpha_sigma(sigma)[1] ** 2).clamp(self.clip_min, 1 - self.clip_min)
        v = self._v_start + one_minus * (self._v_end - self._v_start)
        return (torch.logit(v) * self.tau - self.start) / (self.end - self.start)


class Warped(Schedule):
    """A schedule whose sigmas are a monotone function of another's: sigma = forward(sigma_base).

    Serves the resolution shift (sigma scaled by a constant) and the zero-terminal-SNR
    rescaling alike; discreteness, the training distribution and the default grid are
    inherited from the base schedule.
    """

    def __init__(
        self,
        base: Schedule,
        forward: Callable[[Tensor], Tensor],
        inverse: Callable[[Tensor], Tensor],
        name: str,
    ) -> None:
        self.base, self._forward, self._inverse, self.name = base, forward, inverse, name
        self.num_steps = base.num_steps
        self.default_spacing = base.default_spacing

    @property
    def time_scale(self) -> float:
        return self.base.time_scale

    def _sigma(self, t: Tensor) -> Tensor:
        return self._forward(self.base._sigma(t))

    def _t(self, sigma: Tensor) -> Tensor:
        return self.base._t(self._inverse(sigma))

    def sample_sigma(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        if self.num_steps:
            return super().sample_sigma(n, generator=generator)
        return self._forward(self.base.sample_sigma(n, generator=generator))

    def quantile(self, u: Tensor) -> Tensor:
        if self.num_steps:
            return super().quantile(u)
        return self._forward(self.base.quantile(u))


def shifted(base: Schedule, factor: float) -> Schedule:
    """Scale every sigma by ``factor``: log-SNR moves by exactly -2 log(factor).

    Hoogeboom et al. 2023 (simple diffusion): training at resolution ``res`` with a
    schedule tuned for ``base_res`` wants factor = res / base_res, i.e. log-SNR shifted
    by 2 log(base_res / res). Chen 2023's input scaling x0 -> b x0 is the same process
    as factor = 1 / b. SD3's "shift" s is factor = s as well.
    """
    if not (factor > 0 and math.isfinite(factor)):
        raise ValueError(f"shift must be a positive finite number (got {factor})")
    return Warped(base, lambda s: s * factor, lambda s: s / factor, f"{base.name}*{factor:g}")


def rescale_zero_terminal_snr(base: Schedule) -> Schedule:
    """Lin et al. 2023: rescale sqrt(alpha_bar) so that alpha_bar(1) = 0 exactly.

    sqrt(ab)' = (sqrt(ab) - sqrt(ab_T)) * sqrt(ab_0) / (sqrt(ab_0) - sqrt(ab_T)): alpha_bar
    at t = 0 is unchanged and sigma at t = 1 becomes infinite (pure noise). Sampling
    then starts from unit noise and the first denoiser call must go through an x0 or v
    target (eps cannot be turned into x0 at zero SNR).
    """
    a0 = float(sigma_to_alpha_sigma(base._sigma(torch.zeros((), dtype=_F64)))[0])
    aT = float(sigma_to_alpha_sigma(base._sigma(torch.ones((), dtype=_F64)))[0])

    def forward(sigma: Tensor) -> Tensor:
        # Only the base's range [sigma_min, sigma_max] maps into [sigma_min, inf]: a training draw
        # outside it (EDM's log-normal reaches past sigma_max about once in a million) is clamped
        # to it, where it would otherwise give a negative sigma (above) or NaN (below).
        alpha = (sigma_to_alpha_sigma(sigma)[0].clamp(aT, a0) - aT) * (a0 / (a0 - aT))
        return torch.sqrt(1 - alpha**2) / alpha  # alpha = 0 -> inf, exactly

    def inverse(sigma: Tensor) -> Tensor:
        alpha = sigma_to_alpha_sigma(sigma)[0] * ((a0 - aT) / a0) + aT
        return torch.sqrt(1 - alpha**2) / alpha

    return Warped(base, forward, inverse, f"{base.name}+zsnr")


def _linear_betas(num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """Ho et al. 2020: betas linear from 1e-4 to 0.02 over 1000 steps."""
    return torch.linspace(beta_start, beta_end, num_steps, dtype=_F64)


def _scaled_linear_betas(num_steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> Tensor:
    """Stable Diffusion's: linear in sqrt(beta)."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=_F64) ** 2


def _cosine_betas(num_steps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Nichol & Dhariwal 2021: alpha_bar(t) = cos^2((t + s)/(1 + s) * pi/2), betas clipped at 0.999."""

    def alpha_bar(t: Tensor) -> Tensor:
        return torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2

    steps = torch.arange(num_steps + 1, dtype=_F64) / num_steps
    return (1 - alpha_bar(steps[1:]) / alpha_bar(steps[:-1])).clamp(max=max_beta)


SCHEDULES: dict[str, Callable[..., Schedule]] = {
    "linear": lambda **kw: DiscreteSchedule(_linear_betas(**kw), "linear"),
    "scaled_linear": lambda **kw: DiscreteSchedule(_scaled_linear_betas(**kw), "scaled_linear"),
    "cosine": lambda **kw: DiscreteSchedule(_cosine_betas(**kw), "cosine"),
    "sigmoid": lambda **kw: SigmoidSchedule(**kw),
    "edm": lambda **kw: EDMSchedule(**kw),
}


def make(
    name: str,
    *,
    shift: float | None = None,
    res: int | None = None,
    base_res: int = 64,
    input_scale: float | None = None,
    zero_terminal_snr: bool = False,
    **options: float,
) -> Schedule:
    """Build a schedule by name (``SCHEDULES``), with the recipe options applied in order.

    - ``res`` (with ``base_res``, default 64): resolution shift, sigma *= res / base_res.
    - ``shift``: an explicit sigma factor (log-SNR moves by -2 log shift).
    - ``input_scale`` b (Chen 2023): scaling the data by b equals shift 1 / b.
    - ``zero_terminal_snr``: Lin et al. 2023 rescaling, applied last.
    Other options go to the schedule itself (e.g. ``num_steps``, ``beta_end``, ``rho``).
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; valid names: {', '.join(sorted(SCHEDULES))}")
    try:
        schedule = SCHEDULES[name](**options)
    except TypeError as error:
        raise ValueError(f"bad option for schedule {name!r}: {error}") from None
    factor = 1.0
    if res is not None:
        if res <= 0 or base_res <= 0:
            raise ValueError(f"res and base_res must be positive (got {res}, {base_res})")
        factor *= res / base_res
    if shift is not None:
        factor *= shift
    if input_scale is not None:
        if input_scale <= 0:
            raise ValueError(f"input_scale must be positive (got {input_scale})")
        factor /= input_scale
    if factor != 1.0:
        schedule = shifted(schedule, factor)
    if zero_terminal_snr:
        schedule = rescale_zero_terminal_snr(schedule)
    return schedule


# -- step grids ------------------------------------------------------------------------


def _check_steps(steps: int) -> int:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1 (got {steps!r})")
    return steps


def _finish(sigmas: Tensor) -> Tensor:
    """Decreasing, ending in exactly one 0."""
    sigmas = sigmas[sigmas > 0]
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(torch.float64)


def uniform_t(schedule: Schedule, steps: int, spacing: str = "trailing") -> Tensor:
    """Steps uniform in native time, as the DDIM literature spaces them.

    For a discrete schedule these are the integer timesteps of diffusers' DDIM/Euler schedulers:
    ``leading`` (DDIM: every N/steps-th level from 0, never the noisiest), ``trailing``
    (Lin et al. 2023: from the noisiest level down) and ``linspace`` (round(linspace(0,
    N-1, steps))). A continuous schedule uses the same fractions of [0, 1].

    ``leading`` and ``linspace`` end on level 0 (sigma = sigma_min) before the final 0, a
    step that is tiny next to the one before it; multistep solvers (dpmpp_2m/3m, unipc)
    extrapolate badly across such a jump in step size, so prefer ``trailing``, ``logsnr``
    or ``few_step`` with them.
    """
    steps = _check_steps(steps)
    if schedule.num_steps:
        n = schedule.num_steps
        if steps > n:
            raise ValueError(f"steps={steps} exceeds the schedule's {n} discrete levels")
        if spacing == "leading":
            index = torch.arange(steps, dtype=_F64).mul(n // steps).round()
        elif spacing == "trailing":
            index = torch.arange(n, 0, -n / steps, dtype=_F64).round() - 1
        elif spacing == "linspace":
            index = torch.linspace(0, n - 1, steps, dtype=_F64).round()
        else:
            raise ValueError(f"unknown spacing {spacing!r}; valid: leading, trailing, linspace")
        t = index.sort(descending=True).values / (n - 1)
    else:
        k = torch.arange(steps, dtype=_F64)
        if spacing == "leading":
            t = (steps - 1 - k) / steps
        elif spacing == "trailing":
            t = 1 - k / steps
        elif spacing == "linspace":
            t = 1 - k / max(steps - 1, 1)
        else:
            raise ValueError(f"unknown spacing {spacing!r}; valid: leading, trailing, linspace")
    return _finish(schedule.sigma(t))


def _finite_top(schedule: Schedule, steps: int) -> tuple[bool, float, int]:
    """(starts at infinity?, largest finite sigma to use, steps left for the finite part)."""
    if math.isfinite(schedule.sigma_max):
        return False, schedule.sigma_max, steps
    if steps < 2:
        return True, math.inf, 0
    # Zero terminal SNR: take one step from infinity to the next level down.
    last_gap = 1 / (schedule.num_steps - 1) if schedule.num_steps else 1 / steps
    return True, float(schedule.sigma(1 - last_gap)), steps - 1


def karras(schedule: Schedule, steps: int, rho: float = 7.0) -> Tensor:
    """Karras et al. 2022, eq. 5: uniform in sigma^(1/rho) between sigma_max and sigma_min."""
    steps = _check_steps(steps)
    from_infinity, top, finite_steps = _finite_top(schedule, steps)
    lo, hi = schedule.sigma_min ** (1 / rho), top ** (1 / rho)
    ramp = torch.linspace(0, 1, finite_steps, dtype=_F64)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    if from_infinity:
        sigmas = torch.cat([torch.tensor([math.inf], dtype=_F64), sigmas])
    return _finish(sigmas)


def logsnr_uniform(
    schedule: Schedule, steps: int, sigma_hi: float | None = None, sigma_lo: float | None = None
) -> Tensor:
    """Uniform in log-SNR (equivalently log sigma), DPM-Solver's "logSNR" spacing (Lu et al. 2022).

    By default from sigma_max to sigma_min. With ``sigma_hi`` below sigma_max the first step
    jumps from sigma_max straight to sigma_hi (at high noise the denoiser only returns the
    data mean, so one call is enough there) and the rest are log-uniform down to ``sigma_lo``.
    """
    steps = _check_steps(steps)
    from_infinity, top, finite_steps = _finite_top(schedule, steps)
    head = torch.zeros(0, dtype=_F64)
    if sigma_hi is not None and from_infinity and sigma_hi < top:
        top = sigma_hi  # the step from infinity is the jump
    elif sigma_hi is not None and sigma_hi < top and finite_steps >= 2:
        head, top, finite_steps = torch.tensor([top], dtype=_F64), sigma_hi, finite_steps - 1
    sigmas = head
    if finite_steps > 0:
        bottom = sigma_lo if sigma_lo is not None else schedule.sigma_min
        bottom = max(bottom, 1e-12 * top)  # a schedule may reach sigma = 0 at t = 0
        if bottom >= top:
            raise ValueError(f"need sigma_lo < sigma_hi (got {bottom:.4g} >= {top:.4g})")
        ramp = torch.linspace(0, 1, finite_steps, dtype=_F64)
        sigmas = torch.cat([head, torch.exp(math.log(top) + ramp * (math.log(bottom) - math.log(top)))])
    if from_infinity:
        sigmas = torch.cat([torch.tensor([math.inf], dtype=_F64), sigmas])
    return _finish(sigmas)


def few_step(schedule: Schedule, steps: int, sigma_data: float = 0.5) -> Tensor:
    """A grid for few steps: one jump from sigma_max, then log-uniform in a data-scaled band.

    The band [sigma_lo, sigma_hi] = sigma_data * [0.7 / n, 2 + n / 4] (n = steps) holds the
    noise levels where the denoiser's answer changes fastest; it widens as steps grow (at
    20+ steps it is close to plain ``logsnr`` over the levels that matter). Two steps are
    [sigma_max, sigma_hi, 0]. With zero terminal SNR and 4+ steps the first step goes from
    inf to the largest finite level (x0_hat is only the data mean at inf: a jump straight to
    the band would start it with too little variance) and the rest is the band for n = steps - 1.
    Fitted on Gaussian mixtures with their exact denoisers (benchmarks/defaults.py): from 2 to
    100 steps it is the best grid or close to it on every schedule kind, where uniform-time,
    Karras and log-SNR grids each fail badly somewhere. On trained networks its low levels cost
    10-45% in FD at 5-10 steps (``auto_spacing`` has the figures), so it is not the default:
    it is for exact or very accurate denoisers of data with fine detail.
    """
    steps = _check_steps(steps)
    from_infinity = math.isinf(schedule.sigma_max)
    head = [math.inf] if from_infinity else []
    top = schedule.sigma_max
    n = steps
    if from_infinity and steps >= 4:
        _, top, _ = _finite_top(schedule, steps)
        head, n = [math.inf, top], steps - 1
    sigma_hi = sigma_data * (2 + n / 4)
    sigma_lo = max(sigma_data * 0.7 / n, schedule.sigma_min)
    if steps == 1 or sigma_hi >= top or sigma_lo >= sigma_hi:
        return logsnr_uniform(schedule, steps)
    if steps == 2:
        return _finish(torch.tensor([top, sigma_hi], dtype=_F64))  # top is sigma_max, inf included
    if len(head) == 2:  # from inf to the largest finite level, then the band: steps - 2 levels
        band = torch.exp(torch.linspace(math.log(sigma_hi), math.log(sigma_lo), steps - 2, dtype=_F64))
        return _finish(torch.cat([torch.tensor(head, dtype=_F64), band]))
    return logsnr_uniform(schedule, steps, sigma_hi=sigma_hi, sigma_lo=sigma_lo)


def cosine_uniform(schedule: Schedule, steps: int, s: float = 0.008, top: float | None = None) -> Tensor:
    """The cosine schedule's levels at trailing uniform times, on any schedule.

    sigma = tan(pi/2 (t + s) / (1 + s)) (Nichol & Dhariwal 2021's alpha_bar, s = 0.008) at
    t = t_max (1 - k / steps), k = 0 .. steps - 1, where t_max is the cosine time of the
    schedule's sigma_max (1 with zero terminal SNR, where the first level is inf): the levels
    ``trailing`` gives on the cosine schedule, whatever the schedule. Where hundreds of steps
    would put levels below sigma_min it falls back to ``trailing``. ``top`` starts the grid
    at that level instead of sigma_max (the same spacing of the shorter stretch).
    """
    steps = _check_steps(steps)
    sigma_max = schedule.sigma_max if top is None else float(top)
    if not 0 < sigma_max <= schedule.sigma_max:
        raise ValueError(f"top must lie in (0, sigma_max = {schedule.sigma_max:g}] (got {sigma_max:g})")
    t_max = 1.0 if math.isinf(sigma_max) else min(1.0, 2 / math.pi * math.atan(sigma_max) * (1 + s) - s)
    t = t_max * (1 - torch.arange(steps, dtype=_F64) / steps)
    sigmas = torch.tan(math.pi / 2 * (t + s) / (1 + s))
    sigmas[0] = sigma_max  # exactly the schedule's top (inf, or sigma_max where round-off differs)
    if sigmas[-1] < schedule.sigma_min:
        if top is not None:
            raise ValueError(f"{steps} cosine_uniform levels below {sigma_max:g} reach under sigma_min; use fewer")
        return uniform_t(schedule, steps, "trailing")
    return _finish(sigmas)


def consistency_grid(schedule: Schedule, steps: int, sigma_data: float = 0.5) -> Tensor:
    """Levels for multistep consistency sampling: sigma_max, then steps - 1 levels below 1.642 sigma_data.

    One step is f(x, sigma_max). Two steps add sigma = 0.821 for sigma_data = 0.5, the
    intermediate level of Song et al. 2023 and Geng et al. 2024 on CIFAR-10; more steps
    add levels log-uniform down to 0.7 sigma_data / steps. A consistency model maps any
    level straight to the data, so unlike an ODE solver it gains little from more levels
    at high noise.
    """
    steps = _check_steps(steps)
    hi = min(1.642 * sigma_data, schedule.sigma_max)
    lo = max(0.7 * sigma_data / steps, schedule.sigma_min)
    top = torch.tensor([schedule.sigma_max], dtype=_F64)
    if steps == 1:
        return _finish(top)
    inner = torch.exp(torch.linspace(math.log(hi), math.log(min(lo, hi)), steps - 1, dtype=_F64))
    return _finish(torch.cat([top, inner]))


GRIDS: dict[str, Callable[..., Tensor]] = {
    "leading": lambda schedule, steps: uniform_t(schedule, steps, "leading"),
    "trailing": lambda schedule, steps: uniform_t(schedule, steps, "trailing"),
    "linspace": lambda schedule, steps: uniform_t(schedule, steps, "linspace"),
    "karras": karras,
    "logsnr": logsnr_uniform,
    "few_step": few_step,
    "cosine_uniform": cosine_uniform,
    "consistency": consistency_grid,
    "auto": lambda schedule, steps: GRIDS[auto_spacing(schedule, steps)](schedule, steps),
}


def auto_spacing(schedule: Schedule, steps: int) -> str:
    """The grid that ``grid`` and ``sculpt.sample`` use when none is named: ``cosine_uniform``.

    Fitted on trained models (benchmarks/samplers.py ``--models``): the default digits and
    MNIST runs (cosine schedule, v target) and the digits run with EDM's schedule, target and
    weighting. On all three, with every solver, ``cosine_uniform`` is the best grid or within
    2% of it at every NFE from 3 to 20 (digits, unipc: FD 6.61 at NFE 5 against 9.50 on
    ``few_step``, 524 on ``karras``; 5.84 at 10 against 6.40; the EDM model 6.65 at 5 against
    18.2 on its own ``karras`` levels). Gaussian mixtures with exact denoisers
    (benchmarks/defaults.py) disagree: their sharp modes want levels down to ~0.1 / steps,
    which ``few_step`` gives (2-5x lower FD there), but a trained network is least accurate
    exactly there, and a user samples a trained network. The better trained, the more so: leaning
    level by level toward ``few_step`` (a quarter of the way in log sigma) costs the MNIST run
    trained for 500 steps 4% at NFE 10 and the one trained for 2000 steps 24% (FD 66.9 -> 82.9),
    while it halves the 48-D mixture's FD. ``spacing=`` overrides it.
    """
    _check_steps(steps)
    return "cosine_uniform"


def resolve_spacing(schedule: Schedule, steps: int, spacing: str | None = None) -> str:
    """The concrete grid name: ``spacing`` itself, or the rule's choice where it is None or ``auto``."""
    if spacing is None or spacing == "auto":
        return auto_spacing(schedule, steps)
    if spacing not in GRIDS:
        raise ValueError(f"unknown spacing {spacing!r}; valid names: {', '.join(GRIDS)}")
    return spacing


def grid(schedule: Schedule, steps: int, spacing: str | None = None, **options: float) -> Tensor:
    """The step grid named ``spacing`` (``GRIDS``); None or ``auto``: the one ``auto_spacing`` picks for steps."""
    return GRIDS[resolve_spacing(schedule, _check_steps(steps), spacing)](schedule, steps, **options)
