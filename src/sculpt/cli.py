"""The ``sculpt`` command: train | sample | schedule | config | nets | ...

Each subcommand is a small function over the library; nothing here computes anything
the Python API cannot.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _schedule(args: argparse.Namespace) -> int:
    from .plots import plot_schedules
    from .schedules import SCHEDULES, make

    names = args.names or sorted(SCHEDULES)
    curves = []
    for name in names:
        curves.append((name, make(name)))
        if args.res:
            curves.append((f"{name} shifted to {args.res}px (base {args.base_res})",
                           make(name, res=args.res, base_res=args.base_res)))
        if args.zero_snr:
            curves.append((f"{name} zero terminal SNR", make(name, zero_terminal_snr=True)))
    for label, schedule in curves:
        print(f"{label:<45s} {schedule!r}")
    if args.plot:
        path = plot_schedules(args.plot, curves)
        print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sculpt", description="Train, sample and evaluate diffusion models.")
    commands = parser.add_subparsers(dest="command", required=True)

    schedule = commands.add_parser("schedule", help="print and plot noise schedules (log-SNR, alpha_bar)")
    schedule.add_argument("names", nargs="*", help="schedule names (default: all)")
    schedule.add_argument("--res", type=int, default=None, help="also show each shifted to this resolution")
    schedule.add_argument("--base-res", type=int, default=64, help="resolution the schedule was tuned for")
    schedule.add_argument("--zero-snr", action="store_true", help="also show the zero-terminal-SNR variants")
    schedule.add_argument("--plot", metavar="PNG", default=None, help="write the plot here")
    schedule.set_defaults(run=_schedule)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"sculpt {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
