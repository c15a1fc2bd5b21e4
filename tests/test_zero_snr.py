"""Zero terminal SNR everywhere: every sampler, grid, schedule kind, target and weighting, never a NaN."""

import math

import pytest
import torch
from torch import nn

from sculpt import schedules as S
from sculpt.config import Config, override
from sculpt.denoiser import Denoiser
from sculpt.objectives import WEIGHTINGS, Denoising, denoising_loss
from sculpt.samplers import AUTO, SAMPLERS, sample

#: Every schedule kind: discrete VP (three betas), continuous VP (sigmoid), EDM, shifted; all with zero terminal SNR.
KINDS = {
    "linear": dict(name="linear"),
    "cosine": dict(name="cosine"),
    "scaled_linear": dict(name="scaled_linear"),
    "sigmoid": dict(name="sigmoid"),
    "edm": dict(name="edm"),
    "cosine*4": dict(name="cosine", shift=4.0),
    "edm/res": dict(name="edm", res=16, base_res=64),
}
#: Targets that can denoise at sigma = inf (eps cannot: see the refusal tests below).
TARGETS = ["x0", "v", "edm", "cm"]


def zsnr(kind: str) -> S.Schedule:
    options = dict(KINDS[kind])
    return S.make(options.pop("name"), zero_terminal_snr=True, **options)


class TinyNet(nn.Module):
    """A network that uses its noise input: an infinite c_noise would make its output infinite."""

    def __init__(self, dim: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.mix = nn.Linear(dim, dim).double()
        self.embed = nn.Linear(1, dim).double()

    def forward(self, x, c_noise, class_labels=None):
        flat = x.flatten(1)
        return (torch.tanh(self.mix(flat)) + torch.sin(self.embed(c_noise[:, None].to(flat)))).reshape(x.shape)


def _draw(D, name, spacing, steps):
    seen: list[float] = []
    x = sample(D, (3, 1, 2, 2), sampler=name, steps=steps, spacing=spacing, dtype=torch.float64,
               generator=torch.Generator().manual_seed(0), callback=lambda step: seen.append(step.sigma))
    assert torch.isfinite(x).all(), (D.schedule, D.prediction, spacing, name, steps)
    return seen


@pytest.mark.parametrize("kind", ["linear", "cosine", "sigmoid", "edm", "cosine*4"])
def test_every_sampler_on_every_grid_samples_from_pure_noise(kind):
    # Samplers never branch on the target, so one target (v) covers the sampler x grid product.
    D = Denoiser(TinyNet(), zsnr(kind), "v")
    for spacing in S.GRIDS:
        for name in [*SAMPLERS, AUTO]:
            seen = _draw(D, name, spacing, 4)
            if spacing != "leading":  # leading never takes the noisiest level
                assert math.isinf(seen[0]), (kind, spacing, seen)


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_target_with_every_sampler_samples_from_pure_noise(kind):
    # The denoiser at sigma = inf is where targets differ: x0, v, edm and cm all give a finite x0_hat.
    for target in TARGETS:
        D = Denoiser(TinyNet(), zsnr(kind), target)
        for name in [*SAMPLERS, AUTO]:
            for steps in (1, 2, 5):
                assert math.isinf(_draw(D, name, None, steps)[0])


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("weighting", list(WEIGHTINGS))
def test_every_target_and_weighting_has_a_finite_loss_at_infinity(kind, weighting):
    schedule = zsnr(kind)
    x0 = torch.rand(6, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    sigma = torch.tensor([math.inf, 1e6, 30.0, 1.0, 0.05, schedule.sigma_min], dtype=torch.float64)
    for target in ["x0", "v", "edm"]:
        loss = denoising_loss(Denoiser(TinyNet(), schedule, target), x0, weighting=weighting, sigma=sigma,
                              generator=torch.Generator().manual_seed(1))
        assert torch.isfinite(loss).all() and (loss >= 0).all(), (kind, target, weighting, loss)
        drawn = denoising_loss(Denoiser(TinyNet(), schedule, target), x0.repeat(50, 1, 1, 1), weighting=weighting,
                               generator=torch.Generator().manual_seed(2))
        assert torch.isfinite(drawn).all()


def test_the_edm_weighting_at_infinity_is_its_limit():
    # lambda(sigma) c_out^2 = 1 for the edm target at every sigma; for v it tends to 1 / sigma_data^2
    schedule = zsnr("edm")
    sigma = torch.tensor([math.inf, 1e8, 2.0, 0.1], dtype=torch.float64)
    edm = Denoiser(TinyNet(), schedule, "edm")
    assert torch.allclose(WEIGHTINGS["edm"](sigma, edm.scalings(sigma), 0.5), torch.ones(4, dtype=torch.float64))
    v = Denoiser(TinyNet(), schedule, "v")
    weight = WEIGHTINGS["edm"](sigma, v.scalings(sigma), 0.5)
    assert weight[0].item() == pytest.approx(4.0, rel=1e-12) and weight[1].item() == pytest.approx(4.0, rel=1e-6)


def test_the_edm_target_feeds_a_finite_noise_input_at_infinity():
    schedule = zsnr("edm")
    D = Denoiser(TinyNet(), schedule, "edm")
    c_noise = D.scalings(torch.tensor([math.inf, 1e5, 80.0], dtype=torch.float64)).c_noise
    assert c_noise[0].item() == c_noise[1].item() == pytest.approx(math.log(1e5) / 4)
    assert c_noise[2].item() == pytest.approx(math.log(80) / 4)


def test_zero_snr_on_edm_never_draws_a_negative_or_nan_sigma():
    schedule = zsnr("edm")
    # the log-normal's tail beyond the base's range: above sigma_max it was negative, below sigma_min NaN
    base_sigmas = torch.tensor([81.0, 1e3, 80.0, 79.0, 1e-4, 0.002], dtype=torch.float64)
    mapped = schedule._forward(base_sigmas)
    assert not torch.isnan(mapped).any() and (mapped >= schedule.sigma_min * (1 - 1e-9)).all()
    assert torch.isinf(mapped[:3]).all() and torch.isfinite(mapped[3:]).all()
    drawn = schedule.sample_sigma(2_000_000, generator=torch.Generator().manual_seed(0))
    assert not torch.isnan(drawn).any() and (drawn > 0).all()
    assert torch.isinf(drawn).sum() >= 1  # z > 4.65 happens a few times in two million draws


def test_eps_refuses_zero_terminal_snr_with_a_message_at_the_start_of_training():
    config = override(Config(), {"diffusion.prediction": "eps", "diffusion.zero_terminal_snr": "true"})
    schedule = S.make("cosine", zero_terminal_snr=True)
    with pytest.raises(ValueError, match="prediction 'eps' cannot be trained with zero terminal SNR"):
        Denoising(config, Denoiser(TinyNet(), schedule, "eps"))
    D = Denoiser(TinyNet(), schedule, "eps")
    with pytest.raises(ValueError, match="cannot denoise at sigma = inf"):
        sample(D, (2, 1, 2, 2), steps=4)
