"""Schedules and grids against their closed forms."""

import math

import pytest
import torch

from sculpt import schedules as S

ALL = sorted(S.SCHEDULES)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("options", [{}, {"res": 128}, {"zero_terminal_snr": True}])
def test_sigma_t_round_trip(name, options):
    schedule = S.make(name, **options)
    t = torch.linspace(0, 1, 257, dtype=torch.float64)
    sigma = schedule.sigma(t)
    finite = torch.isfinite(sigma)
    # sigma(t(sigma)) == sigma on the whole range, and t(sigma(t)) == t
    assert torch.allclose(schedule.sigma(schedule.t(sigma[finite])), sigma[finite], rtol=1e-7)
    assert torch.allclose(schedule.t(sigma[finite]), t[finite], atol=1e-7)
    assert (sigma[1:] > sigma[:-1]).all(), "sigma must increase with t"


def test_linear_is_ddpm_cumprod():
    schedule = S.make("linear")
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    alpha_bar = torch.cumprod(1 - betas, 0)
    t = torch.arange(1000, dtype=torch.float64) / 999
    assert schedule.num_steps == 1000
    assert torch.allclose(schedule.alpha_bar(t), alpha_bar, atol=1e-6, rtol=0)
    assert (schedule.alpha_bar(t) - alpha_bar).abs().max() < 1e-12
    assert torch.allclose(schedule.sigmas, ((1 - alpha_bar) / alpha_bar).sqrt(), rtol=1e-12)
    assert math.isclose(schedule.sigma_max, 157.4073, rel_tol=1e-5)


def test_cosine_betas_are_clipped_and_match_nichol_dhariwal():
    schedule = S.make("cosine")
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    betas = [min(1 - f((i + 1) / 1000) / f(i / 1000), 0.999) for i in range(1000)]
    expected = torch.cumprod(1 - torch.tensor(betas, dtype=torch.float64), 0)
    assert torch.allclose(schedule.alpha_bar(torch.arange(1000, dtype=torch.float64) / 999), expected, rtol=1e-10)
    assert max(betas) == 0.999  # the last beta is clipped


def test_scaled_linear_and_peers_alpha_bar():
    diffusers = pytest.importorskip("diffusers")
    for name in ["linear", "scaled_linear", "squaredcos_cap_v2"]:
        betas = {"beta_start": 0.00085, "beta_end": 0.012} if name == "scaled_linear" else {}
        peer = diffusers.DDPMScheduler(beta_schedule=name, **betas)
        ours = S.make({"squaredcos_cap_v2": "cosine"}.get(name, name))
        t = torch.arange(1000, dtype=torch.float64) / 999
        assert torch.allclose(ours.alpha_bar(t), peer.alphas_cumprod.double(), rtol=2e-5), name


def test_zero_terminal_snr_endpoints():
    for name in ["linear", "scaled_linear", "cosine", "sigmoid", "edm"]:
        base, zsnr = S.make(name), S.make(name, zero_terminal_snr=True)
        assert zsnr.alpha_bar(1.0).item() == 0.0, name
        assert math.isinf(zsnr.sigma_max)
        assert zsnr.alpha_bar(0.0).item() == pytest.approx(base.alpha_bar(0.0).item(), rel=1e-12, abs=0)
        assert zsnr.t(math.inf).item() == pytest.approx(1.0, abs=1e-8)


def test_zero_terminal_snr_matches_diffusers_rescale():
    diffusers = pytest.importorskip("diffusers")
    peer = diffusers.DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True
    )
    ours = S.make("scaled_linear", zero_terminal_snr=True)
    t = torch.arange(1000, dtype=torch.float64) / 999
    assert torch.allclose(ours.alpha_bar(t), peer.alphas_cumprod.double(), atol=1e-6)


@pytest.mark.parametrize("name", ALL)
def test_shift_moves_logsnr_by_exactly_the_stated_amount(name):
    base = S.make(name)
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    for res, base_res in [(128, 64), (32, 64), (256, 32)]:
        shifted = S.make(name, res=res, base_res=base_res)
        delta = shifted.logsnr(t) - base.logsnr(t)
        assert torch.allclose(delta, torch.full_like(delta, 2 * math.log(base_res / res)), atol=1e-9)
    # input scaling by b is the same process as shift 1/b
    assert torch.allclose(S.make(name, input_scale=0.5).logsnr(t), S.make(name, shift=2.0).logsnr(t))


def test_edm_schedule_and_training_distribution():
    schedule = S.make("edm")
    assert schedule.sigma_min == pytest.approx(0.002) and schedule.sigma_max == pytest.approx(80.0)
    sigma = schedule.sample_sigma(200_000, generator=torch.Generator().manual_seed(0))
    log_sigma = sigma.log()
    assert log_sigma.mean().item() == pytest.approx(-1.2, abs=0.01)
    assert log_sigma.std().item() == pytest.approx(1.2, abs=0.01)


def test_discrete_training_draws_exact_levels():
    schedule = S.make("linear")
    sigma = schedule.sample_sigma(5000, generator=torch.Generator().manual_seed(0))
    index = (schedule.sigmas[None, :] - sigma[:, None]).abs().argmin(1)
    assert torch.equal(schedule.sigmas[index], sigma)
    assert index.min() == 0 and index.max() == 999  # uniform over all 1000 levels, both ends included


def test_uniform_grids_match_diffusers_timesteps():
    diffusers = pytest.importorskip("diffusers")
    schedule = S.make("linear")
    for spacing in ["leading", "trailing", "linspace"]:
        for steps in [1, 7, 10, 50, 1000]:
            peer = diffusers.DDIMScheduler(timestep_spacing=spacing)
            peer.set_timesteps(steps)
            sigmas = S.grid(schedule, steps, spacing)
            expected = schedule.sigmas[peer.timesteps.long()]
            assert len(sigmas) == steps + 1 and sigmas[-1] == 0
            assert torch.allclose(sigmas[:-1], expected, rtol=1e-10), (spacing, steps)


#: Every schedule kind: discrete VP, continuous VP (sigmoid), EDM, zero terminal SNR, shifted.
KINDS = {
    **{name: {"name": name} for name in ALL},
    "zsnr": {"name": "linear", "zero_terminal_snr": True},
    "edm+zsnr": {"name": "edm", "zero_terminal_snr": True},
    "cosine*4": {"name": "cosine", "shift": 4.0},
    "sigmoid/res": {"name": "sigmoid", "res": 16, "base_res": 64},
}


@pytest.mark.parametrize("spacing", [*S.GRIDS, None])
@pytest.mark.parametrize("kind", list(KINDS))
def test_every_grid_is_decreasing_ends_in_zero_and_stays_in_the_schedules_range(spacing, kind):
    options = dict(KINDS[kind])
    schedule = S.make(options.pop("name"), **options)
    for steps in [1, 2, 3, 4, 5, 8, 10, 20, 50]:
        sigmas = S.grid(schedule, steps, spacing)
        assert len(sigmas) == steps + 1, (spacing, steps, sigmas)
        assert sigmas[-1] == 0 and (sigmas[1:] < sigmas[:-1]).all()
        levels = sigmas[:-1]
        # within the schedule's [sigma_min, sigma_max], up to round-off (karras takes rho-th powers and roots)
        assert levels.max() <= schedule.sigma_max * (1 + 1e-9), (spacing, steps, levels)
        assert levels.min() >= schedule.sigma_min * (1 - 1e-9), (spacing, steps, levels)
        if math.isinf(schedule.sigma_max) and spacing != "leading" and steps > 1:
            assert math.isinf(sigmas[0])  # zero terminal SNR starts from pure noise


def test_karras_grid_formula():
    schedule = S.make("edm")
    sigmas = S.karras(schedule, 4, rho=7.0)
    ramp = torch.linspace(0, 1, 4, dtype=torch.float64)
    expected = (80 ** (1 / 7) + ramp * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert torch.allclose(sigmas[:-1], expected, rtol=1e-12)
    log_sigmas = S.logsnr_uniform(schedule, 5)[:-1].log()
    assert torch.allclose(log_sigmas.diff(), log_sigmas.diff()[:1].expand(4), rtol=1e-12)


def test_bad_input_messages():
    with pytest.raises(ValueError, match="valid names: cosine, edm, linear, scaled_linear, sigmoid"):
        S.make("cosin")
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        S.grid(S.make("linear"), 0)
    with pytest.raises(ValueError, match="sigma must be >= 0"):
        S.make("linear").t(-1.0)
    with pytest.raises(ValueError, match="t must lie in"):
        S.make("linear").sigma(1.5)
    with pytest.raises(ValueError, match="unknown spacing 'uniform'; valid names"):
        S.grid(S.make("linear"), 10, "uniform")
    with pytest.raises(ValueError, match="shift must be a positive"):
        S.make("linear", shift=-1.0)
    with pytest.raises(ValueError, match="bad option for schedule 'edm'"):
        S.make("edm", beta_end=0.1)


@pytest.mark.parametrize(
    "name, options",
    [("cosine", {}), ("linear", {"zero_terminal_snr": True}), ("edm", {}), ("sigmoid", {}), ("edm", {"shift": 0.5})],
)
def test_quantile_is_the_training_distributions_inverse_cdf(name, options):
    schedule = S.make(name, **options)
    n = 40_000
    drawn = schedule.sample_sigma(n, generator=torch.Generator().manual_seed(0)).sort().values
    by_quantile = schedule.quantile((torch.arange(n, dtype=torch.float64) + 0.5) / n)
    assert torch.all(by_quantile[1:] >= by_quantile[:-1])  # monotone in u
    # Kolmogorov-Smirnov: the empirical CDF of the draws at each quantile's level is u, to within 1%
    finite = by_quantile[torch.isfinite(by_quantile)]
    cdf = torch.searchsorted(drawn, finite, right=True).double() / n
    u = (torch.arange(n, dtype=torch.float64)[: len(finite)] + 0.5) / n
    assert (cdf - u).abs().max() < 0.012
