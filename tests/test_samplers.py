"""Samplers against truth: exact Gaussian-mixture denoisers, convergence orders, and diffusers."""

import math

import pytest
import torch
from torch import nn

from sculpt import schedules as S
from sculpt.denoiser import Denoiser, from_x0
from sculpt.samplers import NFE, SAMPLERS, StepInfo, check_sigmas, consistency, ddim, sample
from sculpt.toy import GaussianMixture

MIXTURE = GaussianMixture.make([0.5, 0.3, 0.2], [[-1.0, 0.0], [1.0, 0.5], [0.0, -1.2]], [0.3, 0.4, 0.25])
DETERMINISTIC = ["euler", "ddim", "heun", "dpmpp_2m", "dpmpp_3m", "ipndm", "ipndm3", "ipndm_v", "unipc"]
#: Samplers of the data distribution given the exact (MMSE) denoiser. consistency is not one:
#: it needs a consistency model, and on a posterior mean its samples come out too narrow.
DATA_SAMPLERS = [name for name in SAMPLERS if name != "consistency"]


def exact(x, sigma):
    return MIXTURE.denoiser(x, sigma)


@pytest.mark.parametrize("name", DATA_SAMPLERS)
def test_every_sampler_reproduces_the_mixture(name):
    n = 20_000
    g = torch.Generator().manual_seed(0)
    x = sample(exact, (n, 2), sampler=name, steps=100, schedule=S.make("edm"), generator=g, dtype=torch.float64)
    # sampling error of the mean is ~ std / sqrt(n) ~ 0.007; of covariance entries ~ 0.01
    assert torch.allclose(x.mean(0), MIXTURE.mean, atol=0.03)
    assert torch.allclose(torch.cov(x.T), MIXTURE.cov, atol=0.05)
    weights = torch.bincount(MIXTURE.responsibilities(x).argmax(1), minlength=3).double() / n
    assert torch.allclose(weights, MIXTURE.weights, atol=0.02), weights


def _solve(name, steps, start):
    sigmas = S.karras(S.make("edm"), steps)
    return SAMPLERS[name](exact, start * sigmas[0], sigmas)


@pytest.fixture(scope="module")
def ode_reference():
    start = torch.randn(500, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    return start, _solve("unipc", 1000, start)


@pytest.mark.parametrize(
    "name, order",
    [
        ("euler", 1),
        ("ddim", 1),
        ("heun", 2),
        ("dpmpp_2m", 2),
        ("dpmpp_3m", 2),  # the published method: its halved second-difference term leaves it 2nd order
        ("ipndm", 2),  # fixed equal-step weights on a Karras grid's uneven steps
        ("ipndm_v", 3),  # 4th order in the limit; 3.3-3.6 measured over 40-160 steps
        ("unipc", 3),
    ],
)
def test_deterministic_solvers_converge_at_their_order(name, order, ode_reference):
    start, reference = ode_reference
    errors = [(_solve(name, steps, start) - reference).pow(2).mean().sqrt().item() for steps in (40, 80, 160)]
    ratios = [errors[0] / errors[1], errors[1] / errors[2]]
    expected = 2**order
    # the error falls ~2x (first order), ~4x (second), ~8x or better (third; UniC adds one)
    for ratio in ratios:
        assert expected * 0.8 < ratio < expected * 2.6, (name, errors, ratios)


@pytest.mark.parametrize("name", ["euler", "ddim", "heun", "ddpm", "euler_ancestral", "consistency"])
def test_single_step_samplers_split_anywhere_equal_the_full_run(name):
    # No history: two calls split at a level are the same steps, and one generator passed to
    # both calls continues the same stream of noise.
    sigmas = S.karras(S.make("edm"), 20)
    x = sigmas[0] * torch.randn(500, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    sampler = SAMPLERS[name]
    full = sampler(exact, x, sigmas, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    split = sampler(exact, sampler(exact, x, sigmas[:11], generator=g), sigmas[10:], generator=g)
    assert torch.allclose(split, full, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_3m", "ipndm", "ipndm3", "ipndm_v", "unipc"])
def test_multistep_samplers_restart_their_history_on_a_segment(name, ode_reference):
    # Not equivalent to the full run: the second call starts at first order again. It is as
    # accurate: its distance from the converged solution stays within twice the full run's.
    start, reference = ode_reference
    sigmas = S.karras(S.make("edm"), 20)
    sampler = SAMPLERS[name]
    full = sampler(exact, start * sigmas[0], sigmas)
    middle = sampler(exact, start * sigmas[0], sigmas[:11])
    split = sampler(exact, middle, sigmas[10:])
    assert torch.isfinite(middle).all() and torch.isfinite(split).all()
    error_full, error_split = [(y - reference).pow(2).mean().sqrt().item() for y in (full, split)]
    assert (split - full).abs().max() > 1e-4  # the history did restart
    # the ipndm family restarts with an Euler step in sigma, the others with DDIM's exponential-integrator step
    assert error_split < (3 if name.startswith("ipndm") else 2) * error_full, (error_full, error_split)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_runs_a_segment_that_ends_above_zero(name):
    sigmas = S.karras(S.make("edm"), 10)[3:7]  # 3 steps from ~9.7 to ~0.47
    calls, seen = [], []

    def counted(x, sigma):
        calls.append(1)
        return exact(x, sigma)

    x0, _ = MIXTURE.sample(400, generator=torch.Generator().manual_seed(0))
    x = x0 + sigmas[0] * torch.randn(400, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = SAMPLERS[name](counted, x, sigmas, generator=torch.Generator().manual_seed(2), callback=seen.append)
    assert torch.isfinite(out).all()
    assert [step.sigma_next for step in seen] == pytest.approx(sigmas[1:].tolist())
    assert len(calls) == (6 if name == "heun" else 3)  # heun's last step is a full Heun step above 0
    # still noisy at the segment's end: no sampler took its last step for a step to 0 (x = x0_hat)
    assert (out - seen[-1].x0_hat).std() > 0.5 * sigmas[-1]


def test_ddim_on_a_segment_is_two_hand_written_steps():
    sigmas = S.karras(S.make("edm"), 10)
    x0, _ = MIXTURE.sample(300, generator=torch.Generator().manual_seed(0))
    x = x0 + sigmas[4] * torch.randn(300, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = x
    for sigma, sigma_next in [(sigmas[4], sigmas[5]), (sigmas[5], sigmas[6])]:
        x0_hat = exact(expected, sigma.expand(len(x)))
        expected = x0_hat + sigma_next * (expected - x0_hat) / sigma
    assert sigmas[6] > 0
    assert torch.allclose(ddim(exact, x, sigmas[4:7]), expected, rtol=0, atol=1e-12)


def test_segments_are_checked_and_only_sample_needs_the_final_zero():
    assert check_sigmas([2.0, 1.0], end_at_zero=False).tolist() == [2.0, 1.0]
    assert check_sigmas([math.inf, 1.0], end_at_zero=False)[0] == math.inf
    x = torch.zeros(4, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="strictly decreasing"):
        ddim(exact, x, torch.tensor([1.0, 2.0, 0.5]))
    with pytest.raises(ValueError, match="at least 2 entries"):
        ddim(exact, x, torch.tensor([1.0]))
    with pytest.raises(ValueError, match="not NaN"):
        ddim(exact, x, torch.tensor([2.0, math.nan]))
    with pytest.raises(ValueError, match="must end in 0"):
        check_sigmas([2.0, 1.0])
    with pytest.raises(ValueError, match="must end in 0"):
        sample(exact, (4, 2), sampler="ddim", sigmas=torch.tensor([2.0, 1.0]))


def _k_diffusion_sampling():
    """k-diffusion's sampling.py, loaded by path (a test-only peer: ``pip install --no-deps k-diffusion``).

    Its package __init__ imports torchvision and skimage; sampling.py itself needs only torch, scipy,
    tqdm and ``append_dims``. Stubs stand in for the package, its utils and the two ODE/SDE libraries
    that only other samplers use, and are removed again so nothing else sees them.
    """
    import importlib.util
    import sys
    import types

    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("k-diffusion is not installed (pip install --no-deps k-diffusion)")
    root = spec.submodule_search_locations[0]
    package = types.ModuleType("k_diffusion")
    package.__path__ = [root]
    utils = types.ModuleType("k_diffusion.utils")
    utils.append_dims = lambda x, n: x[(...,) + (None,) * (n - x.ndim)]
    torchdiffeq = types.ModuleType("torchdiffeq")
    torchdiffeq.odeint = None
    stubs = {"k_diffusion": package, "k_diffusion.utils": utils, "torchdiffeq": torchdiffeq,
             "torchsde": types.ModuleType("torchsde")}
    saved = {name: sys.modules.get(name) for name in stubs}
    sys.modules.update(stubs)
    try:
        loader = importlib.util.spec_from_file_location("k_diffusion.sampling", f"{root}/sampling.py")
        module = importlib.util.module_from_spec(loader)
        loader.loader.exec_module(module)
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old
    return module


@pytest.mark.parametrize("steps", [4, 10, 25])
def test_dpmpp_3m_is_k_diffusions_dpmpp_3m_sde_at_eta_0(steps):
    k_sampling = _k_diffusion_sampling()
    sigmas = S.karras(S.make("edm"), steps)
    x = sigmas[0] * torch.randn(500, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    theirs = k_sampling.sample_dpmpp_3m_sde(exact, x, sigmas, eta=0.0, disable=True, noise_sampler=lambda s, t: None)
    ours = SAMPLERS["dpmpp_3m"](exact, x, sigmas)
    assert (ours - theirs).abs().max() < 1e-12
    assert (SAMPLERS["dpmpp_2m"](exact, x, sigmas) - k_sampling.sample_dpmpp_2m(exact, x, sigmas, disable=True)).abs(
    ).max() < 1e-12


def test_ipndm_is_adams_bashforth_on_eps_hat():
    sigmas = S.karras(S.make("edm"), 6)
    x = sigmas[0] * torch.randn(50, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected, slopes = x, []
    weights = {1: [1.0], 2: [3 / 2, -1 / 2], 3: [23 / 12, -16 / 12, 5 / 12], 4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}
    for sigma, sigma_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist(), strict=True):
        slopes.insert(0, (expected - exact(expected, torch.full((50,), sigma, dtype=torch.float64))) / sigma)
        slopes = slopes[:4]
        slope = sum(w * d for w, d in zip(weights[len(slopes)], slopes, strict=True))
        expected = expected + (sigma_next - sigma) * slope
    assert torch.allclose(SAMPLERS["ipndm"](exact, x, sigmas), expected, rtol=0, atol=1e-12)
    # on an even grid the variable-step weights are the fixed ones
    even = torch.tensor([6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0], dtype=torch.float64)
    x = 6.0 * torch.randn(50, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert torch.allclose(SAMPLERS["ipndm_v"](exact, x, even), SAMPLERS["ipndm"](exact, x, even), rtol=0, atol=1e-12)


def test_dpmpp_2m_sde_without_noise_steps_from_infinity_like_ddim():
    # eta * h at sigma = inf was 0 * inf = NaN; the step is DDIM's x0_hat + sigma_next * z
    z = torch.randn(50, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigmas = torch.tensor([math.inf, 2.0, 1.0], dtype=torch.float64)
    ours, theirs = [], []
    out = SAMPLERS["dpmpp_2m_sde"](exact, z, sigmas, eta=0.0, callback=ours.append)
    ddim(exact, z, sigmas, callback=theirs.append)
    assert torch.isfinite(out).all()
    assert torch.allclose(ours[0].x, theirs[0].x, rtol=0, atol=1e-12)


def test_one_consistency_step_is_one_denoiser_call_at_sigma_max():
    x = 80.0 * torch.randn(2000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigmas = torch.tensor([80.0, 0.0], dtype=torch.float64)
    out = consistency(exact, x, sigmas, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, exact(x, torch.full((2000,), 80.0, dtype=torch.float64)))
    # at sigma = 80 the posterior mean hardly moves off the data mean (shrinkage ~ 1/80^2)
    assert torch.allclose(out, MIXTURE.mean.expand_as(out), atol=0.05)


def test_consistency_renoises_to_exactly_sigma_next_and_is_reproducible():
    def zeros(x, sigma):
        return torch.zeros_like(x)

    x = torch.randn(20_000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigmas = torch.tensor([2.0, 0.5], dtype=torch.float64)
    out = consistency(zeros, x, sigmas, generator=torch.Generator().manual_seed(7))
    z = torch.randn(20_000, 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    assert torch.equal(out, 0.5 * z)  # sigma_next, not sqrt(sigma_next^2 - sigma_min^2)
    assert out.std().item() == pytest.approx(0.5, abs=0.01)  # std error ~ 0.5 / sqrt(2 * 40000)
    again = consistency(zeros, x, sigmas, generator=torch.Generator().manual_seed(7))
    other = consistency(zeros, x, sigmas, generator=torch.Generator().manual_seed(8))
    assert torch.equal(out, again) and not torch.equal(out, other)


def test_consistency_is_algorithm_1_denoise_renoise_denoise():
    x = 80.0 * torch.randn(500, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigmas = torch.tensor([80.0, 1.0, 0.0], dtype=torch.float64)
    out = consistency(exact, x, sigmas, generator=torch.Generator().manual_seed(3))
    z = torch.randn(500, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ones = torch.ones(500, dtype=torch.float64)
    expected = exact(exact(x, 80.0 * ones) + 1.0 * z, ones)
    assert torch.allclose(out, expected, rtol=0, atol=1e-12)


def _ddpm_eps_model(schedule):
    """diffusers' view of the same exact denoiser: eps(x_vp, t) at DDPM's integer timestep t."""
    alphas_cumprod = schedule.alpha_bar(torch.arange(1000, dtype=torch.float64) / 999)

    def model(x_vp, t):
        ab = alphas_cumprod[int(t)]
        sigma = ((1 - ab) / ab).sqrt()
        x = x_vp / ab.sqrt()
        return (x - exact(x, sigma.expand(len(x)))) / sigma

    return model


def test_ddim_matches_diffusers_step_for_step():
    diffusers = pytest.importorskip("diffusers")
    schedule = S.make("linear")
    peer = diffusers.DDIMScheduler(beta_schedule="linear", clip_sample=False, set_alpha_to_one=True)
    peer.set_timesteps(50)
    peer.alphas_cumprod = schedule.alpha_bar(torch.arange(1000, dtype=torch.float64) / 999)
    peer.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    model = _ddpm_eps_model(schedule)
    z = torch.randn(300, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    states = []
    sigmas = S.grid(schedule, 50, "leading")
    ours = sample(exact, (300, 2), sampler="ddim", sigmas=sigmas, noise=z, dtype=torch.float64,
                  callback=lambda step: states.append(step.x / math.sqrt(1 + step.sigma_next**2)))
    x_vp = z * peer.init_noise_sigma
    for i, t in enumerate(peer.timesteps):
        x_vp = peer.step(model(x_vp, t), t, x_vp, eta=0.0).prev_sample
        assert torch.allclose(states[i], x_vp, atol=1e-4), i
    assert torch.allclose(ours, x_vp, atol=1e-4)


def test_ddpm_matches_diffusers_with_the_same_noise_draws():
    diffusers = pytest.importorskip("diffusers")
    schedule = S.make("linear")
    peer = diffusers.DDPMScheduler(beta_schedule="linear", clip_sample=False)
    peer.set_timesteps(1000)
    peer.alphas_cumprod = schedule.alpha_bar(torch.arange(1000, dtype=torch.float64) / 999)
    peer.betas = 1 - peer.alphas_cumprod / torch.cat([torch.ones(1, dtype=torch.float64), peer.alphas_cumprod[:-1]])
    model = _ddpm_eps_model(schedule)
    z = torch.randn(200, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ours = sample(exact, (200, 2), sampler="ddpm", schedule=schedule, noise=z, dtype=torch.float64,
                  generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    x_vp = z
    for t in peer.timesteps:
        x_vp = peer.step(model(x_vp, t), t, x_vp, generator=g).prev_sample
    assert torch.allclose(ours, x_vp, atol=1e-4)
    assert (ours - x_vp).abs().max() < 1e-4


class ExactNet(nn.Module):
    """The exact mixture denoiser, expressed as a network for a given target (for Denoiser tests)."""

    def __init__(self, schedule, prediction):
        super().__init__()
        self.schedule, self.prediction = schedule, prediction

    def forward(self, u, c_noise):
        sigma = self.schedule.sigma((c_noise.double() / self.schedule.time_scale).clamp(0, 1))
        x = torch.where(torch.isinf(sigma)[:, None], u, u * (1 + sigma[:, None] ** 2).sqrt())
        return from_x0(exact(x, sigma), self.prediction, x, sigma)


@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m", "unipc", "heun", "ddpm"])
def test_zero_terminal_snr_starts_from_pure_noise(name):
    schedule = S.make("linear", zero_terminal_snr=True)
    D = Denoiser(ExactNet(schedule, "v"), schedule, "v")
    steps = 1000 if name == "ddpm" else 30
    seen = []
    x = sample(D, (4000, 2), sampler=name, steps=steps, generator=torch.Generator().manual_seed(0),
               dtype=torch.float64, callback=seen.append)
    assert math.isinf(seen[0].sigma) and torch.isfinite(x).all()
    assert torch.allclose(seen[0].x0_hat, MIXTURE.mean.expand(4000, 2), atol=1e-6)  # no information at zero SNR
    assert torch.allclose(x.mean(0), MIXTURE.mean, atol=0.06)
    weights = torch.bincount(MIXTURE.responsibilities(x).argmax(1), minlength=3).double() / len(x)
    assert torch.allclose(weights, MIXTURE.weights, atol=0.04)


def test_eps_model_refuses_zero_terminal_snr():
    schedule = S.make("linear", zero_terminal_snr=True)
    D = Denoiser(ExactNet(schedule, "eps"), schedule, "eps")
    with pytest.raises(ValueError, match="prediction='v' or 'x0'"):
        sample(D, (4, 2), steps=10)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_nfe_table_and_callback(name):
    calls = []

    def counted(x, sigma):
        calls.append(1)
        return exact(x, sigma)

    seen: list[StepInfo] = []
    sample(counted, (8, 2), sampler=name, steps=7, schedule=S.make("edm"), callback=seen.append, dtype=torch.float64)
    assert len(calls) == NFE[name](7)
    assert [step.index for step in seen] == list(range(7))
    assert seen[-1].sigma_next == 0 and seen[0].sigma == pytest.approx(80.0)
    assert seen[0].x.shape == seen[0].x0_hat.shape == (8, 2)


def test_any_grid_with_any_sampler_and_generators_are_reproducible():
    schedule = S.make("cosine")
    for spacing in S.GRIDS:
        a = sample(exact, (16, 2), sampler="dpmpp_2m_sde", steps=8, schedule=schedule, spacing=spacing,
                   generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        b = sample(exact, (16, 2), sampler="dpmpp_2m_sde", steps=8, schedule=schedule, spacing=spacing,
                   generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        assert torch.equal(a, b) and torch.isfinite(a).all()


def test_bad_input_messages():
    schedule = S.make("edm")
    with pytest.raises(ValueError, match="valid names: auto, ddpm, ddim, euler"):
        sample(exact, (4, 2), sampler="dpm++", schedule=schedule)
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        sample(exact, (4, 2), steps=0, schedule=schedule)
    with pytest.raises(ValueError, match="sigmas must be >= 0"):
        sample(exact, (4, 2), sigmas=torch.tensor([1.0, -0.5, 0.0]))
    with pytest.raises(ValueError, match="strictly decreasing"):
        sample(exact, (4, 2), sigmas=torch.tensor([1.0, 2.0, 0.0]))
    with pytest.raises(ValueError, match="must end in 0"):
        sample(exact, (4, 2), sigmas=torch.tensor([2.0, 1.0]))
    with pytest.raises(ValueError, match="noise has shape"):
        sample(exact, (4, 2), schedule=schedule, noise=torch.zeros(4, 3))
    with pytest.raises(ValueError, match="positive ints"):
        sample(exact, (4, -2), schedule=schedule)
    with pytest.raises(ValueError, match="pass schedule="):
        sample(exact, (4, 2))
    with pytest.raises(ValueError, match="NaN or inf"):
        sample(lambda x, s: x * math.nan, (4, 2), schedule=schedule)
    with pytest.raises(ValueError, match="must return x0_hat of that shape"):
        sample(lambda x, s: x[:, :1], (4, 2), schedule=schedule)


def test_precision_runs_the_network_under_autocast_and_keeps_the_state_float32():
    from sculpt.nets import UNet

    torch.manual_seed(0)
    net = UNet(1, resolution=8, base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=())
    nn.init.normal_(net.out_conv.weight, std=0.05)  # a fresh UNet outputs exactly zero
    outputs = []
    net.register_forward_hook(lambda module, args, out: outputs.append(out.dtype))
    D = Denoiser(net, S.make("cosine"), "v")

    def draw(precision):
        return sample(D, (4, 1, 8, 8), steps=4, generator=torch.Generator().manual_seed(0), precision=precision)

    full, low = draw("fp32"), draw("bf16")
    assert outputs == [torch.float32] * 4 + [torch.bfloat16] * 4
    assert full.dtype == low.dtype == torch.float32
    # bf16 keeps 8 bits of mantissa: the samples move by round-off, not by more
    assert 0 < (full - low).abs().max() < 0.02 * full.abs().max()
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        draw("fp8")


@pytest.mark.parametrize("kind", ["cosine", "linear", "edm"])
def test_the_default_rule_converges_on_a_gaussian_and_beats_the_old_default_at_ten_steps(kind):
    """N(0, 0.5^2) data: the probability-flow ODE maps the start x_T to x_T * 0.5 / sqrt(0.5^2 + sigma_max^2)."""
    from sculpt.samplers import resolve_sampling

    schedule = S.make(kind)
    assert resolve_sampling("auto", 5, schedule) == ("unipc", "cosine_uniform")

    def D(x, sigma):
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1)
        return x * 0.25 / (0.25 + sigma**2)

    z = torch.randn(2000, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    top = schedule.sigma_max
    exact = z * math.sqrt(1 + top**2) * 0.5 / math.sqrt(0.25 + top**2)

    def error(steps, **options):
        x = sample(D, (2000, 8), steps=steps, schedule=schedule, noise=z, dtype=torch.float64, **options)
        return float((x - exact).abs().mean())

    errors = [error(steps) for steps in (5, 10, 20)]
    assert errors[0] > 4 * errors[1] > 16 * errors[2], errors  # about 5x per doubling of the steps
    assert 0.01 < errors[1] < 0.02, errors  # 1.4e-2 at 10 steps on every schedule kind
    old = error(10, sampler="dpmpp_2m", spacing="karras" if kind == "edm" else "trailing")
    assert errors[1] < old, (errors[1], old)  # the old default: 2.0e-2 (cosine) to 7.6e-2 (linear)
