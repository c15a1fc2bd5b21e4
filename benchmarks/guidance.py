"""Guidance on class-conditional digits and MNIST: full-range CFG, the guidance interval, autoguidance.

For each dataset (scikit-learn's 8x8 digits; ``../shared/data/mnist-5k``, by default reduced to 14x14):

1. **The model**: ``sculpt train --model.class_cond=true`` (unet-tiny, cosine, v-prediction, min-SNR,
   label dropout 0.1), with a checkpoint every ``steps // 8``: digits 1500 steps x 64, n = 1000
   samples per setting; MNIST reduced to fit a few CPU minutes: 14x14, 800 steps x 32, n = 500.
2. **The guides** for autoguidance (Karras et al. 2024), both class-conditional:
   - ``early``: the same run's EMA at 1/8 of its training (its checkpoint);
   - ``small``: unet-tiny at a quarter of the width (base_channels 8 instead of 32), trained for 1/4
     as many steps.
3. **Sampling**: dpmpp_2m with ``--sample-steps`` steps on the schedule's own grid, n samples with
   exact class balance (labels cycling through the classes), the same seed for every setting.
   - classifier-free guidance (CFG) over the whole range, w in ``--weights`` (w = 0 is the
     unconditional model, w = 1 the plain conditional one);
   - CFG only for sigma in (lo, hi] (Kynkäänniemi et al. 2024) for each of ``--intervals``;
   - autoguidance with each guide;
   - beside sculpt's CFG, the same guidance by diffusers' ``ClassifierFreeGuidance`` guider, which
     combines the noise predictions (eps): identical in exact arithmetic (x0 and eps are affine in one
     another at fixed x and sigma), so the two FDs should agree to rounding; and CFG rescale on x0
     (sculpt, as Lin et al. 2023) against diffusers' ``guidance_rescale`` on eps, at CFG's best weight.
4. **Scores** in the 128-d features of a domain classifier fitted on the train split (500 steps;
   its test accuracy is printed): FD and precision / recall (k = 3) of the n samples against the
   whole train split, and the requested-class accuracy (the classifier's argmax against the label
   each sample was drawn for). The cost is the network evaluations per sample, counted
   (``sculpt.guidance.CountEvaluations``); a guide's are weighed by its share of the model's
   parameters.

Every comparison is one line ending in a ratio (FD / reference FD: below 1 is better); the goals of
issue 12 are printed at the end. Plots (FD and class accuracy against w) and sample grids (one row
per class) go to benchmarks/out/guidance/.

    python benchmarks/guidance.py                       # digits and reduced MNIST
    python benchmarks/guidance.py --datasets digits
    python benchmarks/guidance.py --datasets mnist --mnist-resolution 0 --mnist-steps 3000   # full size, patient
    python benchmarks/guidance.py --quick               # a smoke run
    python benchmarks/guidance.py --reuse               # keep trained runs, re-score
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import torch

from sculpt.config import Config, override
from sculpt.data import load_dataset
from sculpt.guidance import CountEvaluations, Guided
from sculpt.images import save_grid
from sculpt.metrics import frechet_distance
from sculpt.metrics.features import train_classifier
from sculpt.metrics.stats import precision_recall
from sculpt.plots import _pyplot, save_figure
from sculpt.run import complete_checkpoints, load
from sculpt.samplers import class_rows, generate
from sculpt.train import train

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "out" / "guidance"
# ../shared/data/mnist-5k beside the repository (or beside the folder holding a worktree of it)
MNIST = (
    next(
        (p for p in (ROOT.parents[1] / "shared", ROOT.parents[2] / "shared") if (p / "data" / "mnist-5k").is_dir()),
        ROOT.parents[1] / "shared",
    )
    / "data"
    / "mnist-5k"
)
SPECS = {"digits": "digits", "mnist": f"mnist:{MNIST}"}


def timed_train(overrides: dict[str, str], out: Path, reuse: bool) -> tuple[Path, float]:
    """Train (or reuse) a run; its folder and the CPU minutes it took (process time, all threads)."""
    cost_file = out / "cpu_minutes.json"
    if reuse and (out / "ema.safetensors").is_file() and cost_file.is_file():
        return out, json.loads(cost_file.read_text())["cpu_minutes"]
    shutil.rmtree(out, ignore_errors=True)
    cpu = time.process_time()
    train(override(Config(), {**overrides, "out": str(out)}), progress=True)
    minutes = (time.process_time() - cpu) / 60
    cost_file.write_text(json.dumps({"cpu_minutes": minutes}))
    return out, minutes


class DiffusersCFG(torch.nn.Module):
    """diffusers' ClassifierFreeGuidance guider on the eps predictions of a sculpt denoiser (the peer)."""

    def __init__(self, D, weight: float, null: int, rescale: float = 0.0) -> None:
        super().__init__()
        from diffusers.guiders import ClassifierFreeGuidance

        self.D, self.null, self.schedule = D, null, D.schedule
        self.guider = ClassifierFreeGuidance(guidance_scale=weight, guidance_rescale=rescale)

    def forward(self, x, sigma, class_labels):
        both = self.D(
            torch.cat([x, x]),
            torch.cat([sigma, sigma]),
            class_labels=torch.cat([class_labels, torch.full_like(class_labels, self.null)]),
        )
        s = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x)
        eps_cond, eps_uncond = ((x - x0) / s for x0 in both.chunk(2))
        eps = self.guider.forward(eps_cond, eps_uncond).pred
        return x - s * eps


def wrapper(w: float, num_classes: int, *, interval=None, guide=None, rescale: float = 0.0, peer: bool = False):
    """D -> the guided denoiser of one setting (sculpt's Guided, or the diffusers guider with ``peer``)."""
    if peer:
        return lambda D: DiffusersCFG(D, w, num_classes, rescale=rescale)
    if guide is not None:
        return lambda D: Guided(D, w, guide=guide, interval=interval, rescale=rescale)
    return lambda D: Guided(D, w, null_cond={"class_labels": num_classes}, interval=interval, rescale=rescale)


def benchmark(name: str, args: argparse.Namespace) -> tuple[list[str], dict]:
    spec = SPECS[name]
    out = OUT / name
    out.mkdir(parents=True, exist_ok=True)
    resolution = args.mnist_resolution if name == "mnist" else None
    data = {"data.name": spec, **({"data.resolution": str(resolution)} if resolution else {})}
    train_set = load_dataset(spec, resolution=resolution)
    test_set = load_dataset(spec, resolution=resolution, split="test")
    extractor, accuracy = train_classifier(train_set, test_dataset=test_set, progress=False)
    reference = extractor.features(train_set.images, progress=False)
    K = train_set.num_classes
    steps, batch, n = (
        (args.steps, args.batch, args.n) if name == "digits" else (args.mnist_steps, args.mnist_batch, args.mnist_n)
    )
    lines = [
        f"{name} ({train_set.images.shape[-1]}x{train_set.images.shape[-1]}): classifier test accuracy "
        f"{accuracy:.4f}; FD / precision / recall of n = {n} samples against the {len(train_set)} "
        f"training images; dpmpp_2m, {args.sample_steps} steps"
    ]
    print(lines[-1], flush=True)

    # -- the model and its guides ------------------------------------------------------------
    common = {**data, "model.class_cond": "true", "train.sample_every": "0", "train.batch_size": str(batch)}
    model_run, model_minutes = timed_train(
        {**common, "train.steps": str(steps), "train.checkpoint_every": str(steps // 8), "train.keep_checkpoints": "9"},
        out / "model",
        args.reuse,
    )
    small_run, small_minutes = timed_train(
        {
            **common,
            "train.steps": str(steps // 4),
            "train.checkpoint_every": "0",
            "model.net_options": '{"base_channels": 8}',
        },
        out / "small",
        args.reuse,
    )
    early_run = complete_checkpoints(model_run)[0]  # step steps // 8
    D, config = load(model_run)
    guides = {"early": load(early_run)[0], "small": load(small_run)[0]}
    params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    share = {key: params(g) / params(D) for key, g in guides.items()}
    lines.append(
        f"{name} model: {params(D):,d} parameters, {steps} steps x {batch}, {model_minutes:.1f} CPU min; "
        f"guides: early = its checkpoint at step {early_run.name.split('_')[1].lstrip('0')}; "
        f"small = {params(guides['small']):,d} parameters ({share['small']:.2f}x), {steps // 4} steps, "
        f"{small_minutes:.1f} CPU min"
    )
    print(lines[-1], flush=True)

    shape = (config.data.channels, config.data.resolution, config.data.resolution)
    labels = torch.arange(n) % K

    def evaluate(make, label: str, w: float) -> dict:
        counted = CountEvaluations(D)
        guide = None
        wrapped = make(counted)
        if isinstance(wrapped, Guided) and wrapped.guide is not None:
            wrapped.guide = guide = CountEvaluations(wrapped.guide)
        images = generate(
            wrapped,
            shape,
            n,
            sampler="dpmpp_2m",
            steps=args.sample_steps,
            seed=0,
            num_classes=K,
            labels=labels,
            progress=False,
        )
        feats, probs = extractor.extract(images, progress=False, probs=True)
        precision, recall = precision_recall(reference, feats, k=3)
        evaluations = counted.rows / n
        guide_evaluations = guide.rows / n if guide is not None else 0.0
        result = {
            "label": label,
            "fd": frechet_distance(reference, feats),
            "precision": precision,
            "recall": recall,
            "class_accuracy": float((probs.argmax(axis=1) == labels.numpy()).mean()),
            "nfe": evaluations,
            "guide_nfe": guide_evaluations,
            "w": w,
            "make": make,
        }
        print(
            f"  {label:<40s} FD {result['fd']:7.2f}  P {precision:.3f}  R {recall:.3f}  "
            f"acc {result['class_accuracy']:.3f}  NFE {evaluations:.0f}"
            + (f" + guide {guide_evaluations:.0f}" if guide is not None else ""),
            flush=True,
        )
        return result

    results: dict[str, list[dict]] = {"cfg": [], "diffusers cfg": []}
    for w in args.weights:
        results["cfg"].append(evaluate(wrapper(w, K), f"cfg w={w:g}", w))
    for lo, hi in args.intervals:
        key = f"interval ({lo:g}, {hi:g}]"
        results[key] = [evaluate(wrapper(w, K, interval=(lo, hi)), f"{key} w={w:g}", w) for w in args.guided_weights]
    for guide_name, guide in guides.items():
        key = f"autoguidance ({guide_name})"
        results[key] = [evaluate(wrapper(w, K, guide=guide), f"{key} w={w:g}", w) for w in args.guided_weights]
    for w in args.peer_weights:
        results["diffusers cfg"].append(evaluate(wrapper(w, K, peer=True), f"diffusers cfg (eps) w={w:g}", w))

    # -- comparisons ---------------------------------------------------------------------------
    best = lambda rows: min(rows, key=lambda r: r["fd"])  # noqa: E731
    conditional = next(r for r in results["cfg"] if r["w"] == 1)
    unconditional = next(r for r in results["cfg"] if r["w"] == 0)
    cfg = best([r for r in results["cfg"] if r["w"] > 1])

    def cost(r, guide_share: float = 1.0) -> str:
        total = r["nfe"] + r["guide_nfe"] * guide_share
        return f"{total:.1f} NFE" + (f" ({r['nfe']:.0f} + {r['guide_nfe']:.0f} guide)" if r["guide_nfe"] else "")

    lines.append(
        f"{name} unguided: unconditional (w=0) FD {unconditional['fd']:.2f}, conditional (w=1) FD "
        f"{conditional['fd']:.2f} (class accuracy {unconditional['class_accuracy']:.3f} -> "
        f"{conditional['class_accuracy']:.3f}), {conditional['nfe']:.0f} NFE"
    )
    lines.append(
        f"{name} best CFG (w={cfg['w']:g}): FD {cfg['fd']:.2f}, P {cfg['precision']:.3f} R {cfg['recall']:.3f}, "
        f"{cost(cfg)}; conditional {conditional['fd']:.2f}: {cfg['fd'] / conditional['fd']:.2f}x"
    )
    challengers = {}
    for key in results:
        if key.startswith(("interval", "autoguidance")):
            r = best(results[key])
            guide_share = share[key.split("(")[1].rstrip(")")] if key.startswith("autoguidance") else 1.0
            challengers[key] = r
            lines.append(
                f"{name} {key} best (w={r['w']:g}): FD {r['fd']:.2f}, P {r['precision']:.3f} R {r['recall']:.3f}, "
                f"acc {r['class_accuracy']:.3f}, {cost(r, guide_share)}; best CFG {cfg['fd']:.2f}: "
                f"{r['fd'] / cfg['fd']:.2f}x"
            )
    for theirs in results["diffusers cfg"]:
        mine = next(r for r in results["cfg"] if r["w"] == theirs["w"])
        lines.append(
            f"{name} CFG w={mine['w']:g}: sculpt (x0) FD {mine['fd']:.3f}, diffusers ClassifierFreeGuidance "
            f"(eps) FD {theirs['fd']:.3f}, {mine['fd'] / theirs['fd']:.4f}x"
        )
    ours = evaluate(wrapper(cfg["w"], K, rescale=args.rescale), "cfg rescale on x0", cfg["w"])
    theirs = evaluate(wrapper(cfg["w"], K, rescale=args.rescale, peer=True), "cfg rescale on eps (diffusers)", cfg["w"])
    lines.append(
        f"{name} CFG w={cfg['w']:g} rescale {args.rescale:g}: sculpt on x0 FD {ours['fd']:.2f} "
        f"(acc {ours['class_accuracy']:.3f}), diffusers guidance_rescale on eps FD {theirs['fd']:.2f} "
        f"(acc {theirs['class_accuracy']:.3f}), {ours['fd'] / theirs['fd']:.2f}x"
    )
    accuracies = [r["class_accuracy"] for r in sorted(results["cfg"], key=lambda r: r["w"])]
    lines.append(
        f"{name} CFG requested-class accuracy at w = {', '.join(f'{w:g}' for w in sorted(args.weights))}: "
        + ", ".join(f"{a:.3f}" for a in accuracies)
    )
    best_challenger = min(challengers.values(), key=lambda r: r["fd"])
    goals = {
        "guided beats conditional": min(cfg["fd"], best_challenger["fd"]) < conditional["fd"],
        "interval or autoguidance beats CFG": best_challenger["fd"] < cfg["fd"],
        "accuracy rises with w": all(b >= a for a, b in zip(accuracies, accuracies[1:], strict=False))
        and accuracies[-1] > accuracies[0],
    }
    for goal, met in goals.items():
        lines.append(f"{name} goal: {goal}: {'met' if met else 'NOT met'}")

    # -- pictures ------------------------------------------------------------------------------
    grid_labels = class_rows(K, 8 * K)
    for key, r in [("conditional", conditional), ("cfg", cfg), *challengers.items()]:
        images = generate(
            r["make"](D),
            shape,
            len(grid_labels),
            sampler="dpmpp_2m",
            steps=args.sample_steps,
            seed=1,
            num_classes=K,
            labels=grid_labels,
            progress=False,
        )
        file = "".join(c if c.isalnum() or c in ".-" else "_" for c in key).strip("_")
        save_grid(out / f"{file}_w{r['w']:g}.png", images, nrow=8, scale=max(1, 64 // config.data.resolution))
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, rows in results.items():
        if key == "diffusers cfg" or not rows:
            continue
        rows = sorted(rows, key=lambda r: r["w"])
        left.plot([r["w"] for r in rows], [r["fd"] for r in rows], "o-", label=key)
        right.plot([r["w"] for r in rows], [r["class_accuracy"] for r in rows], "o-", label=key)
    left.set(xlabel="guidance weight w", ylabel="FD (classifier features)", yscale="log", title=f"{name}: FD")
    right.set(xlabel="guidance weight w", ylabel="requested-class accuracy", title=f"{name}: class accuracy")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, out / "guidance.png")
    table = {k: [{f: v for f, v in r.items() if f != "make"} for r in rows] for k, rows in results.items()}
    (out / "results.json").write_text(json.dumps(table, indent=1))
    return lines, table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", default="digits,mnist")
    parser.add_argument("--steps", type=int, default=1500, help="digits: training steps of the model")
    parser.add_argument("--mnist-steps", type=int, default=800)
    parser.add_argument("--mnist-batch", type=int, default=32)
    parser.add_argument("--mnist-n", type=int, default=500, help="MNIST: samples per setting")
    parser.add_argument("--mnist-resolution", type=int, default=14, help="MNIST downsampled (0: the full 28x28)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--n", type=int, default=1000, help="samples per setting")
    parser.add_argument("--sample-steps", type=int, default=16)
    parser.add_argument("--weights", default="0,1,1.1,1.25,1.5,2,3,4", help="CFG's weights")
    parser.add_argument("--guided-weights", default="1.25,1.5,2,3", help="the interval's and autoguidance's")
    parser.add_argument("--peer-weights", default="1.5,3", help="diffusers' CFG guider beside sculpt's")
    parser.add_argument("--intervals", default="0.3:5,0.5:20", help="LO:HI pairs, comma-separated")
    parser.add_argument("--rescale", type=float, default=0.7)
    parser.add_argument("--reuse", action="store_true")
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny training, n = 200")
    args = parser.parse_args()
    args.weights = [float(w) for w in args.weights.split(",")]
    args.guided_weights = [float(w) for w in args.guided_weights.split(",")]
    args.peer_weights = [float(w) for w in args.peer_weights.split(",")]
    args.intervals = [tuple(float(v) for v in pair.split(":")) for pair in args.intervals.split(",")]
    args.mnist_resolution = args.mnist_resolution or None
    if args.quick:
        args.steps, args.mnist_steps, args.n, args.mnist_n, args.sample_steps = 80, 80, 200, 200, 8
        global OUT
        OUT = OUT.parent / "guidance_quick"
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    all_lines = []
    for name in args.datasets.split(","):
        lines, _ = benchmark(name, args)
        all_lines += lines
    print("\n".join(["", "== summary =="] + all_lines))
    (OUT / "summary.txt").write_text("\n".join(all_lines) + "\n")


if __name__ == "__main__":
    main()
