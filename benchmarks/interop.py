"""diffusers' own model, sampled by diffusers and by sculpt: FD at NFE 5, 10 and 20 (issue 15).

1. **The model** is a diffusers ``UNet2DModel`` trained here with diffusers' own recipe (their
   ``train_unconditional.py`` example, scaled to 8x8): ``DDPMScheduler`` (linear betas, 1000
   steps, epsilon, its default ``clip_sample=True``), ``add_noise`` + MSE on eps, AdamW with
   betas (0.95, 0.999) and weight decay 1e-6, cosine learning rate with warmup, ``EMAModel``
   with its warmup (power 3/4). The learning rate is 1e-3, not the example's 1e-4 for 64x64
   networks trained for days: at this size and a few CPU minutes 1e-4 leaves it undertrained.
   Data: scikit-learn's 8x8 digits (train split). Saved with ``DDPMPipeline.save_pretrained``.
2. **diffusers** samples it in its pipelines' loop with each scheduler built the way its users
   swap schedulers, ``Cls.from_config(pipe.scheduler.config, **options)`` (DDIM, DDPM, Euler,
   DPM-Solver++ 2M / 3M, UniPC bh2 order 3, DEIS, over the spacings and Karras sigmas each
   offers); the best at each NFE is its "best scheduler configuration". Only DDPM and DDIM
   read ``clip_sample``; the others never clamp x0.
3. **sculpt** samples the same weights through ``diffusers:PATH`` (``sculpt.run.load``), with its
   defaults (the run's sampler, dpmpp_2m, on the scheduler's ``timestep_spacing`` grid, x0 clipped
   as ``clip_sample`` says; also without the clamp, to show what it is worth), the best of a few
   of its samplers and grids, and at NFE 5 and 10 a grid tuned for the model (``sculpt.tune_grid``
   for dpmpp_2m and unipc, two shared reference solves of ``--tune-n`` samples, where this
   sculpt has it; otherwise "tuned: not available").

FD: Frechet distance in the 128-d features of a domain classifier
(``sculpt.metrics.features.train_classifier``, fitted on the train split) between n samples and
the n = 297 test digits, the mean over ``--sets`` disjoint sets, beside the real-vs-real floor.
One line per comparison, ending in the ratio (diffusers' FD / sculpt's). The goal: sculpt at
NFE 5 as close to the data as diffusers at NFE 10. Outputs in benchmarks/out/interop/.

    OMP_NUM_THREADS=1 python benchmarks/interop.py              # about 12 CPU minutes on 2 cores
    python benchmarks/interop.py --reuse                        # keep the trained model
    python benchmarks/interop.py --quick                        # a smoke run
"""

from __future__ import annotations

import argparse
import inspect
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from sculpt.data import load_dataset
from sculpt.images import save_grid
from sculpt.interop import from_diffusers
from sculpt.metrics import frechet_distance
from sculpt.metrics.features import train_classifier
from sculpt.plots import _pyplot, save_figure
from sculpt.run import load
from sculpt.samplers import sample

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "out" / "interop"
NFES = (5, 10, 20)
#: sculpt's samplers and grids tried for its "best" line.
SCULPT_CANDIDATES = [(s, g) for s in ("dpmpp_2m", "unipc") for g in ("trailing", "few_step", "logsnr")] + [
    ("ddpm", "trailing"),
    ("dpmpp_2m_sde", "few_step"),
]
#: Samplers a grid is tuned for, and at which NFE (the goal's).
TUNED_SAMPLERS = ("dpmpp_2m", "unipc")
TUNED_NFES = (5, 10)


# -- the model, diffusers' recipe -----------------------------------------------------------


def train_model(folder: Path, steps: int, batch_size: int, lr: float, seed: int) -> float:
    """Train a UNet2DModel on the digits as diffusers' train_unconditional example does; CPU minutes."""
    import torch.nn.functional as F
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    images = load_dataset("digits").images()  # [-1, 1], [N, 1, 8, 8]
    unet = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    )
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    lr_schedule = get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=min(200, steps // 10),
                                num_training_steps=steps)
    ema = EMAModel(unet.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=0.75)
    generator = torch.Generator().manual_seed(seed)
    cpu = time.process_time()
    unet.train()
    bar = tqdm(range(steps), desc="training UNet2DModel (diffusers' recipe)")
    for _ in bar:
        clean = images[torch.randint(len(images), (batch_size,), generator=generator)]
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
        noisy = scheduler.add_noise(clean, noise, timesteps)
        loss = F.mse_loss(unet(noisy, timesteps).sample, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        lr_schedule.step()
        optimizer.zero_grad()
        ema.step(unet.parameters())
        bar.set_postfix(loss=f"{loss.item():.4f}")
    ema.copy_to(unet.parameters())
    DDPMPipeline(unet=unet.eval(), scheduler=scheduler).save_pretrained(str(folder))
    minutes = (time.process_time() - cpu) / 60
    (folder / "cpu_minutes.json").write_text(json.dumps({"cpu_minutes": minutes, "steps": steps}))
    return minutes


# -- diffusers sampling -----------------------------------------------------------------------


def diffusers_candidates() -> list[tuple[str, type, dict]]:
    """(label, scheduler class, options) in the ways diffusers' users configure them."""
    import diffusers as d

    out = []
    for spacing in ("leading", "trailing", "linspace"):
        out.append((f"DDIM {spacing}", d.DDIMScheduler, {"timestep_spacing": spacing}))
    for spacing in ("leading", "trailing"):
        out.append((f"DDPM {spacing}", d.DDPMScheduler, {"timestep_spacing": spacing}))
    out.append(("Euler karras", d.EulerDiscreteScheduler, {"use_karras_sigmas": True}))
    out.append(("Euler trailing", d.EulerDiscreteScheduler, {"timestep_spacing": "trailing"}))
    for spacing in ("linspace", "trailing", "karras"):
        options = {"use_karras_sigmas": True} if spacing == "karras" else {"timestep_spacing": spacing}
        out.append((f"DPM++ 2M {spacing}", d.DPMSolverMultistepScheduler,
                    dict(options, solver_order=2, algorithm_type="dpmsolver++")))
        out.append((f"UniPC bh2 o3 {spacing}", d.UniPCMultistepScheduler,
                    dict(options, solver_order=3, solver_type="bh2")))
    out.append(("DPM++ 3M karras", d.DPMSolverMultistepScheduler,
                {"use_karras_sigmas": True, "solver_order": 3, "algorithm_type": "dpmsolver++"}))
    out.append(("DEIS o3 linspace", d.DEISMultistepScheduler, {"solver_order": 3}))
    return out


def diffusers_images(unet, base_config: dict, cls: type, options: dict, nfe: int, n: int, seed: int) -> Tensor:
    """diffusers' pipeline loop (DDPMPipeline's, with scale_model_input) with the scheduler swapped in."""
    scheduler = cls.from_config(base_config, **options)
    scheduler.set_timesteps(nfe)
    if len(scheduler.timesteps) != nfe:
        raise ValueError(f"{cls.__name__} {options} takes {len(scheduler.timesteps)} calls for {nfe} steps")
    generator = torch.Generator().manual_seed(seed)
    extra = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    x = torch.randn(n, 1, 8, 8, generator=generator) * scheduler.init_noise_sigma
    with torch.inference_mode():
        for t in scheduler.timesteps:
            eps = unet(scheduler.scale_model_input(x, t), t).sample
            x = scheduler.step(eps, t, x, **extra).prev_sample
    return x.clamp(-1, 1)


# -- sculpt sampling --------------------------------------------------------------------------


def sculpt_images(D, n: int, seed: int, sampler: str, steps: int | None = None, spacing: str | None = None,
                  sigmas: Tensor | None = None) -> Tensor:
    x = sample(D, (n, 1, 8, 8), sampler=sampler, steps=steps, spacing=spacing, sigmas=sigmas,
               generator=torch.Generator().manual_seed(seed))
    return x.clamp(-1, 1)


def find_tune_grid():
    try:
        from sculpt import tune_grid
    except ImportError:
        return None
    return tune_grid


def shared_references(D, n: int):
    """Two reference solves (tuning, held out) shared by every tune_grid call, where sculpt.tune offers them."""
    try:
        from sculpt.tune import reference
    except ImportError:
        return {}
    generator = torch.Generator().manual_seed(3)
    return {"references": (reference(D, (1, 8, 8), n=n, generator=generator),
                           reference(D, (1, 8, 8), n=n, generator=generator))}


# -- scoring ----------------------------------------------------------------------------------


class Scorer:
    """Mean FD over disjoint sets of n samples against n test digits (classifier features)."""

    def __init__(self, n: int, sets: int) -> None:
        train_set, test_set = load_dataset("digits"), load_dataset("digits", split="test")
        self.extractor, self.accuracy = train_classifier(train_set, test_dataset=test_set, progress=False)
        self.n, self.sets = min(n, len(test_set)), sets
        self.reference = self.extractor.features(test_set.images(slice(0, self.n)), progress=False)
        subset = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(0))[: self.n]
        self.floor = frechet_distance(self.extractor.features(train_set.images(subset), progress=False), self.reference)

    def __call__(self, images: Tensor) -> float:
        feats = self.extractor.features(images, progress=False)
        n = self.n
        return float(np.mean([frechet_distance(feats[i * n : (i + 1) * n], self.reference) for i in range(self.sets)]))


def best(rows: list[tuple[str, int, float]], nfe: int) -> tuple[str, float]:
    label, _, fd = min((r for r in rows if r[1] == nfe), key=lambda r: r[2])
    return label, fd


def plot(path: Path, curves: dict[str, dict[int, float]], floor: float) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for label, points in curves.items():
        nfes = sorted(points)
        ax.plot(nfes, [points[k] for k in nfes], "o--" if label.startswith("diffusers") else "o-", label=label)
    ax.axhline(floor, color="grey", ls=":", label="real-vs-real floor")
    ax.set(xscale="log", yscale="log", xlabel="NFE (network evaluations per sample)", ylabel="FD (classifier)",
           title="diffusers' UNet2DModel on digits: diffusers vs sculpt sampling")
    ax.set_xticks(list(NFES), [str(k) for k in NFES])
    ax.set_xticks([], minor=True)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train-steps", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("-n", type=int, default=297, help="samples per set (capped at the 297 test digits)")
    parser.add_argument("--sets", type=int, default=1, help="disjoint sample sets per score (their mean FD)")
    parser.add_argument("--tune-n", type=int, default=128, help="samples of each reference solve for tune_grid")
    parser.add_argument("--reuse", action="store_true", help="keep a trained model in benchmarks/out/interop/model")
    parser.add_argument("--quick", action="store_true", help="smoke run: 100 training steps, n = 150, one set")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.quick:
        args.train_steps, args.n, args.sets = 100, 150, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    OUT.mkdir(parents=True, exist_ok=True)
    folder = OUT / ("model_quick" if args.quick else "model")
    if args.reuse and (folder / "model_index.json").is_file():
        minutes = json.loads((folder / "cpu_minutes.json").read_text())["cpu_minutes"]
    else:
        minutes = train_model(folder, args.train_steps, args.batch_size, args.lr, seed=0)
    lines = [f"model: diffusers UNet2DModel, {args.train_steps} steps of batch {args.batch_size} with diffusers' "
             f"recipe, {minutes:.1f} CPU min; saved with save_pretrained in {folder}"]
    print(lines[-1], flush=True)
    score = Scorer(args.n, args.sets)
    total = score.n * score.sets
    lines.append(f"FD of {score.sets} sets of n = {score.n} against the test digits (classifier test accuracy "
                 f"{score.accuracy:.4f}); real-vs-real floor FD {score.floor:.2f}")
    print(lines[-1], flush=True)

    # diffusers, every configuration at every NFE
    pipe = diffusers.DDPMPipeline.from_pretrained(str(folder))
    unet, base_config = pipe.unet.eval(), dict(pipe.scheduler.config)
    theirs: list[tuple[str, int, float]] = []
    for label, cls, options in diffusers_candidates():
        for nfe in NFES:
            theirs.append((label, nfe, score(diffusers_images(unet, base_config, cls, options, nfe, total, seed=1))))
        print("diffusers " + label + ": " + ", ".join(f"NFE {k} FD {fd:.2f}" for lab, k, fd in theirs if lab == label),
              flush=True)

    # sculpt, the same weights through diffusers:PATH
    D, config = load(f"diffusers:{folder}")
    default_sampler, default_spacing = config.train.sampler, config.train.sample_spacing
    defaults = {nfe: score(sculpt_images(D, total, 1, default_sampler, nfe, default_spacing)) for nfe in NFES}
    unclamped = from_diffusers(folder, clip=False)
    no_clip = {nfe: score(sculpt_images(unclamped, total, 1, default_sampler, nfe, default_spacing)) for nfe in NFES}
    print(f"sculpt defaults ({default_sampler} {default_spacing}): "
          + ", ".join(f"NFE {k} FD {defaults[k]:.2f} (no clamp {no_clip[k]:.2f})" for k in NFES), flush=True)
    ours: list[tuple[str, int, float]] = []
    for sampler, spacing in SCULPT_CANDIDATES:
        for nfe in NFES:
            ours.append((f"{sampler} {spacing}", nfe, score(sculpt_images(D, total, 1, sampler, nfe, spacing))))
        print(f"sculpt {sampler} {spacing}: " + ", ".join(f"NFE {k} FD {fd:.2f}" for _, k, fd in ours[-len(NFES):]),
              flush=True)
    tune_grid = find_tune_grid()
    tuned: dict[int, tuple[str, float]] = {}
    if tune_grid is not None:
        shared = shared_references(D, args.tune_n)
        for nfe in TUNED_NFES:
            for sampler in TUNED_SAMPLERS:
                sigmas = tune_grid(D, (1, 8, 8), nfe=nfe, sampler=sampler, n=args.tune_n,
                                   generator=torch.Generator().manual_seed(3), **shared)
                fd = score(sculpt_images(D, total, 1, sampler, sigmas=sigmas))
                print(f"sculpt {sampler} tuned for NFE {nfe}: FD {fd:.2f}", flush=True)
                if nfe not in tuned or fd < tuned[nfe][1]:
                    tuned[nfe] = (f"{sampler} tuned", fd)

    for nfe in NFES:
        label, fd_theirs = best(theirs, nfe)
        mine = defaults[nfe]
        lines.append(f"NFE {nfe:>2d}: sculpt defaults ({default_sampler} {default_spacing}) FD {mine:.2f}, diffusers "
                     f"best ({label}) FD {fd_theirs:.2f}, {fd_theirs / mine:.2f}x")
        lines.append(f"NFE {nfe:>2d}: sculpt defaults without the x0 clamp FD {no_clip[nfe]:.2f}, diffusers best "
                     f"({label}) FD {fd_theirs:.2f}, {fd_theirs / no_clip[nfe]:.2f}x")
        label_ours, fd_ours = best(ours, nfe)
        lines.append(f"NFE {nfe:>2d}: sculpt best grid ({label_ours}) FD {fd_ours:.2f}, diffusers best ({label}) "
                     f"FD {fd_theirs:.2f}, {fd_theirs / fd_ours:.2f}x")
        if nfe in tuned:
            lines.append(f"NFE {nfe:>2d}: sculpt {tuned[nfe][0]} FD {tuned[nfe][1]:.2f}, diffusers best ({label}) "
                         f"FD {fd_theirs:.2f}, {fd_theirs / tuned[nfe][1]:.2f}x")
        elif tune_grid is None:
            lines.append(f"NFE {nfe:>2d}: tuned: not available (this sculpt has no sculpt.tune_grid)")
    candidates = {"defaults": defaults[5], **({"tuned": tuned[5][1]} if 5 in tuned else {})}
    which = min(candidates, key=candidates.get)
    label10, fd10 = best(theirs, 10)
    ratio = candidates[which] / fd10
    lines.append(f"goal: sculpt at NFE 5 ({which}) FD {candidates[which]:.2f} vs diffusers at NFE 10 ({label10}) FD "
                 f"{fd10:.2f}: {ratio:.2f}x ({'met' if ratio <= 1 else 'not met'}); with sculpt's best fixed grid at "
                 f"NFE 5 ({best(ours, 5)[0]}) {best(ours, 5)[1] / fd10:.2f}x")
    print("\n".join(lines[2:]), flush=True)

    curves = {
        "diffusers best": {k: best(theirs, k)[1] for k in NFES},
        f"sculpt defaults ({default_sampler} {default_spacing})": defaults,
        "sculpt defaults, no x0 clamp": no_clip,
        "sculpt best grid": {k: best(ours, k)[1] for k in NFES},
    }
    if tuned:
        curves["sculpt tuned grid"] = {k: v[1] for k, v in tuned.items()}
    plot(OUT / "fd_vs_nfe.png", curves, score.floor)
    save_grid(OUT / "sculpt_defaults_nfe5.png", sculpt_images(D, 64, 1, default_sampler, 5, default_spacing), scale=4)
    label5, _ = best(theirs, 5)
    cls, options = next((c, o) for lab, c, o in diffusers_candidates() if lab == label5)
    save_grid(OUT / "diffusers_best_nfe5.png", diffusers_images(unet, base_config, cls, options, 5, 64, 1), scale=4)
    (OUT / "results.txt").write_text("\n".join(lines) + "\n")
    print(f"wrote {OUT}/results.txt, fd_vs_nfe.png, sample grids", flush=True)


if __name__ == "__main__":
    main()
