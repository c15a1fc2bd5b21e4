"""Prediction targets, conversions and the loss against their closed forms."""

import math

import pytest
import torch
from torch import nn

from sculpt import schedules as S
from sculpt.denoiser import (
    PREDICTIONS,
    Denoiser,
    add_noise,
    convert,
    from_x0,
    q_sample,
    q_step,
    to_x0,
)
from sculpt.objectives import WEIGHTINGS, denoising_loss

SIGMAS = torch.tensor([0.002, 0.01, 0.1, 0.5, 1.0, 2.0, 10.0, 80.0, 157.4], dtype=torch.float64)
# The consistency target cm depends on the schedule's sigma_min and is degenerate there (c_out = 0:
# f(x, sigma_min) = x whatever the network says), so it has tests of its own below.
TARGETS = [p for p in PREDICTIONS if p != "cm"]


class Oracle(nn.Module):
    """A 'network' that returns the exact target for fixed (x0, noise): D must then return x0."""

    def __init__(self, target: torch.Tensor):
        super().__init__()
        self.target = target
        self.calls = []

    def forward(self, x, c_noise, **cond):
        self.calls.append((x, c_noise, cond))
        return self.target


def _batch(n=9, seed=0):  # one sample per entry of SIGMAS
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(n, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(n, 3, 4, 4, generator=g, dtype=torch.float64)
    return x0, noise


@pytest.mark.parametrize("prediction", TARGETS)
def test_true_target_gives_x0(prediction):
    x0, noise = _batch()
    x = add_noise(x0, SIGMAS, noise)
    # the textbook definition of each target
    alpha, sigma_vp = S.sigma_to_alpha_sigma(SIGMAS)
    expand = lambda v: v.reshape(-1, 1, 1, 1)  # noqa: E731
    textbook = {
        "eps": noise,
        "x0": x0,
        "v": expand(alpha) * noise - expand(sigma_vp) * x0,
    }
    target = textbook.get(prediction, from_x0(x0, prediction, x, SIGMAS))
    assert torch.allclose(from_x0(x0, prediction, x, SIGMAS), target, atol=1e-9)
    D = Denoiser(Oracle(target), S.make("edm"), prediction)
    assert (D(x, SIGMAS) - x0).abs().max() < 1e-5


def test_edm_target_is_karras_F():
    x0, noise = _batch()
    sd = 0.5
    x = x0 + SIGMAS.reshape(-1, 1, 1, 1) * noise
    s = SIGMAS.reshape(-1, 1, 1, 1)
    c_skip, c_out = sd**2 / (s**2 + sd**2), s * sd / (s**2 + sd**2).sqrt()
    F_target = (x0 - c_skip * x) / c_out  # EDM eq. 7's effective training target
    assert torch.allclose(from_x0(x0, "edm", x, SIGMAS, sd), F_target, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("source", TARGETS)
@pytest.mark.parametrize("target", TARGETS)
def test_conversions_round_trip(source, target):
    x0, noise = _batch()
    x = add_noise(x0, SIGMAS, noise)
    pred = torch.randn_like(x)
    there = convert(pred, source, target, x, SIGMAS)
    back = convert(there, target, source, x, SIGMAS)
    assert torch.allclose(back, pred, rtol=1e-7, atol=1e-7)
    assert torch.allclose(to_x0(there, target, x, SIGMAS), to_x0(pred, source, x, SIGMAS), atol=1e-6)


def test_zero_snr_v_and_x0_denoise_at_infinity_and_eps_refuses():
    schedule = S.make("linear", zero_terminal_snr=True)
    x0, noise = _batch(2)
    sigma = torch.tensor([math.inf, 3.0], dtype=torch.float64)
    x = add_noise(x0, sigma, noise)
    assert torch.equal(x[0], noise[0])  # at sigma = inf the state holds the unit noise
    v = torch.stack([-x0[0], from_x0(x0, "v", x, sigma)[1]])  # v = -x0 at zero SNR
    assert torch.allclose(Denoiser(Oracle(v), schedule, "v")(x, sigma), x0, atol=1e-12)
    assert torch.allclose(Denoiser(Oracle(x0), schedule, "x0")(x, sigma), x0)
    with pytest.raises(ValueError, match="cannot denoise at sigma = inf.*prediction='v'"):
        Denoiser(Oracle(noise), schedule, "eps")(x, sigma)


def test_network_sees_ddpm_timesteps_and_edm_log_sigma():
    schedule = S.make("linear")
    x0, _ = _batch(3)
    levels = schedule.sigmas[[0, 499, 999]]
    net = Oracle(torch.zeros_like(x0))
    Denoiser(net, schedule, "eps")(x0, levels)
    assert torch.allclose(net.calls[0][1].double(), torch.tensor([0.0, 499.0, 999.0], dtype=torch.float64), atol=1e-3)
    # and the input is the unit-variance VP state
    assert torch.allclose(net.calls[0][0], x0 / (1 + levels**2).sqrt().reshape(-1, 1, 1, 1))
    Denoiser(net, S.make("edm"), "edm")(x0, torch.tensor([0.5, 1.0, 80.0]))
    assert torch.allclose(net.calls[1][1], torch.log(torch.tensor([0.5, 1.0, 80.0])) / 4)


@pytest.mark.parametrize("prediction", TARGETS)
@pytest.mark.parametrize("weighting", list(WEIGHTINGS))
def test_loss_is_zero_for_the_exact_target_and_weighted_mse_otherwise(prediction, weighting):
    x0, noise = _batch()
    x = add_noise(x0, SIGMAS, noise)
    exact = from_x0(x0, prediction, x, SIGMAS)
    D = Denoiser(Oracle(exact), S.make("linear"), prediction)
    assert denoising_loss(D, x0, sigma=SIGMAS, noise=noise, weighting=weighting).abs().max() < 1e-8
    D.net.target = exact + 0.1
    loss = denoising_loss(D, x0, sigma=SIGMAS, noise=noise, weighting=weighting)
    snr = SIGMAS**-2
    c_out2 = ((x0 - D(x, SIGMAS)) / 0.1).flatten(1).mean(1) ** 2  # the x0 error is c_out * 0.1
    expected_weight = {
        "none": torch.ones_like(SIGMAS),
        "min_snr": snr.clamp(max=5) * c_out2,
        "edm": (SIGMAS**2 + 0.25) / (SIGMAS * 0.5) ** 2 * c_out2,
    }[weighting]
    assert torch.allclose(loss.double(), 0.01 * expected_weight, rtol=1e-4)


def test_min_snr_for_eps_is_hang_et_al():
    x0, noise = _batch()
    D = Denoiser(Oracle(torch.zeros_like(x0)), S.make("linear"), "eps")
    weighted = denoising_loss(D, x0, sigma=SIGMAS, noise=noise, weighting="min_snr")
    ratio = weighted / denoising_loss(D, x0, sigma=SIGMAS, noise=noise)
    snr = SIGMAS**-2
    assert torch.allclose(ratio.double(), snr.clamp(max=5) / snr, rtol=1e-5)  # min(SNR, 5) / SNR


def test_loss_draws_levels_from_the_schedule_and_trains_a_real_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 16), nn.Unflatten(1, (1, 4, 4)))
    D = Denoiser(_Wrap(net), S.make("cosine"), "v")
    x0 = torch.rand(32, 1, 4, 4) * 2 - 1
    loss = denoising_loss(D, x0, generator=torch.Generator().manual_seed(1))
    assert loss.shape == (32,) and torch.isfinite(loss).all()
    loss.mean().backward()
    assert net[1].weight.grad.abs().sum() > 0


class _Wrap(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, c_noise):
        return self.net(x)


def test_q_sample_and_q_step_match_ddpm():
    schedule = S.make("linear")
    x0 = torch.full((40_000, 1), 0.7, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    t = torch.tensor(0.3, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    ab = schedule.alpha_bar(t)
    assert torch.allclose(q_sample(schedule, x0, t, noise), ab.sqrt() * x0 + (1 - ab).sqrt() * noise)
    # q_sample is add_noise seen through the VP scale
    sigma = schedule.sigma(t)
    assert torch.allclose(q_sample(schedule, x0, t, noise), add_noise(x0, sigma, noise) / (1 + sigma**2).sqrt())
    # a chain of one-step q_step reaches the same marginal as the closed-form jump
    x = x0.clone()
    levels = torch.arange(0, 300, dtype=torch.float64) / 999
    x = q_sample(schedule, x0, levels[0], torch.randn(x0.shape, generator=g, dtype=torch.float64))
    for prev, cur in zip(levels[:-1], levels[1:], strict=True):
        x = q_step(schedule, x, prev, cur, torch.randn(x0.shape, generator=g, dtype=torch.float64))
    ab = schedule.alpha_bar(levels[-1])
    assert x.mean().item() == pytest.approx((ab.sqrt() * 0.7).item(), abs=0.01)
    assert x.var().item() == pytest.approx((1 - ab).item(), rel=0.02)
    with pytest.raises(ValueError, match="t >= t_prev"):
        q_step(schedule, x, 0.5, 0.4, x)


def test_bad_input():
    with pytest.raises(ValueError, match="valid targets: eps, x0, v, edm"):
        Denoiser(nn.Identity(), S.make("linear"), "epsilon")
    x0, _ = _batch(2)
    D = Denoiser(Oracle(torch.zeros(2, 3, 2, 2, dtype=torch.float64)), S.make("linear"))
    with pytest.raises(ValueError, match="network returned shape"):
        D(x0, 1.0)
    with pytest.raises(ValueError, match="one value per sample"):
        D(x0, torch.ones(3))
    with pytest.raises(ValueError, match="sigma must be >= 0"):
        D(x0, -1.0)
    with pytest.raises(ValueError, match="unknown weighting"):
        denoising_loss(D, x0, weighting="snr")


def test_cm_is_song_et_al_parametrisation_with_exact_boundary():
    schedule = S.make("edm")  # sigma_min 0.002, as Song et al. 2023
    s_min, sd = schedule.sigma_min, 0.5
    x0, noise = _batch(8)
    sigma = SIGMAS[1:]
    x = add_noise(x0, sigma, noise)
    F = torch.randn_like(x)
    D = Denoiser(Oracle(F), schedule, "cm")
    s = sigma.reshape(-1, 1, 1, 1)
    c_skip = sd**2 / ((s - s_min) ** 2 + sd**2)
    c_out = sd * (s - s_min) / (s**2 + sd**2).sqrt()
    c_in = 1 / (s**2 + sd**2).sqrt()
    assert torch.allclose(D(x, sigma), c_skip * x + c_out * F, rtol=1e-9, atol=1e-9)
    assert torch.allclose(D.net.calls[0][0], c_in * x, rtol=1e-9)  # the network sees c_in x
    # f(x, sigma_min) = x exactly, in float32 too, whatever the network returns
    x32 = torch.randn(4, 3, 4, 4)
    D32 = Denoiser(Oracle(torch.randn(4, 3, 4, 4) * 100), schedule, "cm")
    assert torch.equal(D32(x32, s_min), x32)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_eps_and_v_denoisers_are_the_identity_at_sigma_zero(prediction):
    # The boundary condition consistency tuning (ECT) relies on: f(x, 0) = x, bit for bit.
    x = torch.randn(4, 3, 4, 4)
    D = Denoiser(Oracle(torch.randn(4, 3, 4, 4) * 100), S.make("cosine"), prediction)
    assert torch.equal(D(x, 0.0), x)
