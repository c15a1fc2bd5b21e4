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

from .runtime import PRECISION_CHOICES, tune_cpu_allocator


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


FIELD_PREFIX = "config:"  # argparse dest of the generated --section.field options


def _add_config_fields(parser: argparse.ArgumentParser) -> None:
    """Every config field as an option, with its type, default and doc taken from sculpt.config's dataclasses.

    The options only collect text; ``sculpt.config.override`` parses it into the field's type,
    so the forms and the error messages are those of ``--section.field=value`` everywhere.
    """
    from .config import Config, describe_fields

    parser.add_argument(
        "--config",
        default=None,
        metavar="FILE.json",
        help="start from this saved config (e.g. another run's config.json); flags override it",
    )
    groups: dict[str, argparse._ArgumentGroup] = {}
    for dotted, kind, default, doc in describe_fields(Config()):
        if "." not in dotted:
            continue  # task and out: the --task and --out flags
        section = dotted.split(".")[0]
        if section not in groups:
            groups[section] = parser.add_argument_group(f"--{section}.* config fields")
        text = f"{doc} ({kind}, default {default!r})" if doc else f"({kind}, default {default!r})"
        groups[section].add_argument(
            f"--{dotted}",
            dest=FIELD_PREFIX + dotted,
            default=argparse.SUPPRESS,
            metavar=kind.split(" ")[0].upper(),
            help=text.replace("%", "%%"),
        )


def _tuned_sigmas(run: str, raw: bool, spacing: str | None, sampler: str, steps: int):
    """The grid RUN/grids.json holds for (sampler, steps) when no other grid was asked for.

    Returns (sigmas, source, first_step): first_step is "analytic" for a grid tuned with the
    analytic first step (one step more than ``steps``), else None (what the command line said).

    ``spacing`` is what the command line named (None: nothing, "tuned": insist on a tuned grid).
    A grids.json tuned for other weights is refused: an error with ``--spacing tuned``, else a
    note on stderr and the default grid.
    """
    from .run import run_folder, weights_file, weights_hash
    from .samplers import NFE
    from .tune import GRIDS_FILE, find_grid

    if spacing not in (None, "tuned"):
        return None, None, None
    path, weights = run_folder(run) / GRIDS_FILE, weights_file(run, ema=not raw)
    found = None
    if path.is_file() and weights.is_file():
        try:
            found = find_grid(run_folder(run), weights_hash(weights), sampler, steps)
        except ValueError as error:
            if spacing == "tuned":
                raise
            print(f"not using {path}: {error}", file=sys.stderr)
    if found is None:
        if spacing == "tuned":
            raise ValueError(
                f"no grid tuned for {sampler} at {steps} steps in {path}; make one with "
                f"`sculpt tune {run} --sampler {sampler} --nfe {NFE[sampler](steps)}`"
            )
        return None, None, None
    if found.lost_check and spacing != "tuned":
        check = found.check
        print(f"not using the tuned grid from {path} ({sampler}, {steps} steps): on the run's data it scored FD "
              f"{check['tuned_fid']:.4g} against {check['default_fid']:.4g} for the default grid "
              f"(n = {check['n']}, checked by `sculpt tune`); --spacing tuned uses it anyway")
        return None, None, None
    shown = ", ".join(f"{float(v):.3g}" for v in found.sigmas)
    analytic = found.first_step == "analytic"
    print(f"using the tuned grid from {path} ({sampler}, {steps} steps, NFE {found.nfe}: sigmas {shown}"
          + (", analytic first step" if analytic else "") + ")")
    return found.sigmas, str(path), ("analytic" if analytic else None)


def _resolved_config(args: argparse.Namespace, extra: list[str]):
    from .config import Config, load_config, override

    assignments = {}
    for flag, field in [
        ("data", "data.name"),
        ("net", "model.net"),
        ("steps", "train.steps"),
        ("out", "out"),
        ("task", "task"),
        ("latent", "latent.autoencoder"),
    ]:
        value = getattr(args, flag, None)
        if value is not None:
            assignments[field] = str(value)
    for name, value in vars(args).items():
        if name.startswith(FIELD_PREFIX):
            assignments[name[len(FIELD_PREFIX) :]] = value
    assignments.update(_split_overrides(extra))
    if assignments.get("task") == "autoencoder":  # an autoencoder run's default network is an autoencoder
        assignments.setdefault("model.net", "ae-f4")
    path = getattr(args, "config", None)
    if path is not None and not os.path.isfile(path):
        raise FileNotFoundError(f"--config {path}: no such file (expected a config.json written by sculpt)")
    return override(load_config(path) if path else Config(), assignments)


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
        if config.task == "autoencoder":
            print(f"wrote {run_dir}: samples/final.png (input | reconstruction), latent_scale.json, ema.safetensors")
        else:
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

    from .nets import AUTOENCODERS, NETS

    print(f"{'preset':<18s} {'parameters':>14s}   (at {args.channels}x{args.res}x{args.res}, unconditional)")
    for name, factory in NETS.items():
        with torch.device("meta"):
            net = factory(in_channels=args.channels, resolution=args.res)
        print(f"{name:<18s} {sum(p.numel() for p in net.parameters()):>14,d}")
    print(f"\n{'autoencoder':<18s} {'parameters':>14s}   factor  latent (sculpt train --task autoencoder --net NAME)")
    for name, factory in AUTOENCODERS.items():
        with torch.device("meta"):
            net = factory(in_channels=args.channels, resolution=64)  # the weights do not depend on the size
        side = args.res // net.factor
        latent = f"{net.latent_channels}x{side}x{side}" if args.res % net.factor == 0 else "(size not divisible)"
        print(f"{name:<18s} {sum(p.numel() for p in net.parameters()):>14,d}   {net.factor:>6d}  {latent}")
    return 0


def _guidance_options(args: argparse.Namespace):
    """The guidance asked for on the command line (None: unguided), refusing options that need --guidance."""
    from .guidance import GuidanceOptions, parse_interval

    if args.guidance is None:
        given = [
            flag
            for flag, value in [
                ("--guidance-interval", args.guidance_interval),
                ("--guidance-rescale", args.guidance_rescale),
                ("--guide", args.guide),
            ]
            if value is not None
        ]
        if given:
            raise ValueError(f"{', '.join(given)} shape guidance; give its weight too, e.g. --guidance 2.0")
        return None
    interval = parse_interval(args.guidance_interval) if args.guidance_interval is not None else None
    return GuidanceOptions(args.guidance, interval, args.guidance_rescale or 0.0, args.guide)


def _check_label(label: int | None, num_classes: int, run: str) -> None:
    if label is None:
        return
    if not num_classes:
        raise ValueError(
            f"--label {label}: {run} is unconditional (trained without --model.class_cond=true); drop --label"
        )
    if not 0 <= label < num_classes:
        raise ValueError(
            f"--label {label} is out of range: {run} has {num_classes} classes, labels 0 to {num_classes - 1}"
        )


def _sample(args: argparse.Namespace, extra: list[str]) -> int:
    import numpy as np
    import torch

    from .guidance import guided_run
    from .images import save_grid, save_trajectory
    from .run import load
    from .samplers import NFE, class_rows, first_step_of, generate, resolve_sampling

    if extra:
        raise ValueError(f"unrecognised arguments: {' '.join(extra)}")
    if args.n < 1:
        raise ValueError(f"-n must be >= 1 (got {args.n})")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    denoiser, config = load(args.run, ema=not args.raw, device=device)
    asked_spacing = args.spacing
    _run_defaults(args, config)
    args.spacing = None if args.spacing == "tuned" else args.spacing
    args.sampler, args.spacing = resolve_sampling(args.sampler, args.steps, denoiser.schedule, args.spacing)
    sigmas, _, tuned_first = _tuned_sigmas(args.run, args.raw, asked_spacing, args.sampler, args.steps)
    args.first_step = tuned_first or args.first_step
    grid_name = "tuned" if sigmas is not None else args.spacing  # what the printout names
    num_classes = config.model.num_classes
    _check_label(args.label, num_classes, args.run)
    denoiser, guidance = guided_run(denoiser, config, _guidance_options(args), run_dir=args.run, device=device)
    shape = (config.data.channels, config.data.resolution, config.data.resolution)
    labels, nrow = None, None
    if args.label is not None:
        labels = torch.full((args.n,), args.label)
    elif num_classes and args.format == "png":  # a class-by-class grid: one row per class
        labels = class_rows(num_classes, args.n)
        args.n, nrow = len(labels), len(labels) // num_classes
    elif num_classes:
        labels = torch.arange(args.n) % num_classes
    recorded: list = []
    steps_to_keep: set[int] = set()
    first = first_step_of(
        denoiser, args.sampler, args.steps, args.spacing, sigmas=sigmas, first_step=args.first_step,
        conditional=labels is not None,
    )
    if args.trajectory:
        total = len(sigmas) - 1 if sigmas is not None else args.steps + (first == "analytic")  # analytic: one more
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
        sigmas=sigmas,
        seed=args.seed,
        batch_size=args.batch_size,
        num_classes=num_classes,
        labels=labels,
        callback=callback,  # the trajectory follows the first batch
        device=device,
        precision=args.precision,
        first_step=args.first_step,
    )
    out = args.out or ("samples.npz" if args.format == "npz" else "samples.png")
    if args.format == "npz":
        np.savez_compressed(out, images=images.numpy(), labels=(labels.numpy() if labels is not None else []))
    else:
        scale = max(1, 256 // (config.data.resolution * max(1, int(args.n**0.5))))
        save_grid(out, images, nrow=nrow, scale=max(scale, 2))
    rows = f" (one row per class, {nrow} each)" if nrow else (f" of class {args.label}" if labels is not None else "")
    guided = ""
    if guidance:
        guided = f", {guidance['kind']} guidance w={guidance['weight']:g}"
        guided += (
            f" on sigma in ({guidance['interval'][0]:g}, {guidance['interval'][1]:g}]" if guidance["interval"] else ""
        )
        guided += f", rescale {guidance['rescale']:g}" if guidance["rescale"] else ""
        guided += f", guide {guidance['guide']}" if guidance["guide"] else ""
    print(
        f"wrote {out}: {args.n} samples{rows}, {args.sampler} with {args.steps} steps "
        f"({NFE[args.sampler](args.steps)} NFE) on the {grid_name} grid{guided}"
        + (", analytic first step (the data's Gaussian: one step more, no call)" if first == "analytic" else "")
    )
    if args.trajectory:
        shown = min(args.n, args.batch_size, 4)  # the trajectory follows the first batch
        # x is shown in its variance-preserving scale x / sqrt(1 + sigma^2), so noise and image
        # share one colour range; x0_hat is the denoiser's estimate at the start of the step.
        # A latent run's states and estimates are latents: both are shown decoded.
        codec = getattr(denoiser, "codec", None)
        pixels = codec.decode if codec is not None else (lambda z: z)
        states = [pixels(info.x[:shown] / math.sqrt(1 + info.sigma_next**2)).float().cpu() for info in recorded]
        estimates = [pixels(info.x0_hat[:shown]).float().cpu() for info in recorded]
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
    from .samplers import resolve_sampling

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
        grid = ev.parse_sweep(args.sweep) if args.sweep else {}
        if "guidance" in grid:
            if args.guidance is not None:
                raise ValueError("give either --guidance W or --sweep guidance=W1,W2,..., not both")
            args.guidance = grid["guidance"][0]  # the sweep sets the weight; the other flags shape it
        guidance = _guidance_options(args)
        if guidance is not None:  # refuse guidance the run cannot take before fitting features or sampling
            from .guidance import check_guidance
            from .run import read_config

            check_guidance(read_config(args.run), guidance)
        ctx = ev.prepare(args.run, features=args.features, split=args.split, device=device, data=args.data)
        asked_spacing = args.spacing
        _run_defaults(args, ctx.config)
        args.spacing = None if args.spacing == "tuned" else args.spacing
        if args.sweep:
            tuned, source = {}, None
            for name in grid.get("sampler", [args.sampler]):
                for count in grid.get("steps", [args.steps]):
                    concrete = resolve_sampling(name, count, ctx.denoiser.schedule, args.spacing)[0]
                    sigmas, found, tuned_first = _tuned_sigmas(args.run, False, asked_spacing, concrete, count)
                    if sigmas is not None:
                        tuned[(name, count)], source = (sigmas, tuned_first), found
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
                tuned=tuned,
                grid_source=source,
                split=args.split,
                plot=plot,
                device=device,
                precision=args.precision,
                guidance=guidance,
                first_step=args.first_step,
            )
            record = {"sweep": rows}
            print(f"wrote {plot}")
        else:
            concrete = resolve_sampling(args.sampler, args.steps, ctx.denoiser.schedule, args.spacing)[0]
            sigmas, source, tuned_first = _tuned_sigmas(args.run, False, asked_spacing, concrete, args.steps)
            record = ev.evaluate_run(
                ctx,
                metrics=metrics,
                n=args.n,
                sampler=args.sampler,
                steps=args.steps,
                spacing=args.spacing,
                sigmas=sigmas,
                grid_source=source,
                seed=args.seed,
                split=args.split,
                device=device,
                precision=args.precision,
                guidance=guidance,
                first_step=tuned_first or args.first_step,
            )
        out = args.out or str(ctx.run_dir / ("eval_sweep.json" if args.sweep else "eval.json"))
    ev.write_record(out, record)
    if "scores" in record:
        for name, value in record["scores"].items():
            print(f"{name}: {json.dumps(value, default=float)}")
    print(f"wrote {out}")
    return 0


def _export(args: argparse.Namespace, extra: list[str]) -> int:
    from .interop import export_diffusers
    from .run import load

    if extra:
        raise ValueError(f"unrecognised arguments: {' '.join(extra)}")
    denoiser, config = load(args.run, ema=not args.raw)
    out = export_diffusers(denoiser, config, args.out)
    print(f"wrote {out}: a DDPMPipeline (DDPMPipeline.from_pretrained({str(out)!r}) loads and samples it)")
    return 0


def _tune(args: argparse.Namespace, extra: list[str]) -> int:
    import time

    import torch

    from .run import load, run_folder, weights_file, weights_hash
    from .tune import reference, steps_for_nfe, tune, write_grids

    if extra:
        raise ValueError(f"unrecognised arguments: {' '.join(extra)}")
    try:
        nfes = sorted({int(v) for v in args.nfe.split(",") if v.strip()})
    except ValueError:
        raise ValueError(f"--nfe takes a comma list of integers like 3,4,5,6,8,10 (got {args.nfe!r})") from None
    if not nfes or nfes[0] < 1:
        raise ValueError(f"--nfe needs NFE values >= 1 (got {args.nfe!r})")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    denoiser, config = load(args.run, device=device)
    digest = weights_hash(weights_file(args.run))
    samplers = [v.strip() for v in (args.sampler or config.train.sampler).split(",") if v.strip()]
    shape = (config.data.channels, config.data.resolution, config.data.resolution)
    if (codec := getattr(denoiser, "codec", None)) is not None:  # a latent run samples (so is tuned) in latents
        shape = tuple(codec.latent_shape(shape))
    cond = None
    if config.model.num_classes:  # class-conditional: tune over every class in turn
        cond = {"class_labels": (torch.arange(args.n) % config.model.num_classes).to(device)}
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(args.seed)
    options = dict(n=args.n, generator=generator, candidates=args.candidates, cond=cond, progress=True)
    refs = (reference(denoiser, shape, **options), reference(denoiser, shape, **options))
    calls = refs[0].calls + refs[1].calls
    print(f"reference: {refs[0].settings['reference']} with {refs[0].settings['reference_steps']} steps on "
          f"2 x {args.n} samples ({calls} calls, {time.perf_counter() - started:.1f} s)")
    tuned = []
    for sampler in samplers:
        for nfe in nfes:
            steps = steps_for_nfe(sampler, nfe)
            if any((g.sampler, g.steps) == (sampler, steps) for g in tuned):
                continue  # heun: two NFE budgets can give the same steps
            result = tune(denoiser, shape, nfe=nfe, sampler=sampler, references=refs, cond=cond)
            tuned.append(result)
            calls += result.calls
            gain = result.baseline_error / max(result.held_out_error, 1e-12)
            print(
                f"{sampler} NFE {result.nfe} ({len(result.sigmas) - 1} steps"
                f"{', analytic first step' if result.first_step == 'analytic' else ''}): "
                f"error {result.error:.4g}, held out "
                f"{result.held_out_error:.4g}; best default grid ({result.baseline}) {result.baseline_error:.4g}, "
                f"{gain:.2f}x; {result.seconds:.1f} s, {result.calls} calls"
            )
    path = write_grids(run_folder(args.run), digest, tuned)  # written before the check, which may fail
    if args.check_n > 0:
        tuned = _check_tuned(args, tuned, device)
        path = write_grids(run_folder(args.run), digest, tuned)
    used = sum(not g.lost_check for g in tuned)
    print(f"wrote {path}: {len(tuned)} grids for weights {digest} ({calls} calls of {args.n} samples, "
          f"{time.perf_counter() - started:.0f} s); `sculpt sample` and `sculpt eval` use "
          + (f"the {used} that beat the default grid" if args.check_n > 0 else "them"))
    return 0


def _check_tuned(args: argparse.Namespace, tuned: list, device: str) -> list:
    """Score each tuned grid and the default grid at its NFE on the run's data (FD, the run's own features).

    The tuning objective is the distance to the model's own fine ODE solution, and on trained networks a
    coarse default grid can score better on the data than that solution does; the check keeps a user from
    a grid that is closer to the ODE but farther from the data. Same noise for both grids.
    """
    from . import evaluate as ev

    options = dict(metrics=["fid"], n=args.check_n, seed=args.seed + 1, device=device, progress=False,
                   precision="auto")
    checked = []
    try:
        ctx = ev.prepare(args.run, features=args.features, device=device, progress=False)
        for grid in tuned:
            mine = ev.evaluate_run(ctx, sampler=grid.sampler, steps=grid.steps, sigmas=grid.sigmas,
                                   grid_source="tuning", first_step=grid.first_step, **options)
            default = ev.evaluate_run(ctx, sampler=grid.sampler, steps=grid.steps, **options)
            checked.append(_checked(grid, ctx, mine, default, args.check_n))
    except (ValueError, FileNotFoundError) as error:
        print(f"the grids are written unchecked: the check on the data failed ({error}); "
              f"pass --check-n 0 to skip it")
        return tuned
    return checked


def _checked(grid, ctx, mine: dict, default: dict, n: int):
    """The grid with its check: both FDs, and what the default grid was; says the verdict."""
    from dataclasses import replace

    check = {
        "metric": "fid",
        "n": n,
        "extractor": ctx.extractor.name,
        "extractor_weights_sha256": ctx.extractor.weights_hash,
        "reference_key": ctx.reference.key,
        "tuned_fid": float(mine["scores"]["fid"]),
        "default_fid": float(default["scores"]["fid"]),
        "default_grid": default["spacing"],
        "default_first_step": default["first_step"],
    }
    grid = replace(grid, check=check)
    verdict = "not used: the default grid scores better" if grid.lost_check else "used"
    analytic = ", analytic first step" if default["first_step"] == "analytic" else ""
    print(f"check {grid.sampler} NFE {grid.nfe}: FD {check['tuned_fid']:.4g} tuned, {check['default_fid']:.4g} on "
          f"the default grid ({default['spacing']}{analytic}), n = {n}: {verdict}")
    return grid


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


def _add_guidance_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--guidance",
        type=float,
        default=None,
        metavar="W",
        help="guidance weight: D_u + W (D_c - D_u) (classifier-free; 1 = plain conditional, 0 = unconditional)",
    )
    parser.add_argument(
        "--guidance-interval",
        default=None,
        metavar="LO,HI",
        help="guide only for noise levels LO < sigma <= HI, plain conditional elsewhere (Kynkaanniemi et al. 2024)",
    )
    parser.add_argument(
        "--guidance-rescale", type=float, default=None, metavar="PHI", help="CFG rescale on x0 (Lin et al. 2023), 0-1"
    )
    parser.add_argument(
        "--guide",
        default=None,
        metavar="RUN",
        help="autoguidance: guide with a weaker run of the same task (smaller or shorter-trained; Karras et al. 2024)",
    )


def build_parser() -> argparse.ArgumentParser:
    from .objectives import OBJECTIVES
    from .samplers import AUTO, FIRST_STEPS, SAMPLERS
    from .schedules import GRIDS

    parser = argparse.ArgumentParser(prog="sculpt", description="Train, sample and evaluate diffusion models.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser(
        "train",
        help="train a model (default: a small UNet on the built-in 8x8 digits)",
        description="Train a diffusion model. Every config field below can be set with --section.field=value "
        "(or --section.field value); `sculpt config` prints the resolved configuration.",
        usage="sculpt train [--data SPEC] [--net NET] [--steps N] [--out DIR] [--resume] [--config FILE.json] "
        "[--section.field=VALUE ...]",
        allow_abbrev=False,  # --train.st must not silently mean --train.steps
    )
    train.add_argument(
        "--data", default=None, help="data.name: digits | mnist:PATH | cifar10:PATH | FOLDER | FILE.tar | hf:NAME"
    )
    train.add_argument("--net", default=None, help="model.net: a preset from `sculpt nets`")
    train.add_argument("--steps", type=int, default=None, help="train.steps: optimizer steps")
    train.add_argument("--out", default=None, help="the run folder (default runs/digits)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    train.add_argument(
        "--task", default=None, choices=list(OBJECTIVES), help="the objective (default denoising; see sculpt distill)"
    )
    train.add_argument(
        "--latent",
        default=None,
        metavar="AE",
        help="diffuse in the latent space of an autoencoder run folder (--task autoencoder) or diffusers:PATH",
    )
    _add_config_fields(train)
    train.set_defaults(handler=_train)

    distill = commands.add_parser(
        "distill",
        help="a few-step student: consistency tuning (ect) or progressive distillation (pd) of a run, or ict",
        description="Train a student that samples in 1-4 steps. ect and pd start from the teacher RUN's "
        "weights; ict trains a consistency model from scratch (on RUN's data and network when given). "
        "Any config field can be set with --section.field=value (sections ect, ict, pd, train).",
    )
    distill.add_argument(
        "run", nargs="?", default=None, help="the teacher: a run folder written by `sculpt train`, or diffusers:PATH"
    )
    distill.add_argument("--method", required=True, choices=["ect", "ict", "pd"])
    distill.add_argument("--out", required=True, help="the student's run folder")
    distill.add_argument("--steps", type=int, default=None, help="training steps (pd: pd.rounds * pd.round_steps)")
    distill.add_argument("--data", default=None, help="ict without a teacher, or a diffusers teacher: the dataset")
    distill.add_argument("--net", default=None, help="ict without a teacher: the network preset")
    distill.add_argument("--resume", action="store_true", help="continue the student in --out")
    distill.set_defaults(handler=_distill)

    config = commands.add_parser(
        "config",
        help="print the resolved default config (with any overrides)",
        usage="sculpt config [--config FILE.json] [--section.field=VALUE ...]",
        allow_abbrev=False,
    )
    config.add_argument("--data", default=None, help="data.name")
    config.add_argument("--net", default=None, help="model.net")
    config.add_argument("--steps", type=int, default=None, help="train.steps")
    config.add_argument("--out", default=None, help="the run folder")
    _add_config_fields(config)
    config.set_defaults(handler=_config)

    nets = commands.add_parser("nets", help="list network presets and their parameter counts")
    nets.add_argument("--res", type=int, default=32)
    nets.add_argument("--channels", type=int, default=3)
    nets.set_defaults(handler=_nets)

    sample = commands.add_parser("sample", help="draw samples from a trained run")
    sample.add_argument("run", help="run folder written by `sculpt train`, or diffusers:PATH (save_pretrained's)")
    sample.add_argument(
        "--sampler", default=None, choices=[AUTO, *SAMPLERS],
        help="default: the run's own (train.sampler); auto picks the solver by the number of steps"
    )
    sample.add_argument("--steps", type=int, default=None, help="default: the run's own (train.sample_steps)")
    sample.add_argument(
        "--spacing",
        default=None,
        help=f"step grid: {' | '.join(GRIDS)} | tuned (default: a tuned grid, else the run's own; else cosine_uniform)",
    )
    sample.add_argument("-n", type=int, default=64, help="number of samples")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument(
        "--label", type=int, default=None, help="class label (class-conditional runs; default: one row per class)"
    )
    _add_guidance_arguments(sample)
    sample.add_argument(
        "--first-step", default=AUTO, choices=FIRST_STEPS,
        help="auto: the analytic first step (the recorded data moments' Gaussian flow, no network call) where the run "
        "has them and the solver takes it; analytic insists; model always calls the network",
    )
    sample.add_argument("--out", default=None, help="output file (default samples.png / samples.npz)")
    sample.add_argument("--format", default="png", choices=["png", "npz"])
    sample.add_argument("--trajectory", default=None, metavar="PNG", help="also draw the denoising path")
    sample.add_argument("--trajectory-columns", type=int, default=8)
    sample.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA")
    sample.add_argument("--batch-size", type=int, default=256, help="samples drawn at once (memory)")
    sample.add_argument(
        "--precision",
        default="auto",
        choices=PRECISION_CHOICES,
        help="autocast for the network (auto: bf16 on hardware with native bf16, else fp32; sampler state stays fp32)",
    )
    sample.add_argument("--device", default=None)
    sample.set_defaults(handler=_sample)

    evaluate = commands.add_parser(
        "eval",
        help="score a run (or two image sets) with FID, KID, IS, precision/recall, bits/dim",
        description="Sample from a run's EMA model and score it against its dataset, writing every setting "
        "beside every number (eval.json).",
    )
    evaluate.add_argument(
        "run", nargs="?", default=None, help="run folder written by `sculpt train`, or diffusers:PATH"
    )
    evaluate.add_argument("--metrics", default="fid,kid,pr", help="comma list of fid,kid,is,pr,fid_inf,bpd")
    evaluate.add_argument("-n", "--n", type=int, default=10_000, help="samples to draw")
    evaluate.add_argument(
        "--sampler", default=None, choices=[AUTO, *SAMPLERS],
        help="default: the run's own (train.sampler); auto picks the solver by the number of steps"
    )
    evaluate.add_argument("--steps", type=int, default=None, help="default: the run's own (train.sample_steps)")
    evaluate.add_argument(
        "--spacing",
        default=None,
        help=f"step grid: {' | '.join(GRIDS)} | tuned (default: a tuned grid, else the run's own; else cosine_uniform)",
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
        help="steps=5,10,20 and/or sampler=ddim,heun: a quality-vs-NFE table and plot; "
        "guidance=0,1,2,4: quality against the guidance weight",
    )
    _add_guidance_arguments(evaluate)
    evaluate.add_argument(
        "--first-step", default=AUTO, choices=FIRST_STEPS,
        help="auto: the analytic first step (the recorded data moments' Gaussian flow, no network call) where the run "
        "has them and the solver takes it; analytic insists; model always calls the network",
    )
    evaluate.add_argument("--plot", default=None, help="sweep plot path (default RUN/eval_sweep.png)")
    evaluate.add_argument(
        "--data", default=None, help="reference dataset (default: the run's own; needed for diffusers:PATH)"
    )
    evaluate.add_argument("--real", default=None, help="a dataset spec, folder or .npz of real images")
    evaluate.add_argument("--fake", default=None, help="a folder or .npz of generated images")
    evaluate.add_argument("--out", default=None, help="where to write the record (default RUN/eval.json)")
    evaluate.add_argument("--device", default=None)
    evaluate.add_argument(
        "--precision",
        default="auto",
        choices=PRECISION_CHOICES,
        help="autocast for sampling (auto: bf16 on hardware with native bf16, else fp32; recorded resolved)",
    )
    evaluate.set_defaults(handler=_eval)

    export = commands.add_parser(
        "export",
        help="write a run in another library's format (diffusers: a DDPMPipeline folder)",
        description="Write a run's EMA weights as a diffusers DDPMPipeline folder (unet/ with UNet2DModel weights, "
        "scheduler/ with a DDPMScheduler meaning the same schedule and target). Needs pip install sculpt[diffusers].",
    )
    export.add_argument("run", help="run folder written by `sculpt train`")
    export.add_argument("--format", default="diffusers", choices=["diffusers"])
    export.add_argument("--out", required=True, help="the folder to write (must not exist or be empty)")
    export.add_argument("--raw", action="store_true", help="export the raw weights instead of the EMA")
    export.set_defaults(handler=_export)

    tune = commands.add_parser(
        "tune",
        help="tune step grids to a run's model for few-step sampling (writes RUN/grids.json)",
        description="Find the noise levels at which a sampler should call this model, for each NFE: a fine "
        "reference solve, dynamic programming over candidate levels (GITS), then a local search scored by the "
        "sampler itself. `sculpt sample` and `sculpt eval` then use the grids automatically.",
    )
    tune.add_argument("run", help="run folder written by `sculpt train`")
    tune.add_argument("--nfe", default="3,4,5,6,8,10", help="comma list of NFE budgets (denoiser calls per sample)")
    tune.add_argument("--sampler", default=None, help="comma list of samplers (default: the run's own)")
    tune.add_argument("-n", "--n", type=int, default=256, help="noise samples to tune on (as many again to check)")
    tune.add_argument("--candidates", type=int, default=48, help="candidate noise levels for the DP")
    tune.add_argument("--seed", type=int, default=0)
    tune.add_argument("--device", default=None)
    tune.add_argument(
        "--check-n", type=int, default=500,
        help="samples per grid for the check on the run's data: each tuned grid's FD against the default grid's "
        "at the same NFE; sample and eval skip a grid that lost (0: no check)",
    )
    tune.add_argument("--features", default=None, help="extractor for the check (default: the run's own classifier)")
    tune.set_defaults(handler=_tune)

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
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError, ImportError) as error:
        print(f"sculpt {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
