"""What `steps=N` alone gives: the default rule against the old default and the best sculpt offers.

sculpt picks the step grid and the solver from the number of steps (``sculpt.schedules.auto_spacing``,
``sculpt.samplers.auto_sampler``). This script is where that rule was fitted and where it is held to
account: Gaussian mixtures with exact denoisers (benchmarks/samplers.py's problems, plus a 48-D,
12-mode one like issue 11's), on every schedule kind (discrete VP linear and cosine, continuous VP
sigmoid, EDM, zero terminal SNR, resolution-shifted), at NFE 3 to 20. For each it runs every
candidate (solver, grid) pair from the same noise and prints, per NFE,

    NFE 5 [48-D linear]: rule unipc [few_step] 0.121, old default dpmpp_2m [trailing] 0.43, best ... 0.11, 3.55x

(the ratio is old / rule: above 1 means the rule is better), then one summary line per problem
with the rule's worst ratio to the best. ``--peer`` adds diffusers' best configuration at NFE 5
and 10 on the linear schedule (benchmarks/samplers.py's full set of schedulers and options).

    python benchmarks/defaults.py                      # 16-D and 48-D, every schedule (a few CPU minutes)
    python benchmarks/defaults.py --quick              # n = 1000, a smoke run
    python benchmarks/defaults.py --problems 48x12 --schedules linear --peer
"""

from __future__ import annotations

import argparse
import time

import torch

import samplers as bench  # benchmarks/samplers.py: the mixtures, the exact denoiser, the truth
import sculpt.schedules as schedules
from sculpt.samplers import AUTO, NFE, resolve_sampling, sample

NFES = (2, 3, 4, 5, 6, 8, 10, 15, 20, 30)
CANDIDATE_SAMPLERS = ("dpmpp_2m", "dpmpp_3m", "unipc", "ipndm", "ipndm3", "ipndm_v")
CANDIDATE_GRIDS = ("trailing", "karras", "logsnr", "few_step")
#: What sculpt did before the rule: dpmpp_2m on the schedule's own grid (karras for EDM, trailing otherwise).
OLD_SAMPLER = "dpmpp_2m"
SCHEDULE_KINDS = {
    "linear": lambda: schedules.make("linear"),
    "cosine": lambda: schedules.make("cosine"),
    "sigmoid": lambda: schedules.make("sigmoid"),
    "edm": lambda: schedules.make("edm"),
    "linear+zsnr": lambda: schedules.make("linear", zero_terminal_snr=True),
    "cosine*4": lambda: schedules.make("cosine", shift=4.0),
}


def old_spacing(schedule: schedules.Schedule) -> str:
    return "karras" if schedule.name.startswith("edm") else "trailing"


def run(truth: bench.Truth, schedule: schedules.Schedule, noise: torch.Tensor, name: str, spacing: str,
        target: int) -> float:
    steps = bench.largest_steps(NFE[name], target)
    x = sample(bench.exact_denoiser(truth.gm), tuple(noise.shape), sampler=name, noise=noise,
               sigmas=schedules.grid(schedule, steps, spacing), generator=torch.Generator().manual_seed(2))
    return truth.distance(x)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=4000, help="samples per run")
    parser.add_argument("--problems", nargs="+", default=["16x5", "48x12"], help="DIMxMODES mixtures")
    parser.add_argument("--schedules", nargs="+", default=list(SCHEDULE_KINDS), choices=list(SCHEDULE_KINDS))
    parser.add_argument("--nfe", type=int, nargs="+", default=list(NFES))
    parser.add_argument("--samplers", nargs="+", default=list(CANDIDATE_SAMPLERS), help="candidate solvers")
    parser.add_argument("--grids", nargs="+", default=list(CANDIDATE_GRIDS), help="candidate grids")
    parser.add_argument("--quick", action="store_true", help="n = 1000, a smoke run")
    parser.add_argument("--peer", action="store_true", help="diffusers' best at NFE 5 and 10 (linear schedule)")
    parser.add_argument("--table", action="store_true", help="print every candidate's FD, not only the best")
    args = parser.parse_args()
    if args.quick:
        args.n = 1000
    torch.set_num_threads(1)
    start = time.perf_counter()
    summary = []
    for problem in args.problems:
        dim, modes = (int(v) for v in problem.split("x"))
        gm = bench.make_mixture(dim, modes)
        truth = bench.make_truth(gm, args.n)
        noise = torch.randn(args.n, dim, generator=torch.Generator().manual_seed(3))
        for kind in args.schedules:
            schedule = SCHEDULE_KINDS[kind]()
            tag = f"{dim}-D {modes} modes, {kind}"
            print(f"\n=== {tag}: floor (true vs true) FD {truth.floor[0]:.3g}")
            worst = 0.0
            for target in args.nfe:
                results = {(s, g): run(truth, schedule, noise, s, g, target)
                           for s in args.samplers for g in args.grids}
                # the rule's solvers cost one NFE a step, so steps = the NFE budget
                rule_sampler, rule_grid = resolve_sampling(AUTO, target, schedule)
                rule = results.get((rule_sampler, rule_grid)) or run(truth, schedule, noise, rule_sampler,
                                                                      rule_grid, target)
                old = results.get((OLD_SAMPLER, old_spacing(schedule))) or run(truth, schedule, noise, OLD_SAMPLER,
                                                                                old_spacing(schedule), target)
                (best_s, best_g), best = min(results.items(), key=lambda item: item[1])
                worst = max(worst, rule / best)
                if args.table:
                    ranked = sorted(results.items(), key=lambda item: item[1])
                    print("  " + ", ".join(f"{s}[{g}] {fd:.3g}" for (s, g), fd in ranked))
                print(f"NFE {target} [{tag}]: rule {rule_sampler} [{rule_grid}] {rule:.3g}, old default {OLD_SAMPLER} "
                      f"[{old_spacing(schedule)}] {old:.3g}, best {best_s} [{best_g}] {best:.3g}, {old / rule:.2f}x")
            summary.append(f"[{tag}] the rule is within {worst:.2f}x of the best candidate at every NFE "
                           f"{min(args.nfe)}..{max(args.nfe)}")
            if args.peer and kind == "linear":
                summary += peer_lines(truth, schedule, noise, tag)
    print("\nsummary\n" + "\n".join(summary))
    print(f"wall time {time.perf_counter() - start:.0f} s")


def peer_lines(truth: bench.Truth, schedule: schedules.Schedule, noise: torch.Tensor, tag: str) -> list[str]:
    """diffusers' best configuration (every scheduler, spacing, Karras sigmas and order) at NFE 5 and 10."""
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    bench.NFES = (5, 10)
    theirs = bench.run_diffusers(bench.mixture_problem(tag, truth, schedule, noise))
    lines = []
    for target in (5, 10):
        peer = bench.best(theirs, target)
        name, spacing = resolve_sampling(AUTO, target, schedule)
        ours = run(truth, schedule, noise, name, spacing, target)
        lines.append(f"[{tag}] NFE {target} frechet, defaults: sculpt sample(steps={target}) = {name} [{spacing}] "
                     f"{ours:.3g}, diffusers best ({peer.label}) {peer.fd:.3g}, {peer.fd / ours:.2f}x")
    return lines


if __name__ == "__main__":
    main()
