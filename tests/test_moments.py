"""The data's moments and the analytic first step: exact on Gaussians, one call saved, recorded by training."""

import math

import pytest
import torch

from sculpt import schedules
from sculpt.data import ImageDataset
from sculpt.guidance import CountEvaluations, Guided
from sculpt.moments import MOMENTS_FILE, DataMoments, measure_moments
from sculpt.samplers import analytic_grid, first_step_of, resolve_first_step, sample
from sculpt.schedules import grid
from sculpt.toy import GaussianMixture


def gaussian(mu: torch.Tensor, s2: float, schedule):
    """The exact denoiser of isotropic Gaussian data N(mu, s2 I), with the moments it implies."""

    def D(x, sigma):
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, *[1] * (x.ndim - 1))
        gain = torch.where(torch.isinf(sigma), torch.zeros_like(sigma), s2 / (s2 + sigma**2))
        return (mu + gain * (x - mu)).to(x.dtype)

    counted = CountEvaluations(D)
    counted.schedule = schedule
    D.data_moments = DataMoments(mu, s2)
    return counted


def test_measured_moments_are_the_datasets_own():
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (37, 2, 3, 4), generator=g, dtype=torch.uint8)
    labels = torch.arange(37) % 3
    data = ImageDataset(pixels, labels, 3)
    x = data.images().double()
    m = measure_moments(data, num_classes=3, batch_size=8)  # several batches
    assert m.count == 37
    assert torch.allclose(m.mean.double(), x.mean(0), atol=1e-6)
    assert torch.allclose(m.var.double(), x.var(0, unbiased=False), atol=1e-6)
    for k in range(3):
        assert torch.allclose(m.class_means[k].double(), x[labels == k].mean(0), atol=1e-6)
    flipped = measure_moments(data, hflip=True)
    assert torch.allclose(flipped.mean.double(), (x.mean(0) + x.mean(0).flip(-1)) / 2, atol=1e-6)
    # A label past the classes (the null class of classifier-free guidance) gets the overall mean.
    means = m.means(4, torch.tensor([0, 2, 3, 1]))
    assert torch.equal(means[2], m.mean) and torch.equal(means[1], m.class_means[2])


def test_moments_round_trip_and_refuse_other_files(tmp_path):
    m = DataMoments(torch.randn(1, 4, 4), 0.37, torch.randn(10, 1, 4, 4), 123)
    m.save(tmp_path / MOMENTS_FILE)
    back = DataMoments.load(tmp_path / MOMENTS_FILE)
    assert torch.equal(back.mean, m.mean) and torch.equal(back.class_means, m.class_means)
    assert torch.allclose(back.var, torch.full((1, 4, 4), 0.37)) and back.count == 123
    from safetensors.torch import save_file

    save_file({"weights": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a data-moments file"):
        DataMoments.load(tmp_path / "other.safetensors")


def correlated_gaussian(schedule, dim: int = 12, seed: int = 0):
    """The exact denoiser of N(mu, S) with a full covariance S (float64), as images [1, 3, dim / 3]."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.linspace(-0.8, 0.6, dim, dtype=torch.float64)
    A = torch.randn(dim, dim, generator=g, dtype=torch.float64) / math.sqrt(dim)
    S = A @ A.T + 0.01 * torch.eye(dim, dtype=torch.float64)  # strongly correlated, eigenvalues 0.01 to ~3

    def D(x, sigma):
        flat = (x.reshape(len(x), -1) - mu).T  # [d, n]
        sigma = float(torch.as_tensor(sigma).reshape(-1)[0])
        if math.isinf(sigma):
            return mu.expand(x.shape).clone()
        gain = S @ torch.linalg.inv(S + sigma**2 * torch.eye(dim, dtype=torch.float64))
        return (mu + (gain @ flat).T).reshape(x.shape)

    counted = CountEvaluations(D)
    counted.schedule = schedule
    return counted, mu, S


@pytest.mark.parametrize("kind", ["linear", "edm"])
def test_the_analytic_first_step_is_the_exact_flow_of_a_gaussian_and_saves_a_call(kind):
    """With the covariance, the first step is the ODE's exact solution on Gaussian data: 5 calls walk 6 steps."""
    schedule = schedules.make(kind)
    D, mu, S = correlated_gaussian(schedule)
    values, vectors = torch.linalg.eigh(S)
    exact = DataMoments(mu.reshape(1, 3, 4), torch.diagonal(S).reshape(1, 3, 4), basis=vectors.flip(1).float(),
                        eigs=values.flip(0).float())
    D.D.data_moments = exact
    noise = torch.randn(64, 1, 3, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sigma_max = schedule.sigma_max
    x = noise * math.sqrt(1 + sigma_max**2)
    # The flow from sigma_max to 2 against a fine solve of the exact denoiser's ODE (2000 log-uniform Heun steps).
    fine = torch.cat([torch.logspace(math.log10(sigma_max), math.log10(2.0), 2000, dtype=torch.float64),
                      torch.zeros(1)])
    states = []
    sample(D, noise.shape, sigmas=fine, sampler="heun", noise=noise, dtype=torch.float64, first_step="model",
           callback=lambda info: states.append(info.x) if info.sigma_next == 2.0 else None)
    flowed = exact.flow(x, sigma_max, 2.0)
    assert float((flowed - states[0]).abs().max()) < 1e-5  # the fine solve's own error is ~2e-6
    diagonal = DataMoments(exact.mean, exact.var).flow(x, sigma_max, 2.0)  # the variances alone miss S's shape
    assert float((diagonal - states[0]).abs().max()) > 0.3
    # Five calls with the analytic first step: one call fewer than the same six steps, and the same end.
    D.rows = 0
    analytic = sample(D, noise.shape, steps=5, schedule=schedule, noise=noise, dtype=torch.float64)
    assert D.rows == 64 * 5
    walked = analytic_grid(schedule, 5, moments=exact)
    assert len(walked) == 7
    D.rows = 0
    model = sample(D, noise.shape, sigmas=walked, noise=noise, dtype=torch.float64, first_step="model")
    assert D.rows == 64 * 6
    reference = sample(D, noise.shape, steps=200, schedule=schedule, noise=noise, dtype=torch.float64,
                       first_step="model")
    five = sample(D, noise.shape, steps=5, schedule=schedule, noise=noise, dtype=torch.float64, first_step="model")
    errors = [float((out - reference).abs().max()) for out in (analytic, model, five)]
    assert errors[0] < 1.05 * errors[1] and errors[0] < 0.85 * errors[2], errors  # 0.197, 0.195, 0.238


def test_measured_covariance_is_the_datas_and_round_trips(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (300, 1, 2, 3), generator=g, dtype=torch.uint8)
    data = ImageDataset(pixels, torch.zeros(300, dtype=torch.long), 1)
    flat = data.images().double().reshape(300, -1)
    cov = torch.cov(flat.T, correction=0)
    m = measure_moments(data, batch_size=64)
    rebuilt = m.basis.double() @ torch.diag(m.eigs.double()) @ m.basis.double().T
    assert torch.allclose(rebuilt, cov, atol=1e-5) and m.residual == 0.0
    assert torch.all(m.eigs[:-1] >= m.eigs[1:])
    assert abs(m.gaussian_until - float(torch.linalg.eigvalsh(cov)[-1]) ** 0.5) < 1e-5
    m.save(tmp_path / MOMENTS_FILE)
    back = DataMoments.load(tmp_path / MOMENTS_FILE)
    assert torch.equal(back.basis, m.basis) and torch.equal(back.eigs, m.eigs) and back.residual == m.residual
    # Keeping 2 of 6 directions: the other 4 share their mean variance (probabilistic PCA).
    monkeypatch.setattr("sculpt.moments.COVARIANCE_RANK", 2)
    low = measure_moments(data)
    values = torch.linalg.eigvalsh(cov).flip(0)
    assert low.basis.shape == (6, 2) and abs(low.residual - float(values[2:].mean())) < 1e-5
    monkeypatch.setattr("sculpt.moments.COVARIANCE_MAX_DIM", 5)
    assert measure_moments(data).basis is None  # images too large for a covariance: the variances only
    with pytest.raises(ValueError, match="basis must be"):
        DataMoments(m.mean, m.var, basis=m.basis[:5], eigs=m.eigs)


def test_the_covariance_moves_the_first_network_call_down_to_where_the_gaussian_ends():
    cosine = schedules.make("cosine")
    mean = torch.zeros(1, 2, 2)
    for top in (1.5, 4.0):  # the data's strongest direction has variance top^2
        m = DataMoments(mean, 0.5, basis=torch.eye(4)[:, :2], eigs=torch.tensor([top**2, 0.1]))
        for steps in (1, 3, 5, 10):
            walked = analytic_grid(cosine, steps, moments=m)
            longer = schedules.cosine_uniform(cosine, steps + 1)
            assert len(walked) == steps + 2 and float(walked[0]) == cosine.sigma_max
            assert float(walked[1]) == pytest.approx(max(float(longer[1]), top))
            if float(longer[1]) >= top:  # the grid for one step more, its first step the Gaussian's
                assert torch.allclose(walked, longer)
    m = DataMoments(mean, 0.5, basis=torch.eye(4)[:, :2], eigs=torch.tensor([2.25, 0.1]))
    assert float(analytic_grid(cosine, 3, moments=m)[1]) == pytest.approx(2.43, abs=0.01)  # the 4-step grid's
    karras = analytic_grid(cosine, 5, moments=m, spacing="karras")  # other grids: the grid for steps + 1
    assert torch.equal(karras, schedules.grid(cosine, 6, "karras"))


def test_analytic_first_step_is_exact_to_its_bound_on_a_mixture():
    """On non-Gaussian data the moments' x0_hat at sigma differs from the truth by about |S - diag S| / sigma."""
    g = torch.Generator().manual_seed(0)
    means = torch.randn(5, 8, generator=g, dtype=torch.float64)
    gm = GaussianMixture.make(torch.full((5,), 0.2), means, torch.full((5,), 0.1))
    m = DataMoments(gm.mean, torch.diagonal(gm.cov))
    off = (gm.cov - torch.diag(torch.diagonal(gm.cov))).abs().sum(1).max().item()  # |S - diag S|, rows
    for sigma in (80.0, 157.0, 2e4):
        x = gm.mean + sigma * torch.randn(256, 8, dtype=torch.float64, generator=g)
        exact = gm.denoiser(x, torch.full((256,), sigma, dtype=torch.float64))
        err = (m.denoise(x, sigma) - exact).abs().max().item()
        z = ((x - gm.mean) / sigma).abs().max().item()
        assert err < off * z / sigma, (sigma, err, off)
    assert err < 1e-3  # at the cosine schedule's sigma_max


def test_auto_takes_the_analytic_step_only_where_it_is_exact():
    schedule = schedules.make("cosine")
    D = gaussian(torch.zeros(1, 2, 2), 0.25, schedule)
    assert resolve_first_step("auto", "unipc", D, sigma_max=2e4) == "analytic"
    assert resolve_first_step("auto", "heun", D, sigma_max=2e4) == "model"  # two calls a step
    assert resolve_first_step("auto", "consistency", D, sigma_max=2e4) == "model"  # jumps straight to data
    assert resolve_first_step("auto", "unipc", D, sigma_max=2.0) == "model"  # not exact down there
    assert resolve_first_step("auto", "unipc", D, sigma_max=2e4, grid_given=True) == "model"  # a tuned grid
    assert resolve_first_step("auto", "unipc", D, sigma_max=2e4, steps=50) == "analytic"  # at any step count
    assert resolve_first_step("auto", "unipc", D, sigma_max=math.inf) == "analytic"  # zero terminal SNR
    assert resolve_first_step("auto", "unipc", D, cond={"class_labels": torch.zeros(2)}) == "model"  # no class means
    assert first_step_of(D, "unipc", 5, None) == "analytic"
    with pytest.raises(ValueError, match="no data moments"):
        resolve_first_step("analytic", "unipc", lambda x, s: x)
    with pytest.raises(ValueError, match="not a single-evaluation"):
        resolve_first_step("analytic", "heun", D)
    with pytest.raises(ValueError, match="first_step must be"):
        resolve_first_step("first", "unipc", D)


def test_zero_terminal_snr_starts_from_the_mean():
    schedule = schedules.make("cosine", zero_terminal_snr=True)
    mu = torch.full((1, 2, 2), 0.3, dtype=torch.float64)
    D = gaussian(mu, 0.2, schedule)
    seen = []
    out = sample(D, (8, 1, 2, 2), steps=4, schedule=schedule, dtype=torch.float64,
                 generator=torch.Generator().manual_seed(0), callback=seen.append)
    assert torch.isfinite(out).all() and D.rows == 8 * 4
    assert math.isinf(seen[0].sigma) and torch.equal(seen[0].x0_hat, mu.expand(8, 1, 2, 2))


def test_guided_moments_guide_the_class_means():
    mean = torch.zeros(1, 2, 2)
    class_means = torch.stack([torch.full((1, 2, 2), v) for v in (1.0, -1.0)])

    def D(x, sigma, class_labels=None):
        return x

    D.data_moments = DataMoments(mean, 0.5, class_means)
    guided = Guided(D, 3.0, null_cond={"class_labels": 2})
    m = guided.data_moments
    assert torch.allclose(m.class_means, 3.0 * class_means)  # mu + w (mu_c - mu) with mu = 0
    assert torch.equal(m.means(1, torch.tensor([2]))[0], mean)  # the null class stays the mean
    assert Guided(D, 3.0, null_cond={"class_labels": 2}, interval=(0.1, 5.0)).data_moments is None
    assert Guided(D, 3.0, guide=D).data_moments is D.data_moments  # autoguidance: the same data


def test_training_records_the_moments_and_load_attaches_them(tmp_path):
    from sculpt.config import Config, override
    from sculpt.data import load_dataset
    from sculpt.run import load
    from sculpt.train import train

    run = train(override(Config(), {"out": str(tmp_path / "run"), "train.steps": "2", "train.batch_size": "8",
                                    "train.sample_every": "0", "train.num_samples": "4", "train.sample_steps": "2",
                                    "model.net_options": '{"base_channels": 16}'}), progress=False)
    assert (run / MOMENTS_FILE).is_file()
    D, _ = load(run)
    images = load_dataset("digits").images().double()
    assert torch.allclose(D.data_moments.mean.double(), images.mean(0), atol=1e-6)
    assert D.data_moments.count == len(images)
    assert first_step_of(D, "unipc", 4, None) == "analytic"
    sigmas = grid(D.schedule, 5, "cosine_uniform")
    counted = CountEvaluations(D)
    out = sample(counted, (3, 1, 8, 8), steps=4, generator=torch.Generator().manual_seed(0))
    assert counted.rows == 3 * 4 and torch.isfinite(out).all() and float(sigmas[0]) > 1e3


def test_analytic_grid_inserts_the_first_network_call_only_on_the_default_grid():
    cosine = schedules.make("cosine")
    grid = analytic_grid(cosine, 5)
    assert len(grid) == 7 and float(grid[0]) == cosine.sigma_max and float(grid[1]) == 10.0
    assert torch.equal(grid[2:], schedules.cosine_uniform(cosine, 5)[1:])  # then the default levels 3.76, 1.75, ...
    for steps, spacing in ((2, None), (5, "karras"), (5, "few_step")):  # fewer calls, other grids: steps + 1
        assert torch.equal(analytic_grid(cosine, steps, spacing), schedules.grid(cosine, steps + 1, spacing))
    # a schedule whose default second level is already above 10 (shifted far up): steps + 1 as well
    high = schedules.make("cosine", shift=64.0)
    assert float(schedules.grid(high, 5)[1]) > 10
    assert torch.equal(analytic_grid(high, 5), schedules.grid(high, 6))


@pytest.mark.parametrize("kind", ["cosine_zsnr", "edm", "linear", "shifted"])
def test_the_covariance_flow_runs_on_every_schedule_kind_and_counts_its_calls(kind):
    schedule = {
        "cosine_zsnr": lambda: schedules.make("cosine", zero_terminal_snr=True),
        "edm": lambda: schedules.make("edm"),
        "linear": lambda: schedules.make("linear"),
        "shifted": lambda: schedules.make("cosine", res=32, base_res=8),
    }[kind]()
    D, mu, S = correlated_gaussian(schedule)
    values, vectors = torch.linalg.eigh(S)
    D.D.data_moments = DataMoments(mu.reshape(1, 3, 4), torch.diagonal(S).reshape(1, 3, 4),
                                   basis=vectors.flip(1).float(), eigs=values.flip(0).float())
    seen = []
    for steps in (1, 3, 8):
        D.rows = 0
        out = sample(D, (16, 1, 3, 4), steps=steps, schedule=schedule, dtype=torch.float64,
                     generator=torch.Generator().manual_seed(0), callback=seen.append)
        assert torch.isfinite(out).all() and D.rows == 16 * steps
        assert [info.index for info in seen[-(steps + 1):]] == list(range(steps + 1))  # the analytic step is step 0
