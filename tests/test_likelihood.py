"""Bits per dimension against closed forms: Gaussian and mixture densities, a uniform cube, the VLB.

The toy mixtures of `sculpt.toy` have exact denoisers and exact log-densities, so the
probability-flow ODE's answer can be checked to the integrator's accuracy, and the two
routes (ODE, VLB) against each other on the same model.
"""

import math

import numpy as np
import pytest
import torch

from sculpt.metrics.likelihood import (
    _log_normal_cdf_difference,
    bits_per_dim,
    bpd_ode,
    bpd_vlb,
    choose_sigma_min,
    discretized_gaussian_log_likelihood,
    point_mass_sigma,
    quantize,
    uniform_dequantize,
)
from sculpt.schedules import DiscreteSchedule, make
from sculpt.toy import GaussianMixture

SIGMA_MIN, SIGMA_MAX = 1e-3, 1e4
CONTINUOUS = {"sigma_min": SIGMA_MIN, "sigma_max": SIGMA_MAX, "bits": None}  # no quantisation


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def gaussian():
    gm = GaussianMixture.make([1.0], [[0.3, -0.2, 0.5]], [0.4])
    return gm, gm.sample(64, generator=gen(0))[0]


@pytest.fixture(scope="module")
def mixture():
    gm = GaussianMixture.make([0.5, 0.3, 0.2], [[-1.0, 0.5, 0.0], [1.0, -0.5, 0.5], [0.0, 1.0, -1.0]], [0.3, 0.5, 0.4])
    return gm, gm.sample(64, generator=gen(0))[0]


@pytest.fixture(scope="module")
def cube_mixture():
    """A 4-D mixture well inside [-1, 1] (4.3 standard deviations from the nearest face), quantised to 8 bits."""
    gm = GaussianMixture.make([0.6, 0.4], [[-0.35] * 4, [0.3, 0.35, -0.2, 0.3]], [0.15, 0.2])
    x = gm.sample(512, generator=gen(0))[0]
    assert x.abs().max() < 1
    return gm, quantize(x)


# ----------------------------------------------------------------------------- units


def test_uniform_density_on_the_cube_is_exactly_8_bits():
    # 8-bit bins have width 2/255 and the data cube [-1 - 1/255, 1 + 1/255] has side 256 * 2/255.
    dims = 12
    log_prob_uniform = -dims * math.log(256 * 2 / 255)
    assert bits_per_dim(log_prob_uniform, dims, bits=8) == pytest.approx(8.0, abs=1e-12)
    assert bits_per_dim(-dims * math.log(16 * 2 / 15), dims, bits=4) == pytest.approx(4.0, abs=1e-12)
    # Continuous data: plain -log p / (D ln 2), no offset.
    assert bits_per_dim(-dims * math.log(2), dims, bits=None) == pytest.approx(1.0, abs=1e-12)


def test_quantize_matches_to_uint8_and_dequantize_stays_in_the_bin():
    from sculpt.images import to_uint8

    x = torch.rand(2, 3, 5, 5, generator=gen(1), dtype=torch.float64) * 2.2 - 1.1
    x[0, 0, 0, :2] = torch.tensor([0.0, 127.5 / 127.5 - 1])  # a half-way value: round half to even
    levels = torch.from_numpy(to_uint8(x)).movedim(-1, 1).double()
    assert torch.equal(quantize(x), levels / 127.5 - 1)
    noisy = uniform_dequantize(x, generator=gen(2))
    assert (noisy - quantize(x)).abs().max() <= 1 / 255
    assert (noisy - quantize(x)).abs().max() > 0.9 / 255  # the noise fills the bin


def _uniform_cube_denoiser(half_width: float):
    """E[x0 | x] for x0 ~ U(-a, a)^D, x = x0 + sigma eps: the mean of a normal truncated to [-a, a]."""

    def denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = sigma.to(x).reshape(-1, *([1] * (x.ndim - 1)))
        alpha, beta = (-half_width - x) / s, (half_width - x) / s
        log_mass = _log_normal_cdf_difference(beta, alpha)
        log_pdf = lambda z: -0.5 * z**2 - 0.5 * math.log(2 * math.pi)
        return x + s * (torch.exp(log_pdf(alpha) - log_mass) - torch.exp(log_pdf(beta) - log_mass))

    return denoiser


def test_ode_reports_8_bits_for_uniform_data_under_the_uniform_cube_model():
    # End to end: dequantisation, ODE, prior and the units conversion together.
    levels = torch.randint(0, 256, (128, 2), generator=gen(3)).double()
    x = levels / 127.5 - 1
    denoiser = _uniform_cube_denoiser(1 + 1 / 255)
    result = bpd_ode(denoiser, x, sigma_min=1e-5, sigma_max=1e3, steps=96, probe="exact", generator=gen(4))
    # Blurring by sigma_min only matters within ~1e-5 of a face: below 1e-3 bits.
    assert abs(result.bpd - 8.0) < 2e-3, result.bpd
    assert np.abs(result.bpd_per_sample - 8.0).max() < 0.02


# ----------------------------------------------------------------------------- ODE route


def test_ode_matches_exact_gaussian_log_density(gaussian):
    gm, x = gaussian
    exact = gm.log_prob(x, SIGMA_MIN).numpy()
    result = bpd_ode(gm.denoiser, x, **CONTINUOUS, steps=128, probe="exact")
    # The prior N(0, sigma_max^2 I) is off by ~|mu| / sigma_max ~ 1e-4 nats; rk4's error is below that.
    assert np.abs(result.log_prob - exact).max() < 1e-3
    assert result.nfe == 4 * 128
    assert result.bpd == pytest.approx(-exact.mean() / (3 * math.log(2)), abs=1e-3)


def test_rk4_and_heun_converge_at_their_order(gaussian):
    gm, x = gaussian
    exact = gm.log_prob(x, SIGMA_MIN).numpy()

    def error(solver: str, steps: int) -> float:
        result = bpd_ode(gm.denoiser, x, **CONTINUOUS, solver=solver, steps=steps, probe="rademacher", generator=gen(0))
        return float(np.abs(result.log_prob - exact).max())

    # A Gaussian's Jacobian is a multiple of I, so Rademacher probes give its trace exactly.
    rk4_ratio = error("rk4", 32) / error("rk4", 64)
    heun_ratio = error("heun", 64) / error("heun", 128)
    assert rk4_ratio > 8, rk4_ratio  # 4th order: 16x
    assert 2.5 < heun_ratio < 6, heun_ratio  # 2nd order: 4x


def test_ode_matches_exact_mixture_log_density_with_exact_trace_and_dopri5(mixture):
    gm, x = mixture
    exact = gm.log_prob(x, SIGMA_MIN).numpy()
    result = bpd_ode(gm.denoiser, x, **CONTINUOUS, solver="dopri5", rtol=1e-6, atol=1e-6, probe="exact")
    assert np.abs(result.log_prob - exact).max() < 1e-3
    assert result.settings["solver"] == "dopri5" and result.nfe > 50


def test_hutchinson_estimate_is_within_its_standard_error(mixture):
    gm, x = mixture
    exact = gm.log_prob(x, SIGMA_MIN).numpy()
    result = bpd_ode(gm.denoiser, x, **CONTINUOUS, steps=48, probes=8, probe="rademacher", generator=gen(1))
    diff, stderr = result.log_prob - exact, result.log_prob_stderr
    integration = 0.02  # rk4 with 48 steps, measured with the exact trace
    assert stderr.shape == (64,) and stderr.max() > 0.01  # the mixture's Jacobian is not a multiple of I
    # 8 probes: stderr is itself a noisy estimate (t with 7 degrees of freedom), hence 90%;
    # measured 94-98% over four seeds.
    assert (np.abs(diff) <= 4 * stderr + integration).mean() >= 0.9
    mean_stderr = math.sqrt((stderr**2).sum()) / len(stderr)
    assert abs(diff.mean()) < 4 * mean_stderr + integration


def test_ode_batches_and_inputs_are_checked(gaussian):
    gm, x = gaussian
    whole = bpd_ode(gm.denoiser, x[:8], **CONTINUOUS, steps=8, probe="exact")
    split = bpd_ode(gm.denoiser, x[:8], **CONTINUOUS, steps=8, probe="exact", batch_size=3)
    np.testing.assert_allclose(whole.log_prob, split.log_prob, rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="solver"):
        bpd_ode(gm.denoiser, x, **CONTINUOUS, solver="euler")
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        bpd_ode(gm.denoiser, x, sigma_min=1.0, sigma_max=0.5)


# ----------------------------------------------------------------------------- VLB route


def test_discretized_gaussian_masses_sum_to_one_over_the_bins():
    levels = torch.arange(256, dtype=torch.float64)[:, None] / 127.5 - 1  # every bin of one dimension
    for mean, std in [(0.0, 0.05), (0.99, 0.01), (-1.2, 0.3), (0.3, 1e-3)]:
        log_mass = discretized_gaussian_log_likelihood(levels, torch.full_like(levels, mean), std)
        assert float(torch.logsumexp(log_mass, 0)) == pytest.approx(0.0, abs=1e-12)
    # A bin 30 standard deviations out keeps full relative precision (no 1 - 1 cancellation).
    far = discretized_gaussian_log_likelihood(torch.tensor([[0.3]], dtype=torch.float64), torch.zeros(1, 1), 0.01)
    upper, lower = (0.3 + 1 / 255) / 0.01, (0.3 - 1 / 255) / 0.01
    expected = math.log(0.5 * (math.erfc(lower / math.sqrt(2)) - math.erfc(upper / math.sqrt(2))))
    assert expected < -400
    assert float(far) == pytest.approx(expected, rel=1e-9)


def _geometric_schedule(sigma_1: float, ratio: float, sigma_T: float) -> DiscreteSchedule:
    """A discrete schedule whose sigmas grow by a constant factor: every step covers the same log-SNR."""
    count = math.ceil(math.log(sigma_T / sigma_1) / math.log(ratio)) + 1
    sigmas = sigma_1 * ratio ** torch.arange(count, dtype=torch.float64)
    alpha_bar = 1 / (1 + sigmas**2)
    betas = 1 - alpha_bar / torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
    return DiscreteSchedule(betas, "geometric")


def _discretisation_excess(schedule, data_std: float) -> float:
    """Bits/dim by which a discrete-time VLB exceeds the continuous one for data smooth below data_std.

    Where E||x0 - D||^2 = v(sigma) = sigma^2 s^2 / (s^2 + sigma^2) per dimension, a step
    sigma_{t-1} -> r sigma_{t-1} costs (1/2 (r^2 - 1) - ln r) v / sigma_t^2 nats more than the
    integral it approximates.
    """
    sigmas = schedule.sigmas
    ratio = sigmas[1:] / sigmas[:-1]
    weight = data_std**2 / (data_std**2 + sigmas[1:] ** 2)
    return float(((0.5 * (ratio**2 - 1) - torch.log(ratio)) * weight).sum() / math.log(2))


def _fixed_small_decoder_excess(schedule) -> float:
    """Bits/dim lost by a decoder of std sqrt(beta~_2) where x0 - D(x_1) has std ~sigma_1 (data smooth at sigma_1).

    E[-log N(e; 0, s_d^2)] - E[-log N(e; 0, sigma_1^2)] for e ~ N(0, sigma_1^2) is
    ln(s_d / sigma_1) + sigma_1^2 / (2 s_d^2) - 1/2 (0.16 bits for the linear schedule, s_d = 0.74 sigma_1).
    """
    s1, s2 = (float(v) for v in schedule.sigmas[:2])
    ratio = math.sqrt((s2**2 - s1**2) / ((1 + s1**2) * s2**2))  # s_d / sigma_1
    return (math.log(ratio) + 0.5 / ratio**2 - 0.5) / math.log(2)


@pytest.fixture(scope="module")
def cube_ode(cube_mixture):
    gm, x = cube_mixture
    return bpd_ode(gm.denoiser, x, sigma_min=SIGMA_MIN, sigma_max=200.0, steps=48, probe="exact", generator=gen(3))


def test_ode_bpd_of_8_bit_data_matches_the_exact_bin_masses(cube_mixture, cube_ode):
    gm, x = cube_mixture
    # The mixture varies little across a bin (std 0.15 >> 2/255), so the mass of a bin is its
    # density at the centre times the bin volume (2/255)^D.
    exact = bits_per_dim(gm.log_prob(x), 4, bits=8)
    paired = cube_ode.bpd_per_sample - exact
    assert abs(paired.mean()) < 3 * paired.std() / math.sqrt(len(paired)) + 1e-3
    assert abs(cube_ode.bpd - exact.mean()) < 0.01


def test_vlb_on_linear_schedule_exceeds_ode_by_the_predicted_discretisation_gap(cube_mixture, cube_ode):
    gm, x = cube_mixture
    schedule = make("linear")
    vlb = bpd_vlb(gm.denoiser, schedule, x, generator=gen(1), return_terms=True)
    gap = vlb.bpd_per_sample - cube_ode.bpd_per_sample
    stderr = gap.std() / math.sqrt(len(gap))
    # 0.63 bits/dim from the coarse first steps (sigma ratios 1.48, 1.28, 1.20, ...) and 0.16
    # from the over-confident fixed_small decoder: 0.79 predicted; measured 0.67-0.85 over
    # four data seeds (standard error 0.05 each).
    predicted = _discretisation_excess(schedule, 0.15) + _fixed_small_decoder_excess(schedule)
    # Tolerance: 4 standard errors (~0.2) of the paired difference plus 0.05 for what the
    # prediction leaves out (quantised x0 at sigma_1 ~ one bin, the mixture's second scale).
    assert gap.mean() > -3 * stderr  # a bound: never below the ODE's bpd
    assert abs(gap.mean() - predicted) < 4 * stderr + 0.05, (gap.mean(), predicted, stderr)
    assert vlb.terms.shape == (1001,) and np.isfinite(vlb.terms).all()
    assert vlb.terms[0] < 1e-3  # L_T: alpha_bar_T = 4e-5, the prior term is almost nothing
    assert vlb.nfe == 1000


def test_vlb_and_ode_agree_on_a_fine_schedule(cube_mixture, cube_ode):
    gm, x = cube_mixture
    # 500 steps of constant sigma ratio 1.02 from one bin width: the discretisation excess is
    # 0.085 bits/dim at most (measured 0.01); Ho's decoder variance beta_1 matches the
    # posterior spread at sigma_1.
    schedule = _geometric_schedule(2 / 255, 1.02, 160.0)
    vlb = bpd_vlb(gm.denoiser, schedule, x, decoder_variance="beta", generator=gen(2))
    gap = vlb.bpd_per_sample - cube_ode.bpd_per_sample
    stderr = gap.std() / math.sqrt(len(gap))
    assert -3 * stderr < gap.mean() < _discretisation_excess(schedule, 0.15) + 3 * stderr, (gap.mean(), stderr)


def test_vlb_subsampled_timesteps_are_unbiased(cube_mixture):
    gm, x = cube_mixture
    x = x[:128]
    schedule = make("linear")
    full = [bpd_vlb(gm.denoiser, schedule, x, generator=gen(seed)).bpd for seed in range(3)]
    sampled = [bpd_vlb(gm.denoiser, schedule, x, timesteps=40, generator=gen(10 + seed)) for seed in range(6)]
    assert sampled[0].nfe == 41 and sampled[0].settings["sampling"] == "logsnr"
    values = np.array([r.bpd for r in sampled])
    spread = math.sqrt(np.var(full, ddof=1) / 3 + values.var(ddof=1) / 6)
    assert abs(values.mean() - np.mean(full)) < 4 * spread + 0.02, (values, full)


def test_vlb_rejects_continuous_schedules(cube_mixture):
    gm, x = cube_mixture
    with pytest.raises(ValueError, match="discrete schedule"):
        bpd_vlb(gm.denoiser, make("edm"), x)


# ----------------------------------------------------------------------------- where the ODE starts

BIN = 2 / 255


class _GridPointMasses:
    """Data on the 8-bit grid only: level v (x_v = v / 127.5 - 1) with probability P[v], each dimension alone.

    The exact denoiser is the posterior mean over the levels, and the blurred density
    p_sigma(x) = prod_i sum_v P[v] N(x_i; x_v, sigma^2) is closed form too. Levels with
    P[v] = 0 are left out (they change nothing).
    """

    def __init__(self, probs: torch.Tensor) -> None:
        probs = probs.to(torch.float64)
        self.probs = probs
        live = torch.nonzero(probs > 0).flatten()
        self.log_p = torch.log(probs[live])
        self.levels = live.double() / 127.5 - 1

    def _logits(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = sigma.to(x).reshape(-1, *([1] * x.ndim)) if sigma.ndim else sigma.to(x)
        return self.log_p - 0.5 * ((x[..., None] - self.levels) / s) ** 2

    def denoiser(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        logits = self._logits(x.to(torch.float64), torch.as_tensor(sigma, dtype=torch.float64))
        return (torch.softmax(logits, -1) * self.levels).sum(-1)

    def log_prob(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        logits = self._logits(x.to(torch.float64), torch.tensor(sigma, dtype=torch.float64))
        per_dim = torch.logsumexp(logits, -1) - 0.5 * math.log(2 * math.pi * sigma**2)
        return per_dim.reshape(x.shape[0], -1).sum(1)

    def discrete_nll_bits(self, x: torch.Tensor) -> torch.Tensor:
        """The exact -log2 P(v) per dimension of grid data."""
        index = ((x + 1) * 127.5).round().long()
        return -torch.log2(self.probs[index]).reshape(x.shape[0], -1).mean(1)


def _point_mass_bound_bits(sigma: float) -> float:
    """E_u[-log N(u; 0, sigma^2)] - log Δ in bits, u ~ U(-Δ/2, Δ/2): the ODE's bound for a point mass."""
    return (0.5 * math.log(2 * math.pi * sigma**2) + BIN**2 / (24 * sigma**2) - math.log(BIN)) / math.log(2)


def test_point_mass_sigma_is_the_minimiser_of_the_point_mass_bound():
    sigma = point_mass_sigma(8)
    assert sigma == pytest.approx(BIN / math.sqrt(12), rel=1e-15)
    assert sigma == pytest.approx(2.264e-3, abs=1e-6)
    # 1/2 log2(2 pi e / 12) at the minimum; the old start 1e-3 was 2.05 bits/dim above the exact 0.
    assert _point_mass_bound_bits(sigma) == pytest.approx(0.5 * math.log2(2 * math.pi * math.e / 12), abs=1e-12)
    assert _point_mass_bound_bits(sigma) == pytest.approx(0.2546, abs=1e-4)
    assert _point_mass_bound_bits(1e-3) == pytest.approx(2.0517, abs=1e-3)
    for factor in (0.9, 1.1):
        assert _point_mass_bound_bits(factor * sigma) > _point_mass_bound_bits(sigma)


def test_ode_bound_of_a_point_mass_matches_its_closed_form_and_defaults_to_the_tightest_start():
    # One grid value per dimension (the exact discrete NLL is 0 bits/dim); the model knows it.
    probs = torch.zeros(256, dtype=torch.float64)
    probs[[40, 128, 200]] = 1 / 3  # three point masses; every image sits on one of them per dimension
    model = _GridPointMasses(probs)
    levels = torch.tensor([40, 128, 200])[torch.randint(0, 3, (256, 3), generator=gen(5))]
    x = levels.double() / 127.5 - 1
    assert model.discrete_nll_bits(x).max() == pytest.approx(math.log2(3), abs=1e-9)  # 1/3 each: log2(3) exactly
    result = bpd_ode(model.denoiser, x, sigma_max=1e3, steps=64, probe="exact", generator=gen(6))
    assert result.settings["sigma_min"] == pytest.approx(point_mass_sigma())
    # Per sample against the closed form at the same dequantised point (the first draw of the generator).
    dequantised = uniform_dequantize(x, generator=gen(6))
    exact = model.log_prob(dequantised, point_mass_sigma()).numpy()
    np.testing.assert_allclose(result.log_prob, exact, rtol=0, atol=2e-3)
    # Its mean: log2(3) (which mass) plus the blur cost 1/2 log2(2 pi e / 12) over the sample's E[u^2].
    gap = result.bpd_per_sample - model.discrete_nll_bits(x).numpy()
    stderr = gap.std() / math.sqrt(len(gap))
    assert abs(gap.mean() - 0.5 * math.log2(2 * math.pi * math.e / 12)) < 3 * stderr + 2e-3, (gap.mean(), stderr)
    # The old start, 1e-3, is 1.8 bits/dim looser on the same points (1.72 on this sample's u), as its closed form says.
    # (dopri5: from 1e-3 the path crosses between the masses more sharply than 64 rk4 steps resolve.)
    old = bpd_ode(
        model.denoiser, x, sigma_min=1e-3, sigma_max=1e3, solver="dopri5", rtol=1e-6, atol=1e-6, probe="exact",
        generator=gen(6),
    )
    np.testing.assert_allclose(old.log_prob, model.log_prob(dequantised, 1e-3).numpy(), rtol=0, atol=2e-3)
    assert old.bpd - result.bpd > 1.6


def _discretised_gaussian_probs(std_bins: float) -> torch.Tensor:
    """P[w] of N(128 levels, (std_bins levels)^2) rounded to the grid."""
    edges = torch.arange(257, dtype=torch.float64) - 0.5 - 128
    cdf = 0.5 * torch.special.erfc(-edges / (std_bins * math.sqrt(2)))
    probs = cdf[1:] - cdf[:-1]
    probs = torch.where(probs > 1e-16, probs, 0)  # 8.3 standard deviations: the levels that matter
    return probs / probs.sum()


def _bound_by_quadrature(probs: torch.Tensor, sigma: float, points: int = 2000) -> float:
    """E_v E_u[-log p_sigma(x_v + u)] - log Δ bits per dimension, by the midpoint rule over u in each bin."""
    model = _GridPointMasses(probs)
    u = ((torch.arange(points, dtype=torch.float64) + 0.5) / points - 0.5) * BIN
    x = (model.levels[:, None] + u).reshape(-1, 1)
    nll = -model.log_prob(x, sigma).reshape(len(model.levels), points).mean(1)
    return float((model.log_p.exp() * nll).sum() - math.log(BIN)) / math.log(2)


def test_ode_bound_of_a_discretised_gaussian_against_its_exact_entropy_and_choose_sigma_min():
    probs = _discretised_gaussian_probs(1.0)  # std one bin: neither smooth nor a point mass
    entropy = float(-(probs * torch.log2(probs.clamp(min=1e-300))).sum())
    assert entropy == pytest.approx(2.1048, abs=1e-3)  # the exact discrete NLL, bits/dim
    model = _GridPointMasses(probs)
    # The bound at each start, by quadrature: all above the entropy; tightest near 2 Δ/sqrt(12).
    factors = (0.5, 1.0, 2.0, 4.0)
    bounds = {f: _bound_by_quadrature(probs, f * point_mass_sigma()) for f in factors}
    assert all(b > entropy for b in bounds.values())
    assert min(bounds, key=bounds.get) == 2.0
    assert bounds[2.0] - entropy < 0.07 and bounds[1.0] - entropy < 0.1
    index = torch.multinomial(probs, 2 * 512, replacement=True, generator=gen(7)).reshape(512, 2)
    x = index.double() / 127.5 - 1
    pilot, scored = x[:64], x[64:]
    choice = choose_sigma_min(model.denoiser, pilot, sigma_max=1e3, steps=48, probe="exact", seed=3)
    assert choice.candidates == pytest.approx(tuple(f * point_mass_sigma() for f in factors))
    assert choice.sigma_min == choice.candidates[int(np.argmin(choice.pilot_bpd))] and choice.pilot_n == 64
    # 1 and 2 differ by 0.013 bits/dim, more than 64 pilot images resolve; either is within 0.02 of the best.
    chosen = factors[choice.candidates.index(choice.sigma_min)]
    assert bounds[chosen] - min(bounds.values()) < 0.02, (chosen, bounds)
    result = bpd_ode(
        model.denoiser, scored, sigma_min=choice.sigma_min, sigma_max=1e3, steps=48, probe="exact", generator=gen(8)
    )
    exact = model.discrete_nll_bits(scored).numpy()
    gap = result.bpd_per_sample - exact
    stderr = gap.std() / math.sqrt(len(gap))
    # A bound (never below the exact value), as loose as the quadrature says.
    assert abs(gap.mean() - (bounds[chosen] - entropy)) < 3 * stderr + 2e-3, (gap.mean(), bounds[chosen], stderr)
    with pytest.raises(ValueError, match="explicit sigma_min"):
        bpd_ode(model.denoiser, x, sigma_max=1e3, bits=None)
    with pytest.raises(ValueError, match="candidates"):
        choose_sigma_min(model.denoiser, pilot, sigma_max=1e3, candidates=[2e3])


# ----------------------------------------------------------------------------- zero terminal SNR


def _finite_copy(schedule, last: float) -> DiscreteSchedule:
    """The same discrete levels with the infinite last one replaced by ``last``."""
    sigmas = schedule.sigmas.clone()
    sigmas[-1] = last
    alpha_bar = 1 / (1 + sigmas**2)
    betas = 1 - alpha_bar / torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
    return DiscreteSchedule(betas, "finite")


def test_vlb_on_a_zero_terminal_snr_schedule_is_finite_and_the_limit_of_finite_ones(cube_mixture):
    gm, x = cube_mixture
    x = x[:96]
    schedule = make("linear", zero_terminal_snr=True)
    assert math.isinf(schedule.sigma_max)
    zsnr = bpd_vlb(gm.denoiser, schedule, x, clip_denoised=False, generator=gen(1), return_terms=True)
    assert np.isfinite(zsnr.bpd_per_sample).all() and np.isfinite(zsnr.terms).all()
    assert zsnr.terms[0] == 0.0  # L_T: q(x_T | x0) is the prior itself
    # L_{T-1}: the exact denoiser at sigma = inf returns the data mean, whatever the noise.
    sigma_prev = float(schedule.sigmas[-2])
    expected = 0.5 * ((x - gm.mean) ** 2).sum(1).mean() / sigma_prev**2
    assert zsnr.terms[1] == pytest.approx(float(expected), rel=1e-12)
    # The same levels with sigma_T = 1e7 instead of inf: the same bound to round-off.
    finite = bpd_vlb(gm.denoiser, _finite_copy(schedule, 1e7), x, clip_denoised=False, generator=gen(1))
    np.testing.assert_allclose(zsnr.log_prob, finite.log_prob, rtol=1e-12, atol=1e-9)
    # Subsampled timesteps: the proposal's weight of the last level is finite and the estimate unbiased.
    options = {"clip_denoised": False}
    sampled = [bpd_vlb(gm.denoiser, schedule, x, timesteps=40, generator=gen(20 + s), **options) for s in range(6)]
    values = np.array([r.bpd for r in sampled])
    full = [zsnr.bpd] + [bpd_vlb(gm.denoiser, schedule, x, generator=gen(seed), **options).bpd for seed in (2, 3)]
    spread = math.sqrt(np.var(full, ddof=1) / 3 + values.var(ddof=1) / 6)
    assert np.isfinite(values).all()
    assert abs(values.mean() - np.mean(full)) < 4 * spread + 0.02, (values, full)


class _ClosedFormVNet(torch.nn.Module):
    """A "network" that outputs the exact v-prediction of a Gaussian mixture, for `Denoiser(prediction="v")`."""

    def __init__(self, gm, schedule) -> None:
        super().__init__()
        self.gm, self.schedule = gm, schedule

    def forward(self, u: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        from sculpt.denoiser import from_x0

        sigma = self.schedule.sigma((c_noise.double() / self.schedule.time_scale).clamp(0, 1))
        x = torch.where(torch.isinf(sigma)[:, None], u, u * torch.sqrt(1 + sigma[:, None] ** 2))
        return from_x0(self.gm.denoiser(x, sigma), "v", x, sigma)


def test_ode_and_vlb_through_a_v_denoiser_on_a_zero_terminal_snr_schedule(gaussian):
    from sculpt.denoiser import Denoiser

    gm, x = gaussian
    schedule = make("linear", zero_terminal_snr=True)
    denoiser = Denoiser(_ClosedFormVNet(gm, schedule), schedule, prediction="v")
    # The ODE's prior sits at a finite sigma_max; a zero-terminal-SNR sigma_max is refused with the fix.
    with pytest.raises(ValueError, match="zero-terminal-SNR"):
        bpd_ode(denoiser, x, sigma_max=schedule.sigma_max, bits=None, sigma_min=0.02)
    sigma_max = min(schedule.sigma_max, 200.0)
    result = bpd_ode(denoiser, x[:16], sigma_min=0.02, sigma_max=sigma_max, bits=None, steps=48, probe="exact")
    direct = bpd_ode(gm.denoiser, x[:16], sigma_min=0.02, sigma_max=sigma_max, bits=None, steps=48, probe="exact")
    exact = gm.log_prob(x[:16], 0.02).numpy()
    assert np.isfinite(result.log_prob).all()
    # The wrapper on the zero-terminal-SNR schedule is the closed form to the float32 of c_noise (measured 6e-9);
    # both are the exact density to rk4's 48 steps (measured 6e-3 nats).
    np.testing.assert_allclose(result.log_prob, direct.log_prob, rtol=0, atol=1e-6)
    np.testing.assert_allclose(result.log_prob, exact, rtol=0, atol=1.5e-2)
    vlb = bpd_vlb(denoiser, schedule, quantize(x[:16]), timesteps=20, generator=gen(2))
    assert np.isfinite(vlb.bpd_per_sample).all()
