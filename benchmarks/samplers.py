"""How close each sampler gets to the true distribution, against diffusers' schedulers.

The data is a Gaussian mixture with a few well-separated modes of unequal weights, so
the denoiser is exact (``sculpt.toy.GaussianMixture``) and every error is the sampler's.
Both sides share DDPM's linear schedule (1000 steps): sculpt runs ``SAMPLERS`` on the
grids of ``GRIDS``; diffusers runs its schedulers in their standard loop on the exact
eps-predictor of the same mixture. NFE is counted by wrapping the model on both sides.

Metrics, each against a fresh true sample of the same size n:

- Frechet distance (``sculpt.metrics.frechet_distance``) on the raw coordinates;
- mode-weight error: total variation 0.5 * sum_k |w_hat_k - w_k| between the true weights
  and the fraction of samples whose most responsible component (argmax of
  ``gm.responsibilities(x)``) is k;
- the floor: the same two numbers for a second true sample (true vs true).

Beside the best of every grid, two rows matter to a user: **sculpt defaults** (``sample``
with nothing but ``steps``: what a newcomer gets) and **sculpt tuned** (``sculpt.tune`` run
on the problem's model alone, from noise batches other than the benchmark's; the sampler is
chosen by its held-out trajectory error, never by the score). The tuning cost (seconds,
batched denoiser calls) is printed with them, and goal lines check the issue's targets.

``--models digits,digits-edm,mnist,mnist-edm`` adds models trained by sculpt (in
benchmarks/out/models/NAME; trained there first when missing, ``MODEL_RECIPES``). They are
scored by the Frechet distance in the features of a domain classifier against half of the
training images (the test splits are small: 297 digits), with two floors: real vs real (n
images of the other half), and the model's own limit (its ODE solved with 100 steps). Every
sampler starts from the same noise, so the differences between rows are far smaller than
the FD's own scatter. diffusers runs on them through the same eps-predictor at its
integer timesteps (discrete schedules, betas passed as ``trained_betas``), or through its
EDM schedulers for an EDM-schedule model.

Run ``python benchmarks/samplers.py`` (a few minutes on 2 cores; ``--quick`` for a
smoke run). The plot goes to benchmarks/out/samplers.png.
"""

from __future__ import annotations

import argparse
import inspect
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

import sculpt.schedules as schedules
from sculpt.metrics import frechet_distance
from sculpt.moments import MOMENTS_FILE, DataMoments, measure_moments
from sculpt.samplers import NFE, first_step_of, resolve_sampling, sample
from sculpt.toy import GaussianMixture
from sculpt.tune import TunedGrid, reference, tune

NFES = (3, 4, 5, 6, 8, 10, 20)
#: Samplers tuned by sculpt.tune; the best by held-out trajectory error is the "sculpt tuned" row.
TUNED_SAMPLERS = ("dpmpp_2m", "dpmpp_3m", "unipc")
#: sculpt's samplers in the tables (euler is ddim with eta = 0: not repeated; the ancestral ddpm / euler_ancestral
#: are far off at these NFE, on both sides, and left out to keep the run short).
SCULPT_SAMPLERS = ("ddim", "heun", "dpmpp_2m", "dpmpp_3m", "unipc", "dpmpp_2m_sde")
#: diffusers' timestep_spacing choices. sculpt's uniform-t grids of these names are DDIM's and Euler's levels
#: exactly; diffusers' multistep schedulers (DPM-Solver, UniPC, DEIS) space n + 1 levels and drop t = 0 instead.
SPACINGS = ("leading", "trailing", "linspace")
#: The grids both sides offer: the "same grids" comparison restricts sculpt to these.
SHARED_GRIDS = (*SPACINGS, "karras")
#: DDPM's linear betas, as diffusers configures them.
DIFFUSERS_BASE = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                      prediction_type="epsilon")
ROOT = Path(__file__).resolve().parent
OUT = ROOT / "out"


# -- the problem -------------------------------------------------------------------------


def make_mixture(dim: int, modes: int = 5) -> GaussianMixture:
    """Isotropic modes (std 0.08-0.12) of unequal weights, coordinates in about [-1, 1].

    Five modes (the default) have weights 0.40 .. 0.07. 2-D: means on a circle of radius 0.7
    (neighbours 0.82 apart, about 8 stds). Higher D: means at random corners of [-0.5, 0.5]^D
    (fixed seed), far apart in every direction. Other mode counts draw weights in [1, 4]
    (normalised) and stds in [0.08, 0.12] with a fixed seed.
    """
    weights = [0.40, 0.25, 0.15, 0.13, 0.07]
    stds = [0.10, 0.08, 0.12, 0.10, 0.09]
    if modes != 5:
        g = torch.Generator().manual_seed(1000 + modes)
        weights = (1 + 3 * torch.rand(modes, generator=g, dtype=torch.float64)).tolist()
        stds = (0.08 + 0.04 * torch.rand(modes, generator=g, dtype=torch.float64)).tolist()
    if dim == 2:
        angles = torch.arange(modes, dtype=torch.float64) * 2 * math.pi / modes + 0.3
        means = 0.7 * torch.stack([angles.cos(), angles.sin()], dim=1)
    else:
        signs = torch.randint(0, 2, (modes, dim), generator=torch.Generator().manual_seed(dim)) * 2 - 1
        means = 0.5 * signs.to(torch.float64)
    return GaussianMixture.make(weights, means, stds)


def exact_denoiser(gm: GaussianMixture) -> Callable[[Tensor, Tensor], Tensor]:
    """``gm.denoiser`` computed once per distinct sigma instead of once per sample.

    Samplers call D with one sigma for the whole batch; gm.denoiser factorises the
    [B, K, D, D] noisy covariances sample by sample (0.3 s per call at n = 20000 in 2-D),
    this factorises the K components once per call and applies them as matrix products
    (15 ms). ``check_denoiser`` holds it to gm.denoiser.
    """
    eye = torch.eye(gm.dim, dtype=torch.float64)

    def at_sigma(x: Tensor, sigma: float) -> Tensor:
        if math.isinf(sigma):
            return gm.mean.expand_as(x).clone()
        noisy = gm.covs + sigma**2 * eye  # [K, D, D]
        chol = torch.linalg.cholesky(noisy)
        whiten = torch.linalg.inv(chol)  # L^-1, so that |L^-1 (x - mu)|^2 is the Mahalanobis distance
        gain = gm.covs @ torch.linalg.inv(noisy)  # S (S + s^2 I)^-1
        diff = x[:, None, :] - gm.means[None]  # [B, K, D]
        solved = torch.einsum("kij,bkj->bki", whiten, diff)
        log_det = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)  # [K]
        log_probs = torch.log(gm.weights) - 0.5 * ((solved**2).sum(-1) + log_det)  # [B, K], constants cancel
        resp = torch.softmax(log_probs, dim=1)
        posterior_means = gm.means[None] + torch.einsum("kij,bkj->bki", gain, diff)  # [B, K, D]
        return (resp[..., None] * posterior_means).sum(1)

    def denoise(x: Tensor, sigma: Tensor | float) -> Tensor:
        shape, dtype = x.shape, x.dtype
        flat = x.to(torch.float64).reshape(shape[0], -1)
        sigma = torch.as_tensor(sigma, dtype=torch.float64).cpu().expand(shape[0])
        out = torch.empty_like(flat)
        for value in sigma.unique():
            rows = sigma == value
            out[rows] = at_sigma(flat[rows], float(value))
        return out.reshape(shape).to(dtype)

    return denoise


def check_denoiser(gm: GaussianMixture, denoise: Callable[[Tensor, Tensor], Tensor]) -> None:
    x = torch.randn(256, gm.dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2
    for sigma in (0.0, 0.01, 0.3, 3.0, 157.0, math.inf):
        expected, got = gm.denoiser(x, sigma), denoise(x, sigma)
        if not torch.allclose(got, expected, rtol=1e-9, atol=1e-12):
            raise AssertionError(f"exact_denoiser disagrees with gm.denoiser at sigma={sigma}")


class Counted:
    """Wraps a function and counts its calls: the NFE, whoever the caller is."""

    def __init__(self, fn: Callable[..., Tensor]) -> None:
        self.fn, self.calls = fn, 0
        self.data_moments = getattr(fn, "data_moments", None)  # the analytic first step sees through the count

    def __call__(self, *args, **kwargs) -> Tensor:
        self.calls += 1
        return self.fn(*args, **kwargs)


@dataclass
class Truth:
    """The mixture, a reference sample to measure against, and the true-vs-true floor."""

    gm: GaussianMixture
    reference: Tensor
    floor: tuple[float, float]

    def distance(self, x: Tensor) -> tuple[float, float]:
        """(Frechet distance to the reference, TV error of the argmax-assigned mode weights)."""
        x = x.to(torch.float64)
        if not torch.isfinite(x).all():
            return math.inf, 1.0
        assigned = self.gm.responsibilities(x).argmax(1)
        counts = torch.bincount(assigned, minlength=len(self.gm.weights)).to(torch.float64)
        mode_error = 0.5 * (counts / len(x) - self.gm.weights).abs().sum()
        return frechet_distance(x.numpy(), self.reference.numpy()), float(mode_error)


def make_truth(gm: GaussianMixture, n: int, draws: int = 4) -> Truth:
    """The floor is the mean over a few fresh true samples: one draw alone scatters by about 2x."""
    reference, _ = gm.sample(n, generator=torch.Generator().manual_seed(10))
    truth = Truth(gm, reference, (0.0, 0.0))
    floors = [truth.distance(gm.sample(n, generator=torch.Generator().manual_seed(11 + i))[0]) for i in range(draws)]
    truth.floor = tuple(sum(values) / draws for values in zip(*floors, strict=True))
    return truth


@dataclass(frozen=True)
class Result:
    side: str  # "sculpt" or "diffusers"
    family: str  # a sampler name or a diffusers scheduler (with its order)
    config: str  # the grid, or the scheduler options
    target: int  # the NFE budget
    nfe: int  # counted
    fd: float
    mode_error: float

    @property
    def label(self) -> str:
        return f"{self.family} [{self.config}]"


@dataclass
class Problem:
    """What every side runs on: a denoiser with its schedule, the benchmark's noise, a score and its floor."""

    name: str
    denoise: Callable[[Tensor, Tensor], Tensor]
    schedule: schedules.Schedule
    noise: Tensor
    score: Callable[[Tensor], tuple[float, float]]  # (FD, mode-weight error or nan)
    floor: tuple[float, float]
    model: Callable[..., Tensor]  # the network diffusers' schedulers call
    base: dict  # their shared scheduler options
    configs: list[tuple[str, type, dict]]  # what diffusers runs
    grids: tuple[str, ...] = tuple(schedules.GRIDS)  # sculpt's "any grid" rows
    samplers: tuple[str, ...] = ()  # sculpt's "any grid" samplers (default SCULPT_SAMPLERS)
    tune_n: int = 256
    tune_candidates: int = 48
    tune_nfes: tuple[int, ...] = NFES
    tuned_samplers: tuple[str, ...] = TUNED_SAMPLERS
    dtype: torch.dtype = torch.float64


def mixture_problem(name: str, truth: Truth, schedule: schedules.Schedule, noise: Tensor,
                    denoise: Callable[[Tensor, Tensor], Tensor] | None = None) -> Problem:
    """A mixture with its exact denoiser, scored against its truth, with diffusers' full set of schedulers."""
    denoise = denoise if denoise is not None else exact_denoiser(truth.gm)
    if getattr(denoise, "data_moments", None) is None:  # what training would record: the data's moments
        denoise.data_moments = DataMoments(truth.gm.mean, torch.diagonal(truth.gm.cov))
    return Problem(name, denoise, schedule, noise, truth.distance, truth.floor, eps_model(denoise, schedule),
                   DIFFUSERS_BASE, diffusers_configs(), tune_nfes=NFES)


# -- sculpt ------------------------------------------------------------------------------


def largest_steps(nfe_of_steps: Callable[[int], int], target: int) -> int:
    """The largest steps with nfe_of_steps(steps) <= target (NFE grows with steps)."""
    steps, nfe = target, nfe_of_steps(target)
    while steps > 1 and nfe > target:
        steps = max(1, min(steps - 1, steps * target // nfe))  # jump close for heun's 2 steps - 1
        nfe = nfe_of_steps(steps)
    return steps


def run_sculpt(problem: Problem) -> list[Result]:
    results, noise = [], problem.noise
    for name in problem.samplers or SCULPT_SAMPLERS:
        for spacing in problem.grids:
            for target in NFES:
                steps = largest_steps(NFE[name], target)
                counted = Counted(problem.denoise)
                x = sample(counted, tuple(noise.shape), sampler=name,
                           sigmas=schedules.grid(problem.schedule, steps, spacing), noise=noise,
                           generator=torch.Generator().manual_seed(2), dtype=problem.dtype)
                results.append(Result("sculpt", name, spacing, target, counted.calls, *problem.score(x)))
    return results


def run_defaults(problem: Problem) -> list[Result]:
    """What a newcomer gets: ``sample`` given nothing but the step count (its default sampler and grid)."""
    results, noise, chosen = [], problem.noise, []
    default = inspect.signature(sample).parameters["sampler"].default
    for target in NFES:
        sampler, spacing = resolve_sampling(default, target, problem.schedule)
        first = first_step_of(problem.denoise, sampler, target, spacing)
        chosen.append(f"NFE {target} {sampler} [{spacing}]" + (" + analytic first step" if first == "analytic" else ""))
        counted = Counted(problem.denoise)
        x = sample(counted, tuple(noise.shape), steps=largest_steps(NFE[sampler], target), schedule=problem.schedule,
                   noise=noise, generator=torch.Generator().manual_seed(2), dtype=problem.dtype)
        if counted.calls > target:
            raise RuntimeError(f"the default {sampler} spent {counted.calls} calls for NFE {target}")
        results.append(Result("sculpt defaults", default, "default grid", target, counted.calls, *problem.score(x)))
    print(f"  sculpt defaults ({problem.name}): " + ", ".join(chosen))
    return results


@dataclass
class Tuning:
    results: list[Result]  # every tuned sampler at every NFE
    chosen: dict[int, Result]  # per NFE: the sampler with the least held-out trajectory error
    grids: dict[tuple[str, int], TunedGrid]
    reference_seconds: float
    reference_calls: int


def run_tuned(problem: Problem) -> Tuning:
    """sculpt.tune on the problem's denoiser alone (its own noise batches), then the benchmark's noise on each grid."""
    shape = tuple(problem.noise.shape[1:])
    generator = torch.Generator().manual_seed(5)  # not the benchmark's noise (seed 3)
    options = dict(n=problem.tune_n, schedule=problem.schedule, generator=generator,
                   candidates=problem.tune_candidates, dtype=problem.dtype)
    refs = (reference(problem.denoise, shape, **options), reference(problem.denoise, shape, **options))
    results, chosen, grids = [], {}, {}
    for target in problem.tune_nfes:
        for name in problem.tuned_samplers:
            tuned = tune(problem.denoise, shape, nfe=target, sampler=name, schedule=problem.schedule, references=refs)
            grids[(name, target)] = tuned
            counted = Counted(problem.denoise)
            x = sample(counted, tuple(problem.noise.shape), sampler=name, sigmas=tuned.sigmas, noise=problem.noise,
                       dtype=problem.dtype, first_step=tuned.first_step)
            results.append(Result("sculpt tuned", name, "tuned", target, counted.calls, *problem.score(x)))
        pick = min(problem.tuned_samplers, key=lambda n, t=target: grids[(n, t)].held_out_error)
        chosen[target] = next(r for r in results if r.target == target and r.family == pick)
    return Tuning(results, chosen, grids, refs[0].seconds + refs[1].seconds, refs[0].calls + refs[1].calls)


# -- diffusers ---------------------------------------------------------------------------


def eps_model(denoise: Callable[[Tensor, Tensor], Tensor], schedule: schedules.Schedule) -> Callable[..., Tensor]:
    """The exact eps-prediction network of a DDPM-trained model: (x_vp, timestep) -> eps.

    A network knows only its timestep: sigma(t) is DDPM's table at integer t and, between
    levels, log-sigma interpolated (k-diffusion's and diffusers' _sigma_to_t convention,
    ``DiscreteSchedule``). x_vp = x / sqrt(1 + sigma^2), eps = (x - D(x, sigma)) / sigma.
    """
    last = schedule.num_steps - 1

    def model(x_vp: Tensor, timestep: Tensor | float) -> Tensor:
        sigma = float(schedule.sigma(float(timestep) / last))
        x = x_vp.to(torch.float64) * math.sqrt(1 + sigma**2)
        return ((x - denoise(x, sigma)) / sigma).to(x_vp.dtype)

    return model


def diffusers_configs() -> list[tuple[str, type, dict]]:
    """(family, scheduler class, options): every spacing, karras sigmas and orders where offered."""
    import diffusers as d

    configs = []

    def add(family: str, cls: type, spacings: tuple[str, ...] = SPACINGS, karras: bool = True, **options) -> None:
        for spacing in spacings:  # None: the scheduler has no timestep_spacing option
            configs.append((family, cls, dict(options, **({"timestep_spacing": spacing} if spacing else {}))))
        if karras:
            configs.append((family, cls, dict(use_karras_sigmas=True, **options)))

    add("DDIM", d.DDIMScheduler, karras=False, clip_sample=False)
    add("Euler", d.EulerDiscreteScheduler)
    add("Heun", d.HeunDiscreteScheduler, clip_sample=False)
    add("LMS", d.LMSDiscreteScheduler)
    for order in (2, 3):
        add(f"DPM++ {order}M", d.DPMSolverMultistepScheduler, solver_order=order, algorithm_type="dpmsolver++")
        add(f"DPM++ {order}M", d.DPMSolverMultistepScheduler, spacings=("trailing",), karras=False,
            solver_order=order, algorithm_type="dpmsolver++", final_sigmas_type="sigma_min")
        add(f"UniPC bh2 o{order}", d.UniPCMultistepScheduler, solver_order=order, solver_type="bh2")
        add(f"DEIS o{order}", d.DEISMultistepScheduler, solver_order=order)
        # DPMSolverSinglestep has no timestep_spacing option: its own linspace only.
        add(f"DPM++ {order}S", d.DPMSolverSinglestepScheduler, spacings=(None,), solver_order=order)
    add("DPM++ 2M SDE", d.DPMSolverMultistepScheduler, algorithm_type="sde-dpmsolver++")
    return configs


def describe(options: dict) -> str:
    shown = {k: v for k, v in options.items() if k not in ("solver_order", "solver_type", "algorithm_type",
                                                            "clip_sample")}
    if shown.pop("use_karras_sigmas", False):
        return "karras" + "".join(f" {v}" for v in shown.values())
    return " ".join(str(v) for v in shown.values()) or "default"


def diffusers_steps(cls: type, options: dict, target: int, base: dict = DIFFUSERS_BASE) -> int:
    """The largest num_inference_steps whose timesteps (one model call each) fit in ``target``."""

    def calls(steps: int) -> int:
        scheduler = cls(**base, **options)
        scheduler.set_timesteps(steps)
        return len(scheduler.timesteps)

    return largest_steps(calls, target)


def run_diffusers_loop(cls: type, options: dict, steps: int, noise: Tensor, model: Callable[..., Tensor],
                       base: dict = DIFFUSERS_BASE) -> Tensor:
    """diffusers' standard denoising loop."""
    scheduler = cls(**base, **options)
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(2)
    # Ancestral / SDE steps draw noise from a generator; deterministic steps have no such argument.
    extra = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    x = noise * scheduler.init_noise_sigma
    with torch.inference_mode():  # a network's autograd graph would grow over the loop (24 GB on MNIST)
        for t in scheduler.timesteps:
            eps = model(scheduler.scale_model_input(x, t), t)
            x = scheduler.step(eps, t, x, **extra).prev_sample
    return x


def run_diffusers(problem: Problem) -> list[Result]:
    results = []
    for family, cls, options in problem.configs:
        for target in NFES:
            model = Counted(problem.model)
            try:
                steps = diffusers_steps(cls, options, target, problem.base)
                x = run_diffusers_loop(cls, options, steps, problem.noise, model, problem.base)
            except (IndexError, AssertionError) as error:  # karras sigmas on cosine betas: repeated timesteps
                print(f"  diffusers {family} [{describe(options)}] at NFE {target} failed ({error}): scored inf")
                results.append(Result("diffusers", family, describe(options), target, model.calls, math.inf, math.nan))
                continue
            results.append(Result("diffusers", family, describe(options), target, model.calls, *problem.score(x)))
    return results


def check_many_steps(truth: Truth, schedule: schedules.Schedule, noise: Tensor, steps: int) -> list[str]:
    """Every diffusers scheduler (default options) and DDPM at 1000 steps should reach the floor."""
    import diffusers as d

    denoise = exact_denoiser(truth.gm)
    seen, lines = set(), []
    runs = [("DDPM", d.DDPMScheduler, dict(clip_sample=False), 1000)]
    for family, cls, options in diffusers_configs():
        if family not in seen:
            seen.add(family)
            runs.append((family, cls, options, steps))
    for family, cls, options, n_steps in runs:
        model = Counted(eps_model(denoise, schedule))
        fd, mode_error = truth.distance(run_diffusers_loop(cls, options, n_steps, noise, model))
        lines.append(f"  {family:<14} [{describe(options)}] NFE {model.calls:4d}: FD {fd:.2e}  mode {mode_error:.4f}")
    return lines


# -- trained models ----------------------------------------------------------------------

MODELS = OUT / "models"
MNIST = ROOT.parent.parent / "shared" / "data" / "mnist-5k"  # ../shared/data from the project root
#: How each model is trained when its folder is missing: `sculpt train` overrides (the default recipe, or EDM's).
EDM_RECIPE = {"diffusion.schedule": "edm", "diffusion.prediction": "edm", "diffusion.weighting": "edm"}
#: digits is the default main job (`sculpt train`), EDM's recipe for the same steps; MNIST-5k 500 steps each,
#: and mnist-2000 the default recipe trained four times as long (about 30 minutes on 2 cores).
MODEL_RECIPES = {
    "digits": {"data.name": "digits"},
    "digits-edm": {"data.name": "digits", **EDM_RECIPE},
    "mnist": {"data.name": f"mnist:{MNIST}", "train.steps": "500"},
    "mnist-edm": {"data.name": f"mnist:{MNIST}", "train.steps": "500", **EDM_RECIPE},
    "mnist-2000": {"data.name": f"mnist:{MNIST}", "train.steps": "2000"},
}


def edm_configs() -> list[tuple[str, type, dict]]:
    """diffusers' EDM schedulers: Euler and DPM-Solver++ orders 1-3, each on its karras and exponential sigmas."""
    import diffusers as d

    configs = []
    for spacing in ("karras", "exponential"):
        configs.append(("EDM Euler", d.EDMEulerScheduler, dict(sigma_schedule=spacing)))
        for order in (1, 2, 3):
            configs.append((f"EDM DPM++ {order}M", d.EDMDPMSolverMultistepScheduler,
                            dict(sigma_schedule=spacing, solver_order=order)))
        configs.append(("EDM DPM++ 2M SDE", d.EDMDPMSolverMultistepScheduler,
                        dict(sigma_schedule=spacing, algorithm_type="sde-dpmsolver++")))
    return configs


def edm_model(denoise: Callable[[Tensor, Tensor], Tensor], sigma_data: float) -> Callable[..., Tensor]:
    """D as the network diffusers' EDM schedulers call: (c_in x, 0.25 ln sigma) -> F with D = c_skip x + c_out F."""

    def model(x_in: Tensor, timestep: Tensor | float) -> Tensor:
        sigma = math.exp(4 * float(timestep))
        x = x_in * math.sqrt(sigma**2 + sigma_data**2)
        c_skip, c_out = sigma_data**2 / (sigma**2 + sigma_data**2), sigma * sigma_data / math.sqrt(sigma**2 +
                                                                                                   sigma_data**2)
        return (denoise(x, sigma) - c_skip * x) / c_out

    return model


def model_problem(name: str, args: argparse.Namespace) -> tuple[Problem, str]:
    """A run trained by sculpt (trained first if missing) as a Problem scored in domain-classifier features."""
    from sculpt.config import Config, override
    from sculpt.data import load_dataset
    from sculpt.metrics.features import train_classifier
    from sculpt.run import load
    from sculpt.runtime import autocast, resolve_precision
    from sculpt.train import train

    run = MODELS / name
    if not (run / "ema.safetensors").is_file():
        print(f"training {run} ({MODEL_RECIPES[name]}) ...", flush=True)
        train(override(Config(), {**MODEL_RECIPES[name], "train.sample_every": "0", "out": str(run)}), progress=True)
    D, config = load(run)
    train_set = load_dataset(config.data.name)
    if D.data_moments is None or D.data_moments.basis is None:  # a run trained before sculpt recorded them (or
        # their covariance, stop 23): what training now writes
        measure_moments(train_set, num_classes=config.model.num_classes, hflip=config.data.hflip).save(
            run / MOMENTS_FILE)
        D.data_moments = DataMoments.load(run / MOMENTS_FILE)
    test_set = load_dataset(config.data.name, split="test")
    extractor, accuracy = train_classifier(train_set, test_dataset=test_set, progress=False)
    # The reference is half of the training images (the test splits hold as few as 297), the floor the other half.
    shuffled = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(0))
    half = len(train_set) // 2
    n = min(args.model_n, half)
    reference = extractor.features(train_set.images(shuffled[:half]), progress=False)
    other_half = extractor.features(train_set.images(shuffled[half : half + n]), progress=False)
    real_floor = frechet_distance(other_half, reference)

    def score(x: Tensor) -> tuple[float, float]:
        x = x.float()
        if not torch.isfinite(x).all():
            return math.inf, math.nan
        return frechet_distance(extractor.features(x.clamp(-1, 1), progress=False), reference), math.nan

    precision = resolve_precision(args.model_precision, "cpu")

    def denoise(x: Tensor, sigma: Tensor | float) -> Tensor:
        with autocast("cpu", precision):  # the network only: every sampler's state stays float32
            return D(x.float(), sigma).float().to(x.dtype)

    denoise.data_moments = D.data_moments

    shape = (config.data.channels, config.data.resolution, config.data.resolution)
    noise = torch.randn(n, *shape, generator=torch.Generator().manual_seed(3))
    schedule = D.schedule
    if schedule.num_steps:
        base = dict(num_train_timesteps=schedule.num_steps, trained_betas=schedule.betas.tolist(),
                    prediction_type="epsilon")
        configs = [c for c in diffusers_configs() if c[0] in args.model_diffusers]
        model = eps_model(denoise, schedule)
    else:
        base = dict(sigma_min=schedule.sigma_min, sigma_max=schedule.sigma_max, sigma_data=D.sigma_data)
        configs, model = edm_configs(), edm_model(denoise, D.sigma_data)
    problem = Problem(name, denoise, schedule, noise, score, (real_floor, math.nan), model, base, configs,
                      grids=tuple(args.model_grids.split(",")), samplers=tuple(args.model_samplers.split(",")),
                      tune_n=args.tune_n, tune_candidates=args.tune_candidates, tune_nfes=args.tune_nfes,
                      tuned_samplers=tuple(args.model_samplers.split(",")), dtype=torch.float32)
    with torch.inference_mode():
        limit = score(sample(denoise, tuple(noise.shape), sampler="dpmpp_2m", steps=100, noise=noise,
                             schedule=schedule, spacing="logsnr"))[0]
    steps = config.train.steps
    line = (f"{name}: {config.data.name}, {config.model.net}, {config.diffusion.schedule} / "
            f"{config.diffusion.prediction} / {config.diffusion.weighting}, trained {steps} steps, network in "
            f"{precision}; classifier test accuracy {accuracy:.4f}; FD of n = {n} samples against {half} training "
            f"images; floors: real vs real "
            f"{real_floor:.2f}, the model's own limit (dpmpp_2m, 100 logsnr steps) {limit:.2f}")
    problem.floor = (real_floor, limit)  # the second is the model limit (no mode error on images)
    return problem, line


# -- report ------------------------------------------------------------------------------


def best(results: list[Result], target: int, where: Callable[[Result], bool] = lambda r: True,
         key: str = "fd") -> Result:
    chosen = [r for r in results if r.target == target and where(r)]
    return min(chosen, key=lambda r: (getattr(r, key), r.fd))


def print_table(title: str, results: list[Result], floor: tuple[float, float], image: bool = False) -> None:
    if image:
        print(f"\n{title}: FD at NFE {', '.join(map(str, NFES))} (NFE counted)")
        print(f"  {'floors: real vs real / model limit':<42}" + "".join(f" {floor[0]:9.3g} / {floor[1]:<9.3g}"
                                                                       for _ in NFES))
    else:
        print(f"\n{title}: FD / mode-weight TV error at NFE {', '.join(map(str, NFES))} (NFE counted)")
        print(f"  {'floor (true vs true)':<42}" + "".join(f" {floor[0]:9.2e} / {floor[1]:.4f}   " for _ in NFES))
    rows: dict[str, dict[int, Result]] = {}
    for r in results:
        rows.setdefault(r.label, {})[r.target] = r
    for label, by_target in rows.items():
        cells = [by_target.get(t) for t in NFES]
        text = ""
        for r in cells:
            if r is None:
                text += f" {'-':>9}   {'':<9}" if image else f" {'-':>9}   {'':<10}"
                continue
            mark = f"({r.nfe})" if r.nfe != r.target else "    "  # a heun budget it cannot hit exactly
            text += f" {r.fd:9.3g}{mark:<11}" if image else f" {r.fd:9.2e} / {r.mode_error:.4f}{mark}"
        print(f"  {label:<42}" + text)


def print_best_table(results: list[Result]) -> None:
    print("\n  best grid / configuration of each sampler: FD [config]")
    families = dict.fromkeys(r.side + "|" + r.family for r in results)
    for key in families:
        side, family = key.split("|")
        cells = [best(results, t, lambda r, s=side, f=family: r.side == s and r.family == f) for t in NFES]
        print(f"  {side:<9} {family:<14}" + "".join(f" {r.fd:9.3g} [{r.config:<18}]" for r in cells))


def print_cost(tuning: Tuning) -> None:
    print(f"\n  tuning cost (reference: {tuning.reference_calls} batched calls, {tuning.reference_seconds:.1f} s, "
          f"shared by every grid): seconds / batched calls / held-out error vs the best default grid's")
    for name in dict.fromkeys(name for name, _ in tuning.grids):
        cells = []
        for t in NFES:
            g = tuning.grids.get((name, t))
            cells.append(f" {g.seconds:5.1f}s {g.calls:5d} {g.held_out_error:.3g}/{g.baseline_error:.3g}" if g else
                         f" {'-':>28}")
        print(f"  {name:<12}" + "".join(cells))
    total_s = tuning.reference_seconds + sum(g.seconds for g in tuning.grids.values())
    total_calls = tuning.reference_calls + sum(g.calls for g in tuning.grids.values())
    print(f"  all grids: {total_s:.0f} s, {total_calls} batched calls")


def comparisons(sculpt: list[Result], diffusers: list[Result]) -> list[str]:
    lines = []
    for target in NFES:
        theirs = best(diffusers, target)
        for name, where in (("grids diffusers offers", lambda r: r.config in SHARED_GRIDS),
                            ("any sculpt grid", lambda r: True)):
            if not any(r.target == target and where(r) for r in sculpt):  # e.g. --model-grids cosine_uniform
                continue
            ours = best(sculpt, target, where)
            lines.append(f"NFE {target} frechet ({name}): sculpt {ours.label} {ours.fd:.3g}, "
                         f"diffusers best ({theirs.label}) {theirs.fd:.3g}, {theirs.fd / ours.fd:.2f}x")
        if not math.isnan(theirs.mode_error):
            ours, theirs = best(sculpt, target, key="mode_error"), best(diffusers, target, key="mode_error")
            lines.append(f"NFE {target} mode-weight: sculpt {ours.label} {ours.mode_error:.4f}, "
                         f"diffusers best ({theirs.label}) {theirs.mode_error:.4f}, "
                         f"{theirs.mode_error / max(ours.mode_error, 1e-12):.2f}x")
    return lines


def user_comparisons(defaults: list[Result], tuning: Tuning, diffusers: list[Result], floor: float) -> list[str]:
    """One line per NFE for defaults and tuned against diffusers' best, then the issue's three goals."""
    lines = []
    for target in NFES:
        theirs = best(diffusers, target)
        ours = best(defaults, target)
        lines.append(f"NFE {target} frechet, sculpt defaults: {ours.label} {ours.fd:.3g}, diffusers best "
                     f"({theirs.label}) {theirs.fd:.3g}, {theirs.fd / ours.fd:.2f}x")
        if target in tuning.chosen:
            tuned = tuning.chosen[target]
            lines.append(f"NFE {target} frechet, sculpt tuned: {tuned.label} {tuned.fd:.3g}, diffusers best "
                         f"({theirs.label}) {theirs.fd:.3g}, {theirs.fd / tuned.fd:.2f}x")
    d5, d10 = best(diffusers, 5), best(diffusers, 10)
    lines.append(f"goal 1, sculpt tuned NFE 5 ({tuning.chosen[5].label}) {tuning.chosen[5].fd:.3g} <= diffusers best "
                 f"NFE 10 ({d10.label}) {d10.fd:.3g}: {d10.fd / tuning.chosen[5].fd:.2f}x, "
                 f"{'met' if tuning.chosen[5].fd <= d10.fd else 'not met'}")
    ours5 = best(defaults, 5)
    excess, theirs_excess = ours5.fd - floor, d5.fd - floor
    lines.append(f"goal 2, sculpt defaults NFE 5 excess over the floor {excess:.3g} <= half diffusers' best "
                 f"({d5.label}) {theirs_excess:.3g}: "
                 f"{f'{theirs_excess / excess:.2f}x' if excess > 0 else 'at or below the floor'}, "
                 f"{'met' if excess <= theirs_excess / 2 else 'not met'}")
    ours10 = best(defaults, 10)
    lines.append(f"goal 3, sculpt defaults NFE 10 {ours10.fd:.3g} <= diffusers best NFE 10 ({d10.label}) "
                 f"{d10.fd:.3g}: {d10.fd / ours10.fd:.2f}x, {'met' if ours10.fd <= d10.fd else 'not met'}")
    return lines


def plot(runs: dict[str, tuple[tuple[float, float], list[Result], list[Result]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, len(runs), figsize=(7 * len(runs), 5.5), squeeze=False)
    for ax, (name, (floor, sculpt, diffusers)) in zip(axes[0], runs.items(), strict=True):
        lines = [(results, key, style) for results, style in ((sculpt, "-"), (diffusers, "--"))
                 for key in dict.fromkeys((r.side, r.family) for r in results)]
        colors = plt.get_cmap("tab20").colors  # up to 20 lines, each its own colour
        for (results, (side, family), style), color in zip(lines, colors * 3, strict=False):
            mine = [r for r in results if r.side == side and r.family == family]
            targets = [t for t in NFES if any(r.target == t for r in mine)]
            fds = [best(mine, t).fd for t in targets]
            width = 2.5 if side != "sculpt" and side != "diffusers" else 1.0
            ax.plot(targets, fds, style, color=color, marker="o", markersize=3, lw=width, label=f"{side} {family}")
        ax.axhline(floor[0], color="k", lw=0.8, label="floor")
        ax.set(xscale="log", yscale="log", xlabel="NFE", ylabel="Frechet distance (best grid / config)", title=name)
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xticks(NFES, [str(t) for t in NFES])
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def run_problem(problem: Problem, image: bool, floor_for_goals: float) -> tuple[list[str], list[Result], list[Result]]:
    start = time.perf_counter()
    defaults = run_defaults(problem)
    sculpt = run_sculpt(problem)
    print_table("sculpt (sampler [grid])", sculpt, problem.floor, image)
    tuning = run_tuned(problem)
    print_table("sculpt defaults and tuned grids", defaults + tuning.results, problem.floor, image)
    print_cost(tuning)
    diffusers = run_diffusers(problem)
    print_table("diffusers (scheduler [options])", diffusers, problem.floor, image)
    print_best_table(sculpt + diffusers)
    print()
    lines = comparisons(sculpt, diffusers) + user_comparisons(defaults, tuning, diffusers, floor_for_goals)
    print("\n".join(lines))
    print(f"({problem.name}: {time.perf_counter() - start:.0f} s)", flush=True)
    return lines, defaults + tuning.results + sculpt, diffusers


def main() -> None:
    global NFES  # --nfes replaces the columns
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20000, help="samples per run (problems above 4-D use n / 4)")
    parser.add_argument("--dims", type=int, nargs="*", default=[2, 16], help="mixture dimensions")
    parser.add_argument("--quick", action="store_true", help="n = 2000, a smoke run")
    parser.add_argument("--check", type=int, default=0, metavar="STEPS",
                        help="first run every diffusers scheduler at STEPS steps (and DDPM at 1000): all should "
                             "reach the floor, which validates the eps model (about 2 more minutes at 250)")
    parser.add_argument("--models", default="", help="comma list of trained models: " + ", ".join(MODEL_RECIPES))
    parser.add_argument("--model-n", type=int, default=500, help="samples per score on a model (capped at half its "
                        "training set)")
    parser.add_argument("--model-diffusers", default="DDIM,Euler,DPM++ 2M,DPM++ 3M,UniPC bh2 o2,UniPC bh2 o3",
                        help="diffusers families run on discrete-schedule models (each with every spacing and "
                             "karras)")
    parser.add_argument("--model-samplers", default="dpmpp_2m,unipc", help="sculpt samplers run (and tuned) on a model")
    parser.add_argument("--model-grids", default="trailing,karras,logsnr,few_step", help="their untuned grids")
    parser.add_argument("--tune-n", type=int, default=256, help="noise samples sculpt.tune uses on a model")
    parser.add_argument("--tune-candidates", type=int, default=48)
    parser.add_argument("--tune-nfes", default="3,4,5,6,8,10", help="NFE tuned on a model (others: '-')")
    parser.add_argument("--model-precision", default="auto", choices=("auto", "fp32", "bf16"),
                        help="the trained networks' autocast (auto: bf16 where the CPU has it, as `sculpt sample`)")
    parser.add_argument("--nfes", default=",".join(map(str, NFES)), help="the NFE columns (5 and 10 are needed for "
                        "the goals)")
    args = parser.parse_args()
    NFES = tuple(int(v) for v in args.nfes.split(","))
    args.model_diffusers = args.model_diffusers.split(",")
    args.tune_nfes = tuple(int(v) for v in args.tune_nfes.split(","))
    import diffusers

    diffusers.utils.logging.set_verbosity_error()  # DPMSolverSinglestep warns on every odd step count
    if args.quick:
        args.n = 2000
    # The work is many small batched ops; on 2 cores a second thread costs more than it gives.
    torch.set_num_threads(1)
    start = time.perf_counter()
    schedule = schedules.make("linear")
    runs, lines = {}, []
    for dim in args.dims:
        n = args.n if dim <= 4 else args.n // 4
        gm = make_mixture(dim)
        denoise = exact_denoiser(gm)
        check_denoiser(gm, denoise)
        truth = make_truth(gm, n)
        noise = torch.randn(n, dim, generator=torch.Generator().manual_seed(3))
        print(f"\n=== {dim}-D mixture, {len(gm.weights)} modes, weights {[round(w, 2) for w in gm.weights.tolist()]},"
              f" n = {n}, schedule linear (1000 steps, sigma {schedule.sigma_min:.3g}..{schedule.sigma_max:.4g})")
        print(f"floor (true vs true): FD {truth.floor[0]:.2e}, mode-weight TV {truth.floor[1]:.4f}")
        if args.check:
            print(f"check: diffusers schedulers at {args.check} steps should sit near the floor")
            print("\n".join(check_many_steps(truth, schedule, noise, args.check)))
        problem = mixture_problem(f"{dim}-D mixture", truth, schedule, noise, denoise)
        dim_lines, sculpt, diffusers_results = run_problem(problem, image=False, floor_for_goals=truth.floor[0])
        lines += [f"[{dim}-D] {line}" for line in dim_lines]
        runs[f"{dim}-D Gaussian mixture, n = {n}"] = (truth.floor, sculpt, diffusers_results)
    for name in [m for m in args.models.split(",") if m]:
        if name not in MODEL_RECIPES:
            raise SystemExit(f"unknown model {name!r}; valid: {', '.join(MODEL_RECIPES)}")
        problem, header = model_problem(name, args)
        print(f"\n=== {header}")
        # On a trained model the sampler cannot beat the model: the goals measure excess over its own limit.
        model_lines, sculpt, diffusers_results = run_problem(problem, image=True, floor_for_goals=problem.floor[1])
        lines += [f"[{name}] {header}"] + [f"[{name}] {line}" for line in model_lines]
        runs[f"{name} (FD in classifier features)"] = (problem.floor, sculpt, diffusers_results)
    plot(runs, OUT / "samplers.png")
    print("\nsummary\n" + "\n".join(lines))
    (OUT / "samplers.txt").write_text("\n".join(lines) + "\n")
    print(f"plot: {OUT / 'samplers.png'}; wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
