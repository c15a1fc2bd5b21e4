"""Step grids tuned to a model: the few levels at which a sampler should call it.

A sampler's error at few steps depends mostly on where its levels sit, and the best
places depend on the model. ``tune`` finds them with nothing but the model:

1. **A fine reference.** From a batch of noise, a fine solve (``reference`` sampler over
   ``sub`` log-uniform steps between each pair of ``candidates`` levels, log-uniform from
   sigma_max to sigma_min) gives the ODE's state and the denoiser's answer at every
   candidate level, and its end point.
2. **Dynamic programming** over the candidates (GITS, Chen et al. 2024, "A geometric
   perspective on optimal steps"): the cost of jumping from level i to level j is the
   distance between one DDIM step from the reference state at i and the reference state
   at j, damped by how much an error at j still matters at the end (sigma_data /
   sqrt(sigma_data^2 + sigma_j^2), the linear flow map of Gaussian data); the cheapest
   path of exactly ``steps`` jumps is the grid. The denoiser's answers at the candidates
   were computed by the reference solve, so this stage calls the model zero times. It is
   exact for DDIM / Euler and a starting point for everything else.
3. **Local refinement**: coordinate search on the log-sigma of each interior level, each
   trial scored by the real sampler run end to end from the batch's noise, against the
   reference end points (the mean over samples of their RMS distance). It starts from the
   better of the DP grid and the default grids (``sculpt.schedules.GRIDS``), so the tuned
   grid is never worse than those on the tuning batch. This is where multistep solvers
   (dpmpp_2m/3m, unipc), heun, and any sampler added later get a grid of their own.

A second batch of noise, never used for tuning, scores the tuned grid and the best default
grid: ``TunedGrid.held_out_error`` and ``baseline_error`` say whether the grid is overfit.

A run folder keeps its tuned grids in ``grids.json`` with the hash of the weights they
were tuned for; ``read_grids`` refuses a file made for other weights.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .denoiser import DenoiserFn
from .samplers import NFE, SAMPLERS, analytic_grid, analytic_start, check_sigmas, ddim, resolve_first_step
from .schedules import GRIDS, Schedule, grid

__all__ = [
    "GRIDS_FILE",
    "Reference",
    "TunedGrid",
    "reference",
    "tune",
    "tune_grid",
    "steps_for_nfe",
    "grid_error",
    "read_grids",
    "write_grids",
    "find_grid",
]

GRIDS_FILE = "grids.json"
_FORMAT = "sculpt-grids-1"
#: The default grids a tuned grid starts from (and is compared with); consistency is for students.
_BASELINES = tuple(name for name in GRIDS if name != "consistency")
#: Coordinate-search step sizes in log sigma, coarse to fine.
_DELTAS = (0.4, 0.2, 0.1, 0.05)


class _Counted:
    """D with a count of its (batched) calls."""

    def __init__(self, D: Callable[[Tensor, Tensor], Tensor]) -> None:
        self.D, self.calls = D, 0

    def __call__(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        self.calls += 1
        return self.D(x, sigma)


@dataclass
class Reference:
    """A fine solve from a batch of noise: the ODE's states and the denoiser's answers at candidate levels.

    ``levels`` [K + 1] runs from the start (sigma_max, or inf for zero terminal SNR) down to
    sigma_min, then 0; ``states[k]`` is the state at levels[k] (``states[0]`` the starting
    noise, ``states[K]`` the end point) and ``x0[k]`` = D(states[k], levels[k]) for k < K.
    """

    levels: Tensor
    states: Tensor
    x0: Tensor
    calls: int
    seconds: float
    settings: dict[str, Any]

    @property
    def noise(self) -> Tensor:
        return self.states[0]

    @property
    def end(self) -> Tensor:
        return self.states[-1]


@dataclass(frozen=True)
class TunedGrid:
    """A grid tuned for one sampler and step count, with the evidence that it helps."""

    sampler: str
    steps: int
    nfe: int
    sigmas: Tensor  #: float64, decreasing, ending in 0
    error: float  #: mean per-sample RMS distance of the end points to the reference, tuning batch
    held_out_error: float  #: the same on a batch of noise that tuning never saw
    baseline: str  #: the best default grid (``GRIDS``) on the held-out batch
    baseline_error: float  #: its held-out error
    start: str  #: what the refinement started from: "dp" or a default grid's name
    calls: int  #: batched denoiser calls spent on this grid (the references not included)
    seconds: float
    settings: dict[str, Any] = field(default_factory=dict)
    #: "analytic": the grid has steps + 1 steps, the first the data moments' Gaussian flow (``sculpt.moments``)
    first_step: str = "model"
    #: ``sculpt tune``'s check on the run's data (None: not checked): FD of the tuned grid and of the default
    #: grid at the same NFE, n, extractor; ``sculpt sample`` and ``sculpt eval`` skip a grid that lost it
    check: dict[str, Any] | None = None

    @property
    def lost_check(self) -> bool:
        return self.check is not None and self.check["tuned_fid"] > self.check["default_fid"]

    def to_json(self) -> dict[str, Any]:
        record = asdict(self)
        record["sigmas"] = [float(s) for s in self.sigmas]
        return record

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> TunedGrid:
        record = dict(record)
        record["sigmas"] = check_sigmas(torch.tensor(record["sigmas"], dtype=torch.float64))
        return cls(**record)


def steps_for_nfe(sampler: str, nfe: int) -> int:
    """The most steps of ``sampler`` whose denoiser calls fit in ``nfe`` (heun: 2 steps - 1)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; valid names: {', '.join(SAMPLERS)}")
    if not isinstance(nfe, int) or nfe < 1:
        raise ValueError(f"nfe must be an integer >= 1 (got {nfe!r})")
    steps = max((s for s in range(1, nfe + 1) if NFE[sampler](s) <= nfe), default=1)
    return steps


def _conditioned(D: DenoiserFn, cond: dict[str, Tensor] | None) -> Callable[[Tensor, Tensor], Tensor]:
    return D if not cond else (lambda x, sigma: D(x, sigma, **cond))


def _schedule_of(D: DenoiserFn, schedule: Schedule | None) -> Schedule:
    schedule = schedule if schedule is not None else getattr(D, "schedule", None)
    if schedule is None:
        raise ValueError("pass schedule= (D has no .schedule attribute): a tuned grid lives in a schedule's range")
    return schedule


def _finite_range(schedule: Schedule) -> tuple[float, float]:
    """(lowest, highest finite) sigma a tuned level may take."""
    top = schedule.sigma_max
    if math.isinf(top):  # zero terminal SNR: the finite levels start one discrete level below
        gap = 1 / (schedule.num_steps - 1) if schedule.num_steps else 1e-3
        top = float(schedule.sigma(1 - gap))
    bottom = max(schedule.sigma_min, 1e-12 * top)
    return bottom, top


def _device_of(D: DenoiserFn) -> torch.device:
    params = getattr(D, "parameters", None)
    first = next(iter(params()), None) if callable(params) else None
    return first.device if first is not None else torch.device("cpu")


def _noise(shape: tuple[int, ...], n: int, generator: torch.Generator | None, device, dtype) -> Tensor:
    source = generator.device if generator is not None else device
    return torch.randn((n, *shape), generator=generator, dtype=dtype, device=source).to(device)


def reference(
    D: DenoiserFn,
    shape: tuple[int, ...] | list[int],
    *,
    n: int = 256,
    schedule: Schedule | None = None,
    generator: torch.Generator | None = None,
    candidates: int = 48,
    sub: int = 4,
    sampler: str = "dpmpp_2m",
    cond: dict[str, Tensor] | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> Reference:
    """The fine reference solve of ``tune`` for n samples of ``shape`` (one sample's shape, no batch)."""
    from tqdm.auto import tqdm

    schedule = _schedule_of(D, schedule)
    shape = tuple(shape)
    if candidates < 3 or sub < 1:
        raise ValueError(f"need candidates >= 3 and sub >= 1 (got {candidates}, {sub})")
    bottom, top = _finite_range(schedule)
    start = schedule.sigma_max
    count = candidates - math.isinf(start)
    finite = torch.exp(torch.linspace(math.log(top), math.log(bottom), count, dtype=torch.float64))
    finite[0], finite[-1] = top, bottom  # exactly the range's ends
    levels = torch.cat([torch.tensor([start], dtype=torch.float64), finite]) if math.isinf(start) else finite
    # The fine grid: sub - 1 log-uniform levels inside each gap between candidates (none after infinity);
    # every candidate appears in it as the very same float, so the callback finds it.
    pieces = [levels[:1]]
    for hi, lo in zip(levels[:-1].tolist(), levels[1:].tolist(), strict=True):
        if math.isfinite(hi) and sub > 1:
            inside = torch.exp(torch.linspace(math.log(hi), math.log(lo), sub + 1, dtype=torch.float64))[1:-1]
            pieces.append(inside)
        pieces.append(torch.tensor([lo], dtype=torch.float64))
    fine = torch.cat([*pieces, torch.zeros(1, dtype=torch.float64)])
    levels = torch.cat([levels, torch.zeros(1, dtype=torch.float64)])
    wanted = {float(s): k for k, s in enumerate(levels.tolist())}

    device = _device_of(D)
    z = _noise(shape, n, generator, device, dtype)
    x_start = z if math.isinf(start) else z * math.sqrt(1 + start**2)
    states = torch.empty((len(levels), n, *shape), dtype=dtype, device=device)
    x0 = torch.empty((len(levels) - 1, n, *shape), dtype=dtype, device=device)
    states[0] = x_start
    bar = tqdm(total=len(fine) - 1, desc=f"reference ({sampler}, {len(fine) - 1} steps)", disable=not progress,
               leave=False)

    def record(info) -> None:
        if info.sigma in wanted:
            x0[wanted[info.sigma]] = info.x0_hat
        if info.sigma_next in wanted:
            states[wanted[info.sigma_next]] = info.x
        bar.update(1)

    counted = _Counted(_conditioned(D, cond))
    started = time.perf_counter()
    with torch.inference_mode():
        SAMPLERS[sampler](counted, x_start.clone(), fine, callback=record)
    bar.close()
    settings = dict(n=n, candidates=candidates, sub=sub, reference=sampler, reference_steps=len(fine) - 1,
                    schedule=repr(schedule), shape=list(shape))
    return Reference(levels, states, x0, counted.calls, time.perf_counter() - started, settings)


def _distance(a: Tensor, b: Tensor) -> float:
    """Mean over samples of the per-sample RMS distance.

    Not the RMS over the batch: a sample that a coarse grid sends to another mode of the data
    is off by the distance between modes, and squaring lets a handful of such samples (the
    ones nearest a boundary, which differ from batch to batch) decide the grid.
    """
    diff = (a.double() - b.double()).flatten(1)
    return float(diff.pow(2).mean(1).sqrt().mean())


def _dp_grid(ref: Reference, steps: int, sigma_data: float) -> Tensor:
    """GITS: the path of exactly ``steps`` DDIM jumps through the candidates with the least summed cost."""
    levels = ref.levels.tolist()
    last = len(levels) - 1  # the index of sigma = 0
    if steps > last:
        raise ValueError(f"steps={steps} needs more than {last} candidate levels; raise candidates")
    cost = torch.full((last + 1, last + 1), math.inf, dtype=torch.float64)
    for i in range(last):
        x0_i = ref.x0[i]
        for j in range(i + 1, last + 1):
            jumped = ddim(lambda x, sigma, x0_i=x0_i: x0_i, ref.states[i], torch.tensor([levels[i], levels[j]]))
            weight = sigma_data / math.sqrt(sigma_data**2 + levels[j] ** 2)
            cost[i, j] = weight * _distance(jumped, ref.states[j])
    best = torch.full((steps + 1, last + 1), math.inf, dtype=torch.float64)
    parent = torch.zeros((steps + 1, last + 1), dtype=torch.long)
    best[0, 0] = 0.0
    for s in range(1, steps + 1):
        totals = best[s - 1][:, None] + cost  # [from, to]
        best[s], parent[s] = totals.min(dim=0)
    path, node = [last], last
    for s in range(steps, 0, -1):
        node = int(parent[s, node])
        path.append(node)
    return ref.levels[list(reversed(path))]


def grid_error(
    D: Callable[[Tensor, Tensor], Tensor],
    sampler: str,
    sigmas: Tensor,
    ref: Reference,
    *,
    moments=None,
    cond: dict | None = None,
    **options: float,
) -> float:
    """Mean per-sample RMS distance of ``sampler`` on ``sigmas``, from the reference's noise, to its end points.

    With ``moments`` the first step is the analytic one (``sculpt.samplers.analytic_start``).
    """
    with torch.inference_mode():
        x = ref.noise.clone()
        if moments is not None:
            x, sigmas, _ = analytic_start(moments, x, sigmas, cond)
        if float(sigmas[0]) > 0:
            x = SAMPLERS[sampler](D, x, sigmas, **options)
    return _distance(x, ref.end) if torch.isfinite(x).all() else math.inf


def _refine(
    score: Callable[[Tensor], float], sigmas: Tensor, bounds: tuple[float, float], error: float
) -> tuple[Tensor, float]:
    """Coordinate search on log sigma of the interior levels (sigmas[1:-1]), keeping them strictly decreasing."""
    lo, hi = math.log(bounds[0]), math.log(bounds[1])
    gap = 1e-3  # levels never closer than this in log sigma
    for delta in _DELTAS:
        for _ in range(3):  # sweeps at this step size while one improves
            improved = False
            for k in range(1, len(sigmas) - 1):
                above, below = float(sigmas[k - 1]), float(sigmas[k + 1])
                upper = min(hi, math.log(above) - gap) if math.isfinite(above) else hi
                lower = max(lo, math.log(below) + gap) if below > 0 else lo
                u = math.log(float(sigmas[k]))
                for trial in (u + delta, u - delta):
                    trial = min(max(trial, lower), upper)
                    if abs(trial - u) < 1e-9:
                        continue
                    trial_sigmas = sigmas.clone()
                    trial_sigmas[k] = math.exp(trial)
                    trial_error = score(trial_sigmas)
                    if trial_error < error:
                        sigmas, error, improved = trial_sigmas, trial_error, True
                        break
            if not improved:
                break
    return sigmas, error


def _check_deterministic(D: Callable[[Tensor, Tensor], Tensor], sampler: str, ref: Reference) -> None:
    x = ref.noise[:4]
    sigmas = torch.tensor([float(ref.levels[0]), float(ref.levels[len(ref.levels) // 2]), 0.0], dtype=torch.float64)
    with torch.inference_mode():
        runs = [SAMPLERS[sampler](D, x.clone(), sigmas, generator=torch.Generator(device=x.device).manual_seed(seed))
                for seed in (1, 2)]
    if not torch.equal(runs[0], runs[1]):
        raise ValueError(
            f"sampler {sampler!r} draws fresh noise at each step, so its result cannot be matched to a reference "
            "trajectory; tune a deterministic (ODE) sampler instead: ddim, euler, heun, dpmpp_2m, dpmpp_3m, unipc"
        )


def tune(
    D: DenoiserFn,
    shape: tuple[int, ...] | list[int],
    *,
    nfe: int,
    sampler: str,
    schedule: Schedule | None = None,
    generator: torch.Generator | None = None,
    n: int = 256,
    candidates: int = 48,
    refine: bool = True,
    references: tuple[Reference, Reference] | None = None,
    cond: dict[str, Tensor] | None = None,
    progress: bool = False,
    first_step: str = "auto",
) -> TunedGrid:
    """Tune the grid of ``sampler`` at ``nfe`` denoiser calls for D (module docstring: reference, DP, refinement).

    ``shape`` is one sample's shape; ``n`` samples are drawn for tuning and ``n`` more to
    check the result (``held_out_error``). Pass ``references`` (two ``reference`` solves:
    tuning, held out) to share them across several calls. ``first_step`` as in ``sample``:
    where D carries its data's moments the grid gets one more step, the first, which is their
    Gaussian's closed-form flow (the tuned grid records it; sample it with ``first_step="analytic"``).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; valid names: {', '.join(SAMPLERS)}")
    schedule = _schedule_of(D, schedule)
    steps = steps_for_nfe(sampler, nfe)
    if references is None:
        kwargs = dict(n=n, schedule=schedule, generator=generator, candidates=candidates, cond=cond,
                      progress=progress)
        references = (reference(D, shape, **kwargs), reference(D, shape, **kwargs))
    ref, held_out = references
    started = time.perf_counter()
    counted = _Counted(_conditioned(D, cond))
    _check_deterministic(counted, sampler, ref)
    first = resolve_first_step(first_step, sampler, D, cond=cond, sigma_max=float(ref.levels[0]), steps=steps)
    moments = D.data_moments if first == "analytic" else None
    grid_steps = steps + (moments is not None)  # the analytic first step is one step more, no call

    def error_of(sigmas: Tensor, against: Reference) -> float:
        return grid_error(counted, sampler, sigmas, against, moments=moments, cond=cond)

    sigma_data = float(getattr(D, "sigma_data", 0.5))
    start_points = {"dp": _dp_grid(ref, grid_steps, sigma_data)}
    start_points.update({name: grid(schedule, grid_steps, name) for name in _BASELINES})
    if moments is not None:  # the default grid of the analytic first step (its first call at the Gaussian's end)
        start_points["analytic"] = analytic_grid(schedule, steps, None, moments, cond)
    scored = {name: error_of(sigmas, ref) for name, sigmas in start_points.items()}
    start = min(scored, key=scored.get)
    sigmas, error = start_points[start], scored[start]
    if refine and grid_steps >= 2:
        sigmas, error = _refine(lambda s: error_of(s, ref), sigmas, _finite_range(schedule), error)
    baselines = {name: error_of(start_points[name], held_out) for name in _BASELINES}
    baseline = min(baselines, key=baselines.get)
    settings = dict(ref.settings, refine=refine, sigma_data=sigma_data, held_out_n=held_out.states.shape[1])
    return TunedGrid(
        sampler=sampler,
        steps=steps,
        nfe=NFE[sampler](steps),
        sigmas=check_sigmas(sigmas),
        error=error,
        held_out_error=error_of(sigmas, held_out),
        baseline=baseline,
        baseline_error=baselines[baseline],
        start=start,
        calls=counted.calls,
        seconds=time.perf_counter() - started,
        settings=settings,
        first_step=first,
    )


def tune_grid(
    D: DenoiserFn,
    shape: tuple[int, ...] | list[int],
    *,
    nfe: int,
    sampler: str,
    schedule: Schedule | None = None,
    generator: torch.Generator | None = None,
    **options: Any,
) -> Tensor:
    """A step grid (float64 sigmas ending in 0) tuned for ``sampler`` at ``nfe`` calls of D; see ``tune``.

    Use it as ``sculpt.sample(D, shape, sampler=sampler, sigmas=tune_grid(D, ...))``.
    """
    return tune(D, shape, nfe=nfe, sampler=sampler, schedule=schedule, generator=generator, **options).sigmas


# -- grids.json in a run folder ---------------------------------------------------------------


def read_grids(run_dir: str | Path, weights_sha256: str) -> list[TunedGrid]:
    """The tuned grids of a run folder ([] without a grids.json), refusing grids tuned for other weights."""
    path = Path(run_dir) / GRIDS_FILE
    if not path.is_file():
        return []
    record = json.loads(path.read_text())
    if record.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a sculpt grids file (format {record.get('format')!r}, expected {_FORMAT})")
    if record["weights_sha256"] != weights_sha256:
        raise ValueError(
            f"{path} was tuned for weights {record['weights_sha256']}, but these weights hash {weights_sha256} "
            f"(trained further, or copied from another run): re-tune with `sculpt tune {run_dir}`"
        )
    return [TunedGrid.from_json(entry) for entry in record["grids"]]


def write_grids(run_dir: str | Path, weights_sha256: str, grids: Iterable[TunedGrid]) -> Path:
    """Add grids to RUN/grids.json (replacing any for the same sampler and steps); a file for other weights is
    replaced whole. Written atomically."""
    from .run import write_text

    path = Path(run_dir) / GRIDS_FILE
    try:
        kept = read_grids(run_dir, weights_sha256)
    except ValueError:
        kept = []  # tuned for other weights: stale, superseded by this tuning
    new = list(grids)
    fresh = {(g.sampler, g.steps) for g in new}
    entries = [g for g in kept if (g.sampler, g.steps) not in fresh] + new
    entries.sort(key=lambda g: (g.sampler, g.steps))
    record = {"format": _FORMAT, "weights_sha256": weights_sha256, "grids": [g.to_json() for g in entries]}
    write_text(path, json.dumps(record, indent=2) + "\n")
    return path


def find_grid(run_dir: str | Path, weights_sha256: str, sampler: str, steps: int) -> TunedGrid | None:
    """The grid tuned for ``sampler`` at ``steps`` in RUN/grids.json, or None (ValueError: other weights)."""
    return next((g for g in read_grids(run_dir, weights_sha256) if (g.sampler, g.steps) == (sampler, steps)), None)
