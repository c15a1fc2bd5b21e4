"""The ``sculpt`` command: train | sample | schedule | config | nets | ...

Each subcommand is a small function over the library; nothing here computes anything
the Python API cannot.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence

from .runtime import PRECISIONS, tune_cpu_allocator


def _schedule(args: argparse.Namespace) -> int:
    from .plots import plot_schedules
    from .schedules import SCHEDULES, make

    names = args.names or sorted(SCHEDULES)
    curves = []
    for name in names:
        curves.append((name, make(name)))
        if args.res:
            curves.append(
                (
                    f"{name} shifted to {args.res}px (base {args.base_res})",
                    make(name, res=args.res, base_res=args.base_res),
                )
            )
        if args.zero_snr:
            curves.append((f"{name} zero terminal SNR", make(name, zero_terminal_snr=True)))
    for label, schedule in curves:
        print(f"{label:<45s} {schedule!r}")
    if args.plot:
        path = plot_schedules(args.plot, curves)
        print(f"wrote {path}")
    return 0


def _split_overrides(extra: list[str]) -> dict[str, str]:
    """``--section.field=value`` / ``--section.field value`` pairs from the unparsed arguments."""
    assignments, i = {}, 0
    while i < len(extra):
        token = extra[i]
        if not token.startswith("--") or "." not in token.split("=")[0] and not token.startswith("--out"):
            raise ValueError(
                f"unrecognised argument {token!r}; config fields are set as --section.field=value (see `sculpt config`)"
            )
        if "=" in token:
            key, value = token[2:].split("=", 1)
            i += 1
        elif i + 1 < len(extra):
            key, value = token[2:], extra[i + 1]
            i += 2
        else:
            raise ValueError(f"{token} needs a value")
        assignments[key] = value
    return assignments


def _run_defaults(args: argparse.Namespace, config) -> None:
    """Sampler, steps and grid a run was made for, where the command line names none (a student's)."""
    args.sampler = args.sampler or config.train.sampler
    args.steps = args.steps or config.train.sample_steps
    if args.spacing is None:
        args.spacing = config.train.sample_spacing or None


def _resolved_config(args: argparse.Namespace, extra: list[str]):
    from .config import Config, override

    assignments = {}
    for flag, field in [
        ("data", "data.name"),
        ("net", "model.net"),
        ("steps", "train.steps"),
        ("out", "out"),
        ("task", "task"),
    ]:
        value = getattr(args, flag, None)
        if value is not None:
            assignments[field] = str(value)
    assignments.update(_split_overrides(extra))
    return override(Config(), assignments)


def _train(args: argparse.Namespace, extra: list[str]) -> int:
    from .train import Interrupted, train

    config = _resolved_config(args, extra)
    main_process = os.environ.get("RANK", "0") == "0"  # torchrun / accelerate launch: rank 0 speaks
    try:
        run_dir = train(config, resume=args.resume)
    except Interrupted as stopped:
        if main_process:
            print(f"sculpt train: {stopped}", file=sys.stderr)
        return 130
    if main_process:
        print(f"wrote {run_dir}: samples/final.png, loss.png, ema.safetensors")
    return 0


def _distill(args: argparse.Namespace, extra: list[str]) -> int:
    from .run import student_config
    from .train import Interrupted, train

    flags = [("data", "data.name"), ("net", "model.net")]
    overrides = {field: str(value) for flag, field in flags if (value := getattr(args, flag)) is not None}
    overrides.update(_split_overrides(extra))
    config = student_config(args.method, teacher=args.run, out=args.out, steps=args.steps, overrides=overrides)
    main_process = os.environ.get("RANK", "0") == "0"
    try:
        run_dir = train(config, resume=args.resume)
    except Interrupted as stopped:
        if main_process:
            print(
                f"sculpt distill: {stopped}".replace("sculpt train --resume", "sculpt distill --resume"),
                file=sys.stderr,
            )
        return 130
    if main_process:
        print(
            f"wrote {run_dir}: a {config.train.sample_steps}-step {args.method} student "
            f"(sculpt sample {run_dir} --steps {config.train.sample_steps})"
        )
    return 0


def _config(args: argparse.Namespace, extra: list[str]) -> int:
    from .config import to_json

    print(to_json(_resolved_config(args, extra)))
    return 0


def _nets(args: argparse.Namespace, extra: list[str]) -> int:
    import torch

    from .nets import NETS

    print(f"{'preset':<18s} {'parameters':>14s}   (at {args.channels}x{args.res}x{args.res}, unconditional)")
    for name, factory in NETS.items():
        with torch.device("meta"):
            net = factory(in_channels=args.channels, resolution=args.res)
        print(f"{name:<18s} {sum(p.numel() for p in net.parameters()):>14,d}")
    return 0


def _sample(args: argparse.Namespace, extra: list[str]) -> int:
    import numpy as np
    import torch

    from .images import save_grid, save_trajectory
    from .run import load
    from .samplers import NFE, generate, resolve_sampling

    if extra:
        raise ValueError(f"unrecognised arguments: {' '.join(extra)}")
    if args.n < 1:
        raise ValueError(f"-n must be >= 1 (got {args.n})")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    denoiser, config = load(args.run, ema=not args.raw, device=device)
    _run_defaults(args, config)
    args.sampler, args.spacing = resolve_sampling(args.sampler, args.steps, denoiser.schedule, args.spacing)
    shape = (config.data.channels, config.data.resolution, config.data.resolution)
    labels = None
    if config.model.num_classes:
        labels = (
            torch.arange(args.n) % config.model.num_classes if args.label is None else torch.full((args.n,), args.label)
        )
    recorded: list = []
    steps_to_keep: set[int] = set()
    if args.trajectory:
        total = args.steps
        steps_to_keep = {round(i * (total - 1) / (args.trajectory_columns - 1)) for i in range(args.trajectory_columns)}
    callback = (
        (lambda info: recorded.append(info) if info.index in steps_to_keep else None) if args.trajectory else None
    )
    images = generate(
        denoiser,
        shape,
        args.n,
        sampler=args.sampler,
        steps=args.steps,
        spacing=args.spacing,
        seed=args.seed,
        batch_size=args.batch_size,
        num_classes=config.model.num_classes,
        labels=labels,
        callback=callback,  # the trajectory follows the first batch
        device=device,
        precision=args.precision,
    )
    out = args.out or ("samples.npz" if args.format == "npz" else "samples.png")
    if args.format == "npz":
        np.savez_compressed(out, images=images.numpy(), labels=(labels.numpy() if labels is not None else []))
    else:
        scale = max(1, 256 // (config.data.resolution * max(1, int(args.n**0.5))))
        save_grid(out, images, nrow=config.model.num_classes or None, scale=max(scale, 2))
    print(
        f"wrote {out}: {args.n} samples, {args.sampler} with {args.steps} steps ({NFE[args.sampler](args.steps)} NFE) "
        f"on the {args.spacing} grid"
    )
    if args.trajectory:
        shown = min(args.n, args.batch_size, 4)  # the trajectory follows the first batch
        # x is shown in its variance-preserving scale x / sqrt(1 + sigma^2), so noise and image
        # share one colour range; x0_hat is the denoiser's estimate at the start of the step.
        states = [(info.x[:shown] / math.sqrt(1 + info.sigma_next**2)).float().cpu() for info in recorded]
        estimates = [info.x0_hat[:shown].float().cpu() for info in recorded]
        rows = [torch.stack([state[j] for state in states]).clamp(-1, 1) for j in range(shown)]
        rows += [torch.stack([estimate[j] for estimate in estimates]).clamp(-1, 1) for j in range(shown)]
        labels = [f"x #{j}" for j in range(shown)] + [f"x0_hat #{j}" for j in range(shown)]
        column_labels = [f"s={info.sigma_next:.3g}" for info in recorded]
        save_trajectory(
            args.trajectory,
            rows,
            labels=labels,
            column_labels=column_labels,
            scale=max(2, 64 // config.data.resolution),
        )
        print(f"wrote {args.trajectory}: the denoising path at {len(recorded)} steps (x above, x0_hat below)")
    return 0


def _eval(args: argparse.Namespace, extra: list[str]) -> int:
    import torch

    from . import evaluate as ev

    if extra:
        raise ValueError(f"unrecognised arguments: {' '.join(extra)}")
    metrics = ev.parse_metrics(args.metrics)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.real or args.fake:
        if not (args.real and args.fake and args.features):
            raise ValueError("scoring two image sets needs all of --real, --fake and --features")
        record = ev.evaluate_sets(
            args.real, args.fake, metrics=metrics, features=args.features, seed=args.seed, device=device
        )
        out = args.out or "eval.json"
    else:
        if not args.run:
            raise ValueError("give a run folder (sculpt eval RUN) or two image sets (--real ... --fake ...)")
        ctx = ev.prepare(args.run, features=args.features, split=args.split, device=device)
        _run_defaults(args, ctx.config)
        if args.sweep:
            grid = ev.parse_sweep(args.sweep)
            plot = args.plot or str(ctx.run_dir / "eval_sweep.png")
            rows = ev.sweep(
                ctx,
                grid=grid,
                metrics=metrics,
                n=args.n,
                seed=args.seed,
                sampler=args.sampler,
                steps=args.steps,
                spacing=args.spacing,
                split=args.split,
                plot=plot,
                device=device,
                precision=args.precision,
            )
            record = {"sweep": rows}
            print(f"wrote {plot}")
        else:
            record = ev.evaluate_run(
                ctx,
                metrics=metrics,
                n=args.n,
                sampler=args.sampler,
                steps=args.steps,
                spacing=args.spacing,
                seed=args.seed,
                split=args.split,
                device=device,
                precision=args.precision,
            )
        out = args.out or str(ctx.run_dir / ("eval_sweep.json" if args.sweep else "eval.json"))
    ev.write_record(out, record)
    if "scores" in record:
        for name, value in record["scores"].items():
            print(f"{name}: {json.dumps(value, default=float)}")
    print(f"wrote {out}")
    return 0


def _features(args: argparse.Namespace, extra: list[str]) -> int:
    from .data import load_dataset
    from .metrics.features import train_classifier

    if extra:
        raise ValueError(f"unrecognised arguments: {' '.join(extra)}")
    train_set = load_dataset(args.data, resolution=args.resolution)
    try:
        test_set = load_dataset(args.data, resolution=args.resolution, split="test")
    except (ValueError, FileNotFoundError):
        test_set = None
    extractor, accuracy = train_classifier(train_set, test_dataset=test_set, steps=args.steps, seed=args.seed)
    path = extractor.save(args.out)
    held_out = (
        f"held-out accuracy {accuracy:.4f} on {len(test_set)} images" if test_set is not None else "no test split"
    )
    print(f"wrote {path}: classifier on {args.data} ({held_out}); use --features classifier:{args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .objectives import OBJECTIVES
    from .samplers import AUTO, SAMPLERS
    from .schedules import GRIDS

    parser = argparse.ArgumentParser(prog="sculpt", description="Train, sample and evaluate diffusion models.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser(
        "train",
        help="train a model (default: a small UNet on the built-in 8x8 digits)",
        description="Train a diffusion model. Any config field can be set with --section.field=value; "
        "`sculpt config` prints them all.",
    )
    train.add_argument("--data", default=None, help="digits | mnist:PATH | cifar10:PATH | FOLDER | hf:NAME")
    train.add_argument("--net", default=None, help="a preset from `sculpt nets`")
    train.add_argument("--steps", type=int, default=None, help="training steps")
    train.add_argument("--out", default=None, help="run folder (default runs/digits)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    train.add_argument(
        "--task", default=None, choices=list(OBJECTIVES), help="the objective (default denoising; see sculpt distill)"
    )
    train.set_defaults(handler=_train)

    distill = commands.add_parser(
        "distill",
        help="a few-step student: consistency tuning (ect) or progressive distillation (pd) of a run, or ict",
        description="Train a student that samples in 1-4 steps. ect and pd start from the teacher RUN's "
        "weights; ict trains a consistency model from scratch (on RUN's data and network when given). "
        "Any config field can be set with --section.field=value (sections ect, ict, pd, train).",
    )
    distill.add_argument("run", nargs="?", default=None, help="the teacher: a run folder written by `sculpt train`")
    distill.add_argument("--method", required=True, choices=["ect", "ict", "pd"])
    distill.add_argument("--out", required=True, help="the student's run folder")
    distill.add_argument("--steps", type=int, default=None, help="training steps (pd: pd.rounds * pd.round_steps)")
    distill.add_argument("--data", default=None, help="ict without a teacher: the dataset")
    distill.add_argument("--net", default=None, help="ict without a teacher: the network preset")
    distill.add_argument("--resume", action="store_true", help="continue the student in --out")
    distill.set_defaults(handler=_distill)

    config = commands.add_parser("config", help="print the resolved default config (with any overrides)")
    config.add_argument("--data", default=None)
    config.add_argument("--net", default=None)
    config.add_argument("--steps", type=int, default=None)
    config.add_argument("--out", default=None)
    config.set_defaults(handler=_config)

    nets = commands.add_parser("nets", help="list network presets and their parameter counts")
    nets.add_argument("--res", type=int, default=32)
    nets.add_argument("--channels", type=int, default=3)
    nets.set_defaults(handler=_nets)

    sample = commands.add_parser("sample", help="draw samples from a trained run")
    sample.add_argument("run", help="run folder written by `sculpt train`")
    sample.add_argument(
        "--sampler", default=None, choices=[AUTO, *SAMPLERS],
        help="default: the run's own (train.sampler); auto picks the solver by the number of steps"
    )
    sample.add_argument("--steps", type=int, default=None, help="default: the run's own (train.sample_steps)")
    sample.add_argument(
        "--spacing", default=None, help=f"step grid: {' | '.join(GRIDS)} (default: the run's own; none set: by steps)"
    )
    sample.add_argument("-n", type=int, default=64, help="number of samples")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--label", type=int, default=None, help="class label for class-conditional runs")
    sample.add_argument("--out", default=None, help="output file (default samples.png / samples.npz)")
    sample.add_argument("--format", default="png", choices=["png", "npz"])
    sample.add_argument("--trajectory", default=None, metavar="PNG", help="also draw the denoising path")
    sample.add_argument("--trajectory-columns", type=int, default=8)
    sample.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA")
    sample.add_argument("--batch-size", type=int, default=256, help="samples drawn at once (memory)")
    sample.add_argument("--precision", default="fp32", choices=PRECISIONS, help="autocast for the network")
    sample.add_argument("--device", default=None)
    sample.set_defaults(handler=_sample)

    evaluate = commands.add_parser(
        "eval",
        help="score a run (or two image sets) with FID, KID, IS, precision/recall, bits/dim",
        description="Sample from a run's EMA model and score it against its dataset, writing every setting "
        "beside every number (eval.json).",
    )
    evaluate.add_argument("run", nargs="?", default=None, help="run folder written by `sculpt train`")
    evaluate.add_argument("--metrics", default="fid,kid,pr", help="comma list of fid,kid,is,pr,fid_inf,bpd")
    evaluate.add_argument("-n", "--n", type=int, default=10_000, help="samples to draw")
    evaluate.add_argument(
        "--sampler", default=None, choices=[AUTO, *SAMPLERS],
        help="default: the run's own (train.sampler); auto picks the solver by the number of steps"
    )
    evaluate.add_argument("--steps", type=int, default=None, help="default: the run's own (train.sample_steps)")
    evaluate.add_argument(
        "--spacing", default=None, help=f"step grid: {' | '.join(GRIDS)} (default: the run's own; none set: by steps)"
    )
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--split", default="train", help="reference split of the run's dataset")
    evaluate.add_argument(
        "--features",
        default=None,
        help="classifier:DIR | inception:PATH (default: a domain classifier fitted on the run's data)",
    )
    evaluate.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="steps=5,10,20 and/or sampler=ddim,heun: a quality-vs-NFE table and plot",
    )
    evaluate.add_argument("--plot", default=None, help="sweep plot path (default RUN/eval_sweep.png)")
    evaluate.add_argument("--real", default=None, help="a dataset spec, folder or .npz of real images")
    evaluate.add_argument("--fake", default=None, help="a folder or .npz of generated images")
    evaluate.add_argument("--out", default=None, help="where to write the record (default RUN/eval.json)")
    evaluate.add_argument("--device", default=None)
    evaluate.add_argument("--precision", default="fp32", choices=PRECISIONS, help="autocast for sampling")
    evaluate.set_defaults(handler=_eval)

    features = commands.add_parser("features", help="domain feature extractors for evaluation")
    features_commands = features.add_subparsers(dest="features_command", required=True)
    features_train = features_commands.add_parser("train", help="fit a small CNN classifier on a labelled dataset")
    features_train.add_argument("--data", default="digits")
    features_train.add_argument("--resolution", type=int, default=None)
    features_train.add_argument("--steps", type=int, default=600)
    features_train.add_argument("--seed", type=int, default=0)
    features_train.add_argument("--out", default="features/digits", help="folder for classifier.safetensors/.json")
    features_train.set_defaults(handler=_features)

    schedule = commands.add_parser("schedule", help="print and plot noise schedules (log-SNR, alpha_bar)")
    schedule.add_argument("names", nargs="*", help="schedule names (default: all)")
    schedule.add_argument("--res", type=int, default=None, help="also show each shifted to this resolution")
    schedule.add_argument("--base-res", type=int, default=64, help="resolution the schedule was tuned for")
    schedule.add_argument("--zero-snr", action="store_true", help="also show the zero-terminal-SNR variants")
    schedule.add_argument("--plot", metavar="PNG", default=None, help="write the plot here")
    schedule.set_defaults(handler=lambda args, extra: _schedule(args))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args, extra = build_parser().parse_known_args(argv)
    tune_cpu_allocator()  # the commands move large tensors on the CPU (sculpt.runtime)
    try:
        return args.handler(args, extra)
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError) as error:
        print(f"sculpt {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
