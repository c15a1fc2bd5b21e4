"""Samplers against truth: exact Gaussian-mixture denoisers, convergence orders, and diffusers."""

import math

import pytest
import torch
from torch import nn

from sculpt import schedules as S
from sculpt.denoiser import Denoiser, from_x0
from sculpt.samplers import NFE, SAMPLERS, StepInfo, sample
from sculpt.toy import GaussianMixture

MIXTURE = GaussianMixture.make([0.5, 0.3, 0.2], [[-1.0, 0.0], [1.0, 0.5], [0.0, -1.2]], [0.3, 0.4, 0.25])
DETERMINISTIC = ["euler", "ddim", "heun", "dpmpp_2m", "dpmpp_3m", "unipc"]


def exact(x, sigma):
    return MIXTURE.denoiser(x, sigma)


@pytest.mark.parametrize("name", list(SAMPLERS))
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
    "name, order", [("euler", 1), ("ddim", 1), ("heun", 2), ("dpmpp_2m", 2), ("dpmpp_3m", 3), ("unipc", 3)]
)
def test_deterministic_solvers_converge_at_their_order(name, order, ode_reference):
    start, reference = ode_reference
    errors = [(_solve(name, steps, start) - reference).pow(2).mean().sqrt().item() for steps in (40, 80, 160)]
    ratios = [errors[0] / errors[1], errors[1] / errors[2]]
    expected = 2**order
    # the error falls ~2x (first order), ~4x (second), ~8x or better (third; UniC adds one)
    for ratio in ratios:
        assert expected * 0.8 < ratio < expected * 2.6, (name, errors, ratios)


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
    with pytest.raises(ValueError, match="valid names: ddpm, ddim, euler"):
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
