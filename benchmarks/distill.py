"""Few-step students against their teacher: ECT, iCT and progressive distillation at 1, 2 and 4 steps.

For each dataset (scikit-learn's 8x8 digits, ``../shared/data/mnist-5k`` at 28x28):

1. **The teacher** is ``sculpt train`` with the default config (unet-tiny, cosine, v-prediction,
   min-SNR), trained for ``--teacher-steps``. It is sampled at NFE 1, 2, 4, 8 and 35 with the best
   of several samplers and grids at each NFE (ddim / dpmpp_2m / unipc on trailing, few_step and
   logsnr grids; heun with karras where the NFE is odd).
2. **The students**, each ``sculpt distill`` with the method's defaults:
   - ``ect``: consistency tuning from the teacher's weights (``--ect-steps``);
   - ``pd``: progressive distillation from the teacher, 32 -> 1 steps in 5 rounds (``--pd-round-steps``
     each); the checkpoint at the end of each round is that round's student, so the 4-, 2- and 1-step
     students are all scored on the grids they were made for;
   - ``ict``: consistency training from scratch on the same data and network (``--ict-steps``).
   Each student's training cost is printed: CPU minutes (process time, all threads) and images seen.
3. **Scores**: the Frechet distance in the 128-d features of a domain classifier
   (``sculpt.metrics.features.train_classifier``, fitted once on the train split; its test accuracy
   is printed) between n samples and n test images (digits: all 297; MNIST: ``-n``), the mean over
   ``--sets`` disjoint sets of samples, with the real-vs-real floor (n random training images
   against the same test images).

Every comparison is one line ending in the ratio (student FD / teacher FD at 35 NFE); the goals of
issue 10 are printed beside them. A plot (FD against NFE, teacher curve and student points) and
sample grids go to benchmarks/out/distill/.

    python benchmarks/distill.py --datasets digits                 # about 25 minutes on 2 CPU cores
    python benchmarks/distill.py --datasets mnist --teacher-steps 1500 --ect-steps 1200 ...
    python benchmarks/distill.py --quick                           # a smoke run (minutes)

``--reuse`` keeps run folders that already exist (re-score without retraining).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from sculpt.config import Config, override
from sculpt.data import load_dataset
from sculpt.images import save_grid
from sculpt.metrics import frechet_distance
from sculpt.metrics.features import train_classifier
from sculpt.plots import _pyplot, save_figure
from sculpt.run import build_denoiser, complete_checkpoints, load, student_config
from sculpt.samplers import NFE, generate
from sculpt.train import train

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "out" / "distill"
MNIST = ROOT.parent.parent / "shared" / "data" / "mnist-5k"
SPECS = {"digits": "digits", "mnist": f"mnist:{MNIST}"}
TEACHER_NFE = (1, 2, 4, 8, 35)
STUDENT_STEPS = (1, 2, 4)
#: (sampler, spacing) tried for the teacher at each NFE; heun only where NFE = 2 steps - 1.
TEACHER_SAMPLERS = [
    ("ddim", "trailing"),
    ("dpmpp_2m", "trailing"),
    ("dpmpp_2m", "few_step"),
    ("dpmpp_2m", "logsnr"),
    ("unipc", "few_step"),
    ("unipc", "logsnr"),
    ("heun", "karras"),
]


def timed_train(config: Config, reuse: bool) -> tuple[Path, float]:
    """Train (or reuse) a run; returns its folder and the CPU minutes it took (all threads)."""
    out = Path(config.out)
    cost_file = out / "cpu_minutes.json"
    if reuse and (out / "ema.safetensors").is_file() and cost_file.is_file():
        return out, json.loads(cost_file.read_text())["cpu_minutes"]
    if out.exists():
        import shutil

        shutil.rmtree(out)
    cpu = time.process_time()
    train(config, progress=True)
    minutes = (time.process_time() - cpu) / 60
    cost_file.write_text(json.dumps({"cpu_minutes": minutes}))
    return out, minutes


def score(D, config, n: int, sets: int, sampler: str, steps: int, spacing: str | None, extractor, reference):
    """Mean FD of `sets` disjoint sets of n samples against the reference features, and the samples."""
    shape = (config.data.channels, config.data.resolution, config.data.resolution)
    images = generate(D, shape, n * sets, sampler=sampler, steps=steps, spacing=spacing, seed=0, progress=False)
    feats = extractor.features(images, progress=False)
    return float(np.mean([frechet_distance(feats[i * n : (i + 1) * n], reference) for i in range(sets)])), images


def round_students(run: Path) -> dict[int, torch.nn.Module]:
    """PD: the EMA at the end of each round (its checkpoint) is that round's student, by its steps."""
    D, config = load(run)
    students = {}
    for checkpoint in complete_checkpoints(run):
        step = int(checkpoint.name.split("_")[1])
        if step % config.pd.round_steps:
            continue
        finished_round = step // config.pd.round_steps - 1
        steps = config.pd.start_steps // 2 ** (finished_round + 1)
        model = build_denoiser(config)
        model.net.load_state_dict(load_file(str(checkpoint / "ema.safetensors")))
        students[steps] = model.eval()
    return students


def benchmark(name: str, args: argparse.Namespace) -> list[str]:
    spec = SPECS[name]
    out = OUT / name
    out.mkdir(parents=True, exist_ok=True)
    train_set, test_set = load_dataset(spec), load_dataset(spec, split="test")
    extractor, accuracy = train_classifier(train_set, test_dataset=test_set, progress=False)
    n = min(args.n, len(test_set))
    # Fixed random subsets: IDX files can be sorted by label (mnist-5k's train and test splits are).
    test_subset = torch.randperm(len(test_set), generator=torch.Generator().manual_seed(0))[:n]
    reference = extractor.features(test_set.images()[test_subset], progress=False)
    subset = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(0))[:n]
    floor = frechet_distance(extractor.features(train_set.images()[subset], progress=False), reference)
    lines = [
        f"{name}: classifier test accuracy {accuracy:.4f}; FD of {args.sets} sets of n = {n} against the test "
        f"images (mean); real-vs-real floor (n training images) FD {floor:.2f}"
    ]
    print(lines[-1], flush=True)

    # -- the teacher -------------------------------------------------------------------------
    base = override(Config(), {"data.name": spec, "train.sample_every": "0", "out": str(out / "teacher")})
    teacher_config = replace(base, train=replace(base.train, steps=args.teacher_steps))
    teacher, teacher_minutes = timed_train(teacher_config, args.reuse)
    D, config = load(teacher)
    teacher_fd = {}
    for nfe in TEACHER_NFE:
        best = None
        for sampler, spacing in args.teacher_samplers:
            steps = (nfe + 1) // 2 if sampler == "heun" else nfe
            if NFE[sampler](steps) != nfe or (sampler == "heun" and nfe < 3):
                continue
            fd, images = score(D, config, n, args.sets, sampler, steps, spacing, extractor, reference)
            if best is None or fd < best[0]:
                best = (fd, f"{sampler} {spacing} {steps} steps", images)
        teacher_fd[nfe] = best[:2]
        save_grid(out / f"teacher_nfe{nfe}.png", best[2][:64], scale=max(1, 64 // config.data.resolution))
        lines.append(f"{name} teacher NFE {nfe:>2d}: FD {best[0]:.2f} ({best[1]})")
        print(lines[-1], flush=True)
    reference_fd = teacher_fd[35][0]
    lines.append(f"{name} teacher: {teacher_minutes:.1f} CPU min, {args.teacher_steps * 128:,d} images seen")

    # -- the students --------------------------------------------------------------------------
    plan = {
        "ect": ({"train.checkpoint_every": "0", "ect.stage_steps": str(args.ect_stage_steps)}, args.ect_steps),
        "pd": (
            {
                "pd.start_steps": "32",
                "pd.rounds": "5",
                "pd.round_steps": str(args.pd_round_steps),
                "train.checkpoint_every": str(args.pd_round_steps),
                "train.keep_checkpoints": "6",
            },
            5 * args.pd_round_steps,
        ),
        "ict": ({"train.checkpoint_every": "0"}, args.ict_steps),
    }
    results: dict[str, dict[int, float]] = {}
    for method in args.methods:
        overrides, steps = plan[method]
        overrides = {**overrides, "train.sample_every": "0"}
        source = teacher if method != "ict" else None
        if method == "ict":
            overrides = {**overrides, "data.name": spec}
        config_s = student_config(method, teacher=source, out=str(out / method), steps=steps, overrides=overrides)
        run, minutes = timed_train(config_s, args.reuse)
        S, student_cfg = load(run)
        models = round_students(run) if method == "pd" else {k: S for k in STUDENT_STEPS}
        results[method] = {}
        cost = f"{minutes:.1f} CPU min, {steps * student_cfg.train.batch_size:,d} images seen"
        for k in STUDENT_STEPS:
            if k not in models:
                continue
            spacing = student_cfg.train.sample_spacing or None
            fd, images = score(
                models[k], student_cfg, n, args.sets, student_cfg.train.sampler, k, spacing, extractor, reference
            )
            results[method][k] = fd
            save_grid(out / f"{method}_{k}step.png", images[:64], scale=max(1, 64 // config.data.resolution))
            same_nfe = teacher_fd[k][0]
            lines.append(
                f"{name} {method} {k}-step: FD {fd:.2f}, teacher at NFE {k} {same_nfe:.2f} "
                f"({same_nfe / fd:.2f}x better than the teacher at equal NFE), teacher at NFE 35 "
                f"{reference_fd:.2f}, {fd / reference_fd:.2f}x; {cost}"
            )
            print(lines[-1], flush=True)
    if "ect" in results and 2 in results["ect"]:
        two = results["ect"][2] / reference_fd
        one = min(r[1] for r in results.values() if 1 in r) / reference_fd
        lines.append(
            f"{name} goals: ECT 2-step within 1.5x of the teacher at 35 NFE: {two:.2f}x "
            f"({'met' if two <= 1.5 else 'not met'}); best 1-step student within 3x: {one:.2f}x "
            f"({'met' if one <= 3 else 'not met'})"
        )
        print(lines[-1], flush=True)
    plot(out / "fd_vs_nfe.png", name, teacher_fd, results, floor)
    return lines


def plot(path: Path, name: str, teacher_fd: dict, results: dict, floor: float) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    nfes = sorted(teacher_fd)
    ax.plot(nfes, [teacher_fd[k][0] for k in nfes], "o-", color="k", label="teacher (best sampler)")
    for method, scores in results.items():
        steps = sorted(scores)
        ax.plot(steps, [scores[k] for k in steps], "s--", label=f"{method} student")
    ax.axhline(floor, color="grey", ls=":", label="real-vs-real floor")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="NFE (network evaluations per sample)",
        ylabel="FD (classifier)",
        title=f"{name}: few-step students against their teacher",
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", default="digits", help="comma list of digits, mnist")
    parser.add_argument("--methods", default="ect,pd,ict")
    parser.add_argument("--teacher-steps", type=int, default=3000)
    parser.add_argument("--ect-steps", type=int, default=2000)
    parser.add_argument("--ect-stage-steps", type=int, default=400, help="steps per stage of ECT's curriculum")
    parser.add_argument("--pd-round-steps", type=int, default=400)
    parser.add_argument("--ict-steps", type=int, default=3000)
    parser.add_argument("-n", type=int, default=1000, help="samples per score (capped at the test split)")
    parser.add_argument("--sets", type=int, default=3, help="disjoint sample sets per score (their mean FD)")
    parser.add_argument("--reuse", action="store_true", help="keep run folders that exist")
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny step counts, n = 200")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument(
        "--teacher-samplers",
        default=",".join(f"{a}:{b}" for a, b in TEACHER_SAMPLERS),
        help="sampler:spacing pairs the teacher's best is chosen from at each NFE",
    )
    args = parser.parse_args()
    args.teacher_samplers = [tuple(pair.split(":")) for pair in args.teacher_samplers.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    args.methods = args.methods.split(",")
    if args.quick:
        args.teacher_steps, args.ect_steps, args.pd_round_steps, args.ict_steps, args.n = 200, 100, 20, 100, 200
        args.ect_stage_steps = 25
    lines = []
    for name in args.datasets.split(","):
        lines += benchmark(name, args)
    print("\n".join(["", *lines]))
    (OUT / "results.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
