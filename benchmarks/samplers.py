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

Run ``python benchmarks/samplers.py`` (under 3 minutes on 2 cores; ``--quick`` for a
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
from sculpt.samplers import NFE, sample
from sculpt.toy import GaussianMixture

NFES = (5, 10, 20, 50)
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
OUT = Path(__file__).resolve().parent / "out"


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


# -- sculpt ------------------------------------------------------------------------------


def largest_steps(nfe_of_steps: Callable[[int], int], target: int) -> int:
    """The largest steps with nfe_of_steps(steps) <= target (NFE grows with steps)."""
    steps, nfe = target, nfe_of_steps(target)
    while steps > 1 and nfe > target:
        steps = max(1, min(steps - 1, steps * target // nfe))  # jump close for heun's 2 steps - 1
        nfe = nfe_of_steps(steps)
    return steps


def run_sculpt(truth: Truth, schedule: schedules.Schedule, noise: Tensor) -> list[Result]:
    denoise = exact_denoiser(truth.gm)
    results = []
    for name in SCULPT_SAMPLERS:
        for spacing in schedules.GRIDS:
            for target in NFES:
                steps = largest_steps(NFE[name], target)
                counted = Counted(denoise)
                x = sample(counted, tuple(noise.shape), sampler=name, sigmas=schedules.grid(schedule, steps, spacing),
                           noise=noise, generator=torch.Generator().manual_seed(2))
                results.append(Result("sculpt", name, spacing, target, counted.calls, *truth.distance(x)))
    return results


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


def diffusers_steps(cls: type, options: dict, target: int) -> int:
    """The largest num_inference_steps whose timesteps (one model call each) fit in ``target``."""

    def calls(steps: int) -> int:
        scheduler = cls(**DIFFUSERS_BASE, **options)
        scheduler.set_timesteps(steps)
        return len(scheduler.timesteps)

    return largest_steps(calls, target)


def run_diffusers_loop(cls: type, options: dict, steps: int, noise: Tensor, model: Callable[..., Tensor]) -> Tensor:
    """diffusers' standard denoising loop."""
    scheduler = cls(**DIFFUSERS_BASE, **options)
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(2)
    # Ancestral / SDE steps draw noise from a generator; deterministic steps have no such argument.
    extra = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        eps = model(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(eps, t, x, **extra).prev_sample
    return x


def run_diffusers(truth: Truth, schedule: schedules.Schedule, noise: Tensor) -> list[Result]:
    denoise = exact_denoiser(truth.gm)
    results = []
    for family, cls, options in diffusers_configs():
        for target in NFES:
            model = Counted(eps_model(denoise, schedule))
            x = run_diffusers_loop(cls, options, diffusers_steps(cls, options, target), noise, model)
            results.append(Result("diffusers", family, describe(options), target, model.calls, *truth.distance(x)))
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


# -- report ------------------------------------------------------------------------------


def best(results: list[Result], target: int, where: Callable[[Result], bool] = lambda r: True,
         key: str = "fd") -> Result:
    chosen = [r for r in results if r.target == target and where(r)]
    return min(chosen, key=lambda r: (getattr(r, key), r.fd))


def print_table(title: str, results: list[Result], truth: Truth) -> None:
    print(f"\n{title}: FD / mode-weight TV error at NFE {', '.join(map(str, NFES))} (NFE counted)")
    print(f"  {'floor (true vs true)':<42}" + "".join(f" {truth.floor[0]:9.2e} / {truth.floor[1]:.4f}   "
                                                       for _ in NFES))
    rows: dict[str, dict[int, Result]] = {}
    for r in results:
        rows.setdefault(r.label, {})[r.target] = r
    for label, by_target in rows.items():
        cells = [by_target[t] for t in NFES]
        # an NFE other than the budget (a heun budget it cannot hit exactly) is shown in brackets
        print(f"  {label:<42}" + "".join(f" {r.fd:9.2e} / {r.mode_error:.4f}" + (f"({r.nfe})" if r.nfe != r.target
                                         else "    ") for r in cells))


def print_best_table(results: list[Result]) -> None:
    print("\n  best grid / configuration of each sampler: FD [config]")
    families = dict.fromkeys(r.side + "|" + r.family for r in results)
    for key in families:
        side, family = key.split("|")
        cells = [best(results, t, lambda r, s=side, f=family: r.side == s and r.family == f) for t in NFES]
        print(f"  {side:<9} {family:<14}" + "".join(f" {r.fd:9.2e} [{r.config:<18}]" for r in cells))


def comparisons(sculpt: list[Result], diffusers: list[Result]) -> list[str]:
    lines = []
    for target in NFES:
        theirs = best(diffusers, target)
        for name, where in (("grids diffusers offers", lambda r: r.config in SHARED_GRIDS),
                            ("any sculpt grid", lambda r: True)):
            ours = best(sculpt, target, where)
            lines.append(f"NFE {target} frechet ({name}): sculpt {ours.label} {ours.fd:.3g}, "
                         f"diffusers best ({theirs.label}) {theirs.fd:.3g}, {theirs.fd / ours.fd:.2f}x")
        ours, theirs = best(sculpt, target, key="mode_error"), best(diffusers, target, key="mode_error")
        lines.append(f"NFE {target} mode-weight: sculpt {ours.label} {ours.mode_error:.4f}, "
                     f"diffusers best ({theirs.label}) {theirs.mode_error:.4f}, "
                     f"{theirs.mode_error / max(ours.mode_error, 1e-12):.2f}x")
    return lines


def goal_line(sculpt: list[Result], diffusers: list[Result]) -> str:
    ours, theirs = best(sculpt, 5), best(diffusers, 10)
    verdict = "met" if ours.fd <= theirs.fd else "not met"
    return (f"goal: sculpt NFE 5 (best: {ours.label}, FD {ours.fd:.3g}, mode {ours.mode_error:.4f}) vs diffusers "
            f"best NFE 10 ({theirs.label}, FD {theirs.fd:.3g}, mode {theirs.mode_error:.4f}): {verdict}")


def plot(runs: dict[int, tuple[Truth, list[Result], list[Result]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, len(runs), figsize=(7 * len(runs), 5.5), squeeze=False)
    for ax, (dim, (truth, sculpt, diffusers)) in zip(axes[0], runs.items(), strict=True):
        lines = [(results, family, style) for results, style in ((sculpt, "-"), (diffusers, "--"))
                 for family in dict.fromkeys(r.family for r in results)]
        colors = plt.get_cmap("tab20").colors  # up to 20 lines, each its own colour
        for (results, family, style), color in zip(lines, colors * 2, strict=False):
            fds = [best(results, t, lambda r, f=family: r.family == f).fd for t in NFES]
            ax.plot(NFES, fds, style, color=color, marker="o", markersize=3, label=f"{results[0].side} {family}")
        ax.axhline(truth.floor[0], color="k", lw=0.8, label="true vs true")
        ax.set(xscale="log", yscale="log", xlabel="NFE", ylabel="Frechet distance (best grid / config)",
               title=f"{dim}-D Gaussian mixture, n = {len(truth.reference)}")
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xticks(NFES, [str(t) for t in NFES])
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20000, help="samples per run (problems above 4-D use n / 4)")
    parser.add_argument("--dims", type=int, nargs="+", default=[2, 16], help="mixture dimensions")
    parser.add_argument("--quick", action="store_true", help="n = 2000, a smoke run")
    parser.add_argument("--check", type=int, default=0, metavar="STEPS",
                        help="first run every diffusers scheduler at STEPS steps (and DDPM at 1000): all should "
                             "reach the floor, which validates the eps model (about 2 more minutes at 250)")
    args = parser.parse_args()
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
        check_denoiser(gm, exact_denoiser(gm))
        truth = make_truth(gm, n)
        noise = torch.randn(n, dim, generator=torch.Generator().manual_seed(3))
        print(f"\n=== {dim}-D mixture, {len(gm.weights)} modes, weights {[round(w, 2) for w in gm.weights.tolist()]},"
              f" n = {n}, schedule linear (1000 steps, sigma {schedule.sigma_min:.3g}..{schedule.sigma_max:.4g})")
        print(f"floor (true vs true): FD {truth.floor[0]:.2e}, mode-weight TV {truth.floor[1]:.4f}")
        if args.check:
            print(f"check: diffusers schedulers at {args.check} steps should sit near the floor")
            print("\n".join(check_many_steps(truth, schedule, noise, args.check)))
        sculpt = run_sculpt(truth, schedule, noise)
        diffusers = run_diffusers(truth, schedule, noise)
        print_table("sculpt (sampler [grid])", sculpt, truth)
        print_table("diffusers (scheduler [options])", diffusers, truth)
        print_best_table(sculpt + diffusers)
        print()
        dim_lines = comparisons(sculpt, diffusers) + [goal_line(sculpt, diffusers)]
        print("\n".join(dim_lines))
        lines += [f"[{dim}-D] {line}" for line in dim_lines]
        runs[dim] = (truth, sculpt, diffusers)
    plot(runs, OUT / "samplers.png")
    print("\nsummary\n" + "\n".join(lines))
    print(f"plot: {OUT / 'samplers.png'}; wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
