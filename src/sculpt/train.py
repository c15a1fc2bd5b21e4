"""One readable training loop over any objective (``sculpt.objectives``).

The loop owns what every objective needs: the optimizer and its learning-rate warmup,
EMA, gradient clipping and accumulation, mixed precision, data-parallel processes,
logging, sample grids, checkpoints and exact resume. What is optimised (the loss, what
it draws, which modules it trains or keeps frozen) is the objective's; the run folder,
checkpoints and ``load`` are ``sculpt.run``'s.

Ctrl-C or SIGTERM finishes the current step, writes a checkpoint and stops; ``--resume``
continues exactly (same batches, same noise, same losses).
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from . import config as cfg
from .config import Config, TrainConfig
from .data import AnyDataset, StreamingDataset, batches, load_dataset
from .denoiser import Denoiser
from .evaluate import default_extractor
from .images import save_grid
from .latent import Codec, LatentDenoiser, latent_dataset, open_codec, resolve_latent
from .metrics.features import get_extractor, reference_stats
from .metrics.stats import frechet_distance
from .moments import MAX_IMAGES, MOMENTS_FILE, DataMoments, measure_moments
from .nets.layers import batch_share
from .objectives import AutoencoderModel, Objective
from .plots import plot_loss
from .run import (
    build_model,
    build_objective,
    check_teacher,
    complete_checkpoints,
    load,  # noqa: F401  (sculpt.train.load: where it lived before sculpt.run)
    load_weights,
    read_config,
    resolve,
    save_checkpoint,
    write_text,
)
from .runtime import PRECISION_CHOICES, autocast, resolve_precision, tune_cpu_allocator
from .samplers import class_rows, generate, resolve_sampling, sample
from .trackers import TRACKERS, make_tracker

__all__ = ["train", "make_optimizer", "Interrupted", "World"]


class Interrupted(Exception):
    """Training stopped on Ctrl-C / SIGTERM after writing a checkpoint."""

    def __init__(self, step: int, run_dir: Path):
        super().__init__(
            f"interrupted at step {step}; checkpoint saved. Resume with: sculpt train --resume --out {run_dir}"
        )
        self.step, self.run_dir = step, run_dir


class World:
    """The processes of a data-parallel run (one when not launched by torchrun / accelerate launch).

    ``accelerate launch -m sculpt train`` and ``torchrun -m sculpt train`` both set RANK,
    WORLD_SIZE and LOCAL_RANK; the process group uses NCCL on GPUs and gloo on CPUs.
    """

    def __init__(self, rank: int, size: int, device: torch.device):
        self.rank, self.size, self.device = rank, size, device
        self._host_group = None  # gloo group for host-side agreement when the default group is NCCL
        if size > 1 and device.type != "cpu":
            import torch.distributed as dist

            self._host_group = dist.new_group(backend="gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls, device: str | torch.device | None = None) -> World:
        import torch.distributed as dist

        size = int(os.environ.get("WORLD_SIZE", "1"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device is None:
            device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local)
        if size > 1 and not dist.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(dist.get_rank() if size > 1 else 0, size, device)

    def agree(self, *flags: bool) -> tuple[bool, ...]:
        """Each flag true if it is true on any process (stop requests, time limits)."""
        if self.size == 1:
            return flags
        import torch.distributed as dist

        # Host tensors over gloo: asked every step, so it must not wait for the GPU's queue.
        values = torch.tensor([float(f) for f in flags])
        dist.all_reduce(values, op=dist.ReduceOp.MAX, group=self._host_group)
        return tuple(bool(v) for v in values.tolist())

    def mean(self, value: Tensor) -> float:
        if self.size > 1:
            import torch.distributed as dist

            value = value.detach().clone()
            dist.all_reduce(value)
            value /= self.size
        return float(value)

    def barrier(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            dist.barrier()


@contextmanager
def _stop_on_signals():
    """First Ctrl-C / SIGTERM asks the loop to stop after this step; a second one aborts."""
    requested = {"stop": False}
    if threading.current_thread() is not threading.main_thread():
        yield requested
        return

    def handler(signum, frame):
        if requested["stop"]:
            raise KeyboardInterrupt
        requested["stop"] = True
        print(
            f"\nsculpt: {signal.Signals(signum).name} received; saving a checkpoint after this step "
            "(again to abort without saving)",
            flush=True,
        )

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requested
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _ema_decay(step: int, config: Config) -> float:
    """Karras et al. 2022 / diffusers' power schedule: fast averaging early, slow later.

    ``step`` counts from the start of the objective's current stage (a distillation round).
    """
    return min(config.train.ema_max, 1 - (1 + step) ** -config.train.ema_power)


def _check_config(config: Config) -> None:
    t = config.train
    if t.steps < 1 or t.batch_size < 1:
        raise ValueError(f"train.steps and train.batch_size must be >= 1 (got {t.steps}, {t.batch_size})")
    if t.lr <= 0:
        raise ValueError(f"train.lr must be positive (got {t.lr})")
    if not 0 <= t.adam_beta2 < 1:
        raise ValueError(f"train.adam_beta2 must lie in [0, 1) (got {t.adam_beta2}); 0.99 or 0.999 are usual")
    if t.grad_accum < 1:
        raise ValueError(f"train.grad_accum must be >= 1 (got {t.grad_accum})")
    if t.log_every < 1 or t.sample_every < 0 or t.checkpoint_every < 0:
        raise ValueError("train.log_every must be >= 1; sample_every and checkpoint_every >= 0")
    if t.lr_decay not in LR_DECAYS or not 0 <= t.lr_final <= 1:
        raise ValueError(
            f"train.lr_decay must be one of {', '.join(LR_DECAYS)} and train.lr_final in [0, 1] "
            f"(got {t.lr_decay!r}, {t.lr_final})"
        )
    if t.precision not in PRECISION_CHOICES:
        raise ValueError(
            f"train.precision must be one of {', '.join(PRECISION_CHOICES)} (got {t.precision!r}); "
            "auto picks bf16 on hardware with native bf16, fp32 elsewhere"
        )
    if t.tracker not in TRACKERS:
        raise ValueError(f"train.tracker must be one of {', '.join(repr(k) for k in TRACKERS)} (got {t.tracker!r})")
    if config.data.workers is not None and config.data.workers < 0:
        raise ValueError(f"data.workers must be >= 0, or None for the default (got {config.data.workers})")


def _sample_grid(ema_denoiser: Denoiser, config: Config, noise: Tensor, labels: Tensor | None, path: Path) -> None:
    if isinstance(ema_denoiser, AutoencoderModel):
        _reconstruction_grid(ema_denoiser.net, config, noise, path)
        return
    cond = {"class_labels": labels} if labels is not None else None
    images = sample(
        ema_denoiser,
        tuple(noise.shape),
        sampler=config.train.sampler,
        steps=config.train.sample_steps,
        spacing=config.train.sample_spacing or None,
        noise=noise,
        cond=cond,
        device=noise.device,
    )
    if isinstance(ema_denoiser, LatentDenoiser):
        images = ema_denoiser.codec.decode(images)  # a latent run's grid shows decoded pixels
    scale = max(1, 128 // config.data.resolution)
    nrow = len(labels) // config.model.num_classes if labels is not None else None  # one row per class
    save_grid(path, images.float().cpu(), nrow=nrow, scale=scale)


def _reconstruction_grid(ema: torch.nn.Module, config: Config, images: Tensor, path: Path) -> None:
    """Input | reconstruction (the EMA autoencoder's posterior mean, decoded) side by side, in pairs."""
    with torch.inference_mode():
        recon = ema(images)[0].float().clamp(-1, 1)
    pairs = torch.stack([images.float(), recon], dim=1).flatten(0, 1)  # (2N, C, H, W): in, out, in, out, ...
    scale = max(1, 128 // config.data.resolution)
    save_grid(path, pairs.cpu(), nrow=2 * max(1, int(len(images) ** 0.5)), scale=scale)


def _latent_data(config: Config, dataset: AnyDataset, run_dir: Path, world: World, resume: bool, progress: bool):
    """A latent run's codec, its resolved config and the dataset's latents (encoded once into the cache)."""
    if not resume and world.main and run_dir.exists() and any(run_dir.glob("*.safetensors")):
        raise FileExistsError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
    codec = open_codec(config.latent.autoencoder, progress=progress and world.main)
    config = resolve_latent(config, codec)  # refuses a changed autoencoder or data it does not fit
    codec.to(world.device)
    cache = {
        "cache_dir": config.latent.cache_dir or run_dir / "latents",
        "spec": config.data.name,
        "hflip": config.data.hflip,
        "device": world.device,
    }
    if world.main:  # one process encodes; the others read its cache
        latents = latent_dataset(codec, dataset, progress=progress, **cache)
    world.barrier()
    if not world.main:
        latents = latent_dataset(codec, dataset, progress=False, **cache)
    return codec, config, latents


def make_optimizer(params, lr: float, weight_decay: float = 0.0, beta2: float = 0.999) -> torch.optim.AdamW:
    """AdamW, fused into one kernel per step where PyTorch has one (CUDA; the CPU from torch 2.4).

    On a 7M-parameter UNet the fused CPU step takes 5 ms where the per-tensor loop takes 20.
    """
    params = list(params)
    betas = (0.9, beta2)
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas, fused=True)
    except RuntimeError:  # no fused kernel for these tensors' device
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas)


def _global_images(images: Tensor, labels: Tensor) -> Tensor:
    """What an objective's draw sees as the step's images: the global batch's shape, only this process's pixels.

    With one process that is the batch itself; with several, a zero-stride stand-in of the
    global shape (no memory), which every objective passes through unchanged as "x0" and
    which ``_my_slice`` replaces by this process's images.
    """
    if images.shape[0] == labels.shape[0]:
        return images
    return images.new_zeros(()).expand(labels.shape[0], *images.shape[1:])


def _my_slice(
    draws: dict[str, Tensor],
    stand_in: Tensor,
    images: Tensor,
    world: World,
    batch_size: int,
    device: torch.device,
    channels_last: bool,
):
    """This process's rows of a step's global draws, on the device (float64 noise levels stay on the host).

    ``stand_in`` is what the draw was given as the images (``_global_images``); this process's
    rows of it are ``images``, read by this process alone.
    """
    mine = slice(world.rank * batch_size, (world.rank + 1) * batch_size)
    if stand_in is not images and not any(value is stand_in for value in draws.values()):
        raise ValueError(
            "this objective changes the images in draw(); under several processes each holds only its own "
            "rows of them, so draw() must pass the images through unchanged (do the transform in loss())"
        )
    batch = {}
    for name, value in draws.items():
        value = images if value is stand_in else value[mine]
        if value.dtype != torch.float64:
            if device.type == "cuda":  # page-locked, so the copy overlaps the GPU's work
                value = value.pin_memory()
            value = value.to(device, non_blocking=True)
            if channels_last and value.ndim == 4:
                value = value.contiguous(memory_format=torch.channels_last)
        batch[name] = value
    return batch


LR_DECAYS = ("none", "cosine", "linear")


def learning_rate(t: TrainConfig, step: int) -> float:
    """The learning rate of optimizer step `step` (0-based): linear warmup over ``warmup`` steps, then
    constant (``lr_decay="none"``) or a cosine / linear decay to ``lr * lr_final`` at step ``steps - 1``.
    """
    if step < t.warmup or t.lr_decay == "none":
        return t.lr * min(1.0, (step + 1) / max(t.warmup, 1))
    progress = min(1.0, (step - t.warmup + 1) / max(1, t.steps - t.warmup))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if t.lr_decay == "cosine" else 1 - progress
    return t.lr * (t.lr_final + (1 - t.lr_final) * shape)


def _network_seed(seed: int, step: int) -> int:
    """The seed of the network's own randomness (dropout) at one step, the same on every process.

    A pure function of (seed, step), so a resumed run draws the masks it would have drawn, on
    every device, without saving RNG states. Every process draws the global batch's masks from it
    and keeps its own rows (`sculpt.nets.layers.batch_share`), so N processes of batch B drop
    what one process of batch N * B drops.
    """
    return int(np.random.SeedSequence((seed, step, 0x5EED)).generate_state(1, dtype=np.uint64)[0])


def _training_state(
    optimizer, scaler, step: int, noise_generator, stream, world: World, window: dict, objective: Objective
) -> dict:
    return {
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "step": step,
        "noise_rng": noise_generator.get_state(),
        "data": stream.state_dict(),
        "world_size": world.size,
        "objective": objective.state_dict(),
        "log_window": window,  # the log interval in progress, so the next log line is the uninterrupted one
    }


def train(
    config: Config,
    *,
    resume: bool = False,
    progress: bool = True,
    device: str | torch.device | None = None,
    dataset: AnyDataset | None = None,
) -> Path:
    """Train the config's objective (``task``, default denoising); returns the run folder.

    ``resume=True`` continues from the run folder's latest checkpoint (its config is
    used, with ``train.steps`` taken from ``config`` so a finished run can be extended).
    """
    from tqdm.auto import tqdm

    # -- set-up: processes, config, data -------------------------------------------------
    run_dir = Path(config.out)
    world = World.from_environment(device)
    device = world.device
    if device.type == "cpu":
        tune_cpu_allocator()  # about 20% faster steps on a CPU (sculpt.runtime)
    checkpoint = None
    if resume:
        found = complete_checkpoints(run_dir)
        if not found:
            raise FileNotFoundError(f"--resume: no complete checkpoint under {run_dir / 'checkpoints'}")
        checkpoint = found[-1]
        saved = read_config(run_dir)
        config = replace(saved, train=replace(saved.train, steps=config.train.steps), out=config.out)
        if saved.train.world_size != world.size:  # keep the global batch, so the steps are the ones it would take
            global_batch = saved.train.batch_size * saved.train.world_size
            if global_batch % world.size:
                raise ValueError(
                    f"--resume: the run's global batch of {global_batch} does not split over {world.size} processes; "
                    f"resume it under a number of processes that divides {global_batch}"
                )
            config = replace(config, train=replace(config.train, batch_size=global_batch // world.size))
    _check_config(config)
    if config.distill.teacher and not config.distill.teacher_sha256:  # a student started by hand (--task)
        config = replace(
            config, distill=replace(config.distill, teacher_sha256=check_teacher(config.distill.teacher)[1])
        )
    if dataset is None:
        d = config.data
        dataset = load_dataset(
            d.name,
            resolution=d.resolution,
            channels=d.channels,
            labels_from_folders=True if config.model.class_cond else None,  # labels only matter when conditioning
            stream=d.stream,
            memory_limit=int(d.memory_gb * (1 << 30)),
            workers=d.workers,
            progress=progress and world.main,
        )
    config = resolve(config, dataset)
    pixels, codec = dataset, None  # a latent run trains on latents and scores decoded pixels
    if config.latent.autoencoder:
        codec, config, dataset = _latent_data(config, dataset, run_dir, world, resume, progress)
    config = replace(
        config,
        train=replace(
            config.train,
            world_size=world.size,
            effective_batch=config.train.batch_size * world.size * config.train.grad_accum,
            precision=resolve_precision(config.train.precision, device),  # recorded as what ran
        ),
    )
    t = config.train

    # -- set-up: model, objective, EMA, optimizer ------------------------------------------
    torch.manual_seed(t.seed)
    model = build_model(config).to(device)
    objective: Objective = build_objective(config, model, device=device)
    net = model.net
    if checkpoint is None and (start := objective.initial_weights()) is not None:
        net.load_state_dict(start)  # a student starts from its teacher
    if t.channels_last:
        net = net.to(memory_format=torch.channels_last)
    ema = build_model(config).net.to(device).requires_grad_(False).eval()
    ema.load_state_dict(net.state_dict())
    ema_denoiser = _ema_model(model, ema, codec)
    optimizer = make_optimizer(net.parameters(), lr=t.lr, weight_decay=t.weight_decay, beta2=t.adam_beta2)
    scaler = torch.amp.GradScaler(device.type, enabled=t.precision == "fp16")
    noise_generator = torch.Generator().manual_seed(t.seed + 1)
    # Every process walks the same global stream of batches (batch_size * world_size per micro-step)
    # and the objective's same global draws, and keeps its own slice: so the run is the same whatever
    # the number of processes, and a checkpoint resumes under any other number.
    global_batch = t.batch_size * world.size
    # Each process reads (and, from disk, decodes) only its own rows of every global batch.
    stream = batches(
        dataset,
        global_batch,
        generator=torch.Generator().manual_seed(t.seed),
        hflip=config.data.hflip and codec is None,  # a latent cache holds the mirrored images' own latents
        rank=world.rank,
        world_size=world.size,
        workers=config.data.workers,
    )
    step = 0
    window = {"loss": 0.0, "steps": 0, "seconds": 0.0}  # the log interval in progress

    # -- set-up: the run folder, or the checkpoint to resume -------------------------------
    if checkpoint is not None:
        load_weights(net, checkpoint / "model.safetensors", "checkpoint")
        load_weights(ema, checkpoint / "ema.safetensors", "checkpoint")
        for name, module in objective.frozen().items():
            load_weights(module, checkpoint / f"{name}.safetensors", "checkpoint")
        state = torch.load(checkpoint / "state.pt", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        noise_generator.set_state(state["noise_rng"])
        stream.load_state_dict(state["data"])
        objective.load_state_dict(state.get("objective", {}))
        step = int(state["step"])
        window = state.get("log_window", window)
        stream.unreadable = window.get("unreadable", 0) if world.main else 0
        if world.main:
            _truncate_log(run_dir / "log.jsonl", step)
    elif world.main:
        if run_dir.exists() and any(run_dir.glob("*.safetensors")):
            raise FileExistsError(
                f"{run_dir} already holds a run; pass --resume to continue it or choose another --out"
            )
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "log.jsonl").write_text("")
    if world.main:
        write_text(run_dir / "config.json", cfg.to_json(config))
        if config.task == "denoising":
            # The data's mean and variance: a sampler's analytic first step (sculpt.moments). Not for a
            # student, whose steps were distilled for its own grid: one more step would leave it.
            moments_path = run_dir / MOMENTS_FILE
            if moments_path.is_file():  # a resumed run measured them at its start
                moments = DataMoments.load(moments_path)
            else:
                moments = measure_moments(
                    dataset,
                    num_classes=config.model.num_classes,
                    hflip=config.data.hflip and codec is None,  # a latent cache holds the mirrored latents already
                    max_images=REFERENCE_MAX if isinstance(dataset, StreamingDataset) else MAX_IMAGES,
                )
                moments.save(moments_path)
            inner = ema_denoiser.denoiser if codec is not None else ema_denoiser
            inner.data_moments = moments  # the training-time samples use them too

    # The losses run through the compiled / data-parallel wrapper; the weights live in net.
    wrapped = net
    if t.compile:
        wrapped = torch.compile(wrapped)
    if world.size > 1:
        device_ids = [device.index] if device.type == "cuda" else None
        wrapped = torch.nn.parallel.DistributedDataParallel(wrapped, device_ids=device_ids)
    model.net = wrapped

    fixed = torch.Generator().manual_seed(t.seed + 2)
    num_classes = config.model.num_classes
    grid_labels = class_rows(num_classes, t.num_samples).to(device) if num_classes else None  # a row per class
    grid_size = len(grid_labels) if num_classes else t.num_samples
    grid_noise = torch.randn((grid_size, *dataset.shape), generator=fixed).to(device)
    if isinstance(model, AutoencoderModel):  # an autoencoder's grid reconstructs fixed training images
        grid_noise = dataset.images(torch.randperm(len(dataset), generator=fixed)[: t.num_samples]).to(device)
        grid_labels = None
    watching = world.main and t.eval_every and not isinstance(model, AutoencoderModel)
    watcher = _TrainingFID(config, pixels, run_dir, device) if watching else None
    tracker = make_tracker(t.tracker, run_dir, config, start_step=step) if world.main and t.tracker else None

    net.train()
    params = list(net.parameters())
    ema_params = list(ema.parameters())
    log_path = run_dir / "log.jsonl"
    # A checkpoint carries the interval in progress (its loss summed over steps, averaged over processes).
    window_loss = torch.full((), float(window["loss"]), device=device)
    window_steps, window_start = int(window["steps"]), time.perf_counter() - float(window["seconds"])
    streamed = isinstance(dataset, StreamingDataset)
    bar = tqdm(total=t.steps, initial=step, disable=not (progress and world.main), unit="step", dynamic_ncols=True)
    first_step = step  # of this process: with --train.compile it compiles the network, forward and backward
    next_record: dict[str, float] = {}  # fields for the next log record only (compile_s)
    with _stop_on_signals() as stop:
        started = time.perf_counter()
        last = step >= t.steps  # a resumed run that already reached its steps only writes the final grid
        while not last:
            # -- one optimizer step ---------------------------------------------------------
            objective.begin_step(step, net, ema)
            torch.manual_seed(_network_seed(t.seed, step))  # dropout: the global batch's masks at this step
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(t, step)
            optimizer.zero_grad(set_to_none=True)
            for micro in range(t.grad_accum):
                images, labels = next(stream)  # this process's rows of the images; the global batch's labels
                stand_in = _global_images(images, labels)
                draws = objective.draw(stand_in, labels, noise_generator, step)
                batch = _my_slice(draws, stand_in, images, world, t.batch_size, device, t.channels_last)
                # gradients are averaged across processes only on the last micro-batch
                sync = world.size == 1 or micro == t.grad_accum - 1
                with (
                    autocast(device, t.precision),
                    batch_share(world.rank, world.size),  # dropout keeps this process's rows of global masks
                    nullcontext() if sync else wrapped.no_sync(),
                ):
                    loss = objective.loss(batch, step).mean()
                    scaler.scale(loss / t.grad_accum).backward()
                window_loss += loss.detach() / t.grad_accum
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, t.grad_clip if t.grad_clip > 0 else math.inf)
            scaler.step(optimizer)
            scaler.update()
            with torch.no_grad():
                decay = _ema_decay(step - objective.stage_start(step), config)
                torch._foreach_lerp_(ema_params, params, 1 - decay)
                for ema_buffer, buffer in zip(ema.buffers(), net.buffers(), strict=True):
                    ema_buffer.copy_(buffer)
            if t.compile and step == first_step:  # its seconds, seen apart from the steps' rate
                next_record["compile_s"] = round(time.perf_counter() - started, 2)
            step += 1
            over_time = bool(t.time_limit and time.perf_counter() - started > t.time_limit)
            stopping, over_time = world.agree(stop["stop"], over_time)  # every process stops at the same step
            last = step >= t.steps or over_time
            window_steps += 1

            # -- log (an interrupted interval is finished after --resume, from the checkpoint) ---
            if step % t.log_every == 0 or last:
                mean_loss = world.mean(window_loss / window_steps)  # the one host sync per log interval
                if not math.isfinite(mean_loss):
                    found = complete_checkpoints(run_dir)
                    where = f"the last good checkpoint is {found[-1]}" if found else "no checkpoint was written yet"
                    raise FloatingPointError(
                        f"loss became {mean_loss} by step {step}; {where}. Lower --train.lr, keep "
                        "--train.grad_clip on, or use --train.precision=fp32."
                    )
                elapsed = time.perf_counter() - window_start
                record = {
                    "step": step,
                    "loss": mean_loss,
                    "lr": optimizer.param_groups[0]["lr"],
                    "grad_norm": float(grad_norm),
                    "img_per_s": window_steps * global_batch * t.grad_accum / elapsed,
                    **objective.record(step - 1),
                    **next_record,
                }
                next_record.clear()
                if streamed:  # files that could not be read since the start: skipped, never a crash
                    unreadable = torch.tensor(float(stream.unreadable), device=device)
                    record["unreadable"] = round(world.mean(unreadable) * world.size)
                if world.main:
                    with log_path.open("a") as handle:
                        handle.write(json.dumps(record) + "\n")
                    if tracker is not None:
                        tracker.log(record)
                bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{record['img_per_s']:.0f}")
                window_loss.zero_()
                window_steps, window_start = 0, time.perf_counter()
            bar.update(1)

            # -- samples, small-n FID, checkpoint ---------------------------------------------
            if world.main and t.sample_every and step % t.sample_every == 0 and not last:
                grid_path = run_dir / "samples" / f"step_{step:06d}.png"
                _sample_grid(ema_denoiser, config, grid_noise, grid_labels, grid_path)
                if tracker is not None:
                    tracker.image("samples", grid_path, step)
            if watcher is not None and step % t.eval_every == 0:
                scores = watcher(ema_denoiser, step)
                with log_path.open("a") as handle:
                    handle.write(json.dumps({"step": step, "eval": scores}) + "\n")
                if tracker is not None:
                    tracker.log({"step": step, "eval": scores})
            if (t.checkpoint_every and step % t.checkpoint_every == 0) or last or stopping:
                window = {
                    "loss": world.mean(window_loss),  # every process takes part: a collective
                    "steps": window_steps,
                    "seconds": time.perf_counter() - window_start,
                    "unreadable": round(world.mean(torch.tensor(float(stream.unreadable), device=device)) * world.size)
                    if streamed
                    else 0,
                }
                if world.main:
                    state = _training_state(optimizer, scaler, step, noise_generator, stream, world, window, objective)
                    save_checkpoint(
                        run_dir, step, net, ema, state, config, frozen=objective.frozen(), keep=t.keep_checkpoints
                    )
                world.barrier()
            if stopping and not last:
                bar.close()
                stream.close()
                if tracker is not None:
                    tracker.close()
                raise Interrupted(step, run_dir)
    bar.close()
    stream.close()
    if world.main:
        _sample_grid(ema_denoiser, config, grid_noise, grid_labels, run_dir / "samples" / "final.png")
        _plot_log(run_dir)
        objective.finish(run_dir, ema, dataset, device)
        if tracker is not None:
            tracker.image("samples", run_dir / "samples" / "final.png", step)
            tracker.close()
    return run_dir


def _ema_model(model, ema: torch.nn.Module, codec: Codec | None):
    """The EMA network in the model's shape: a Denoiser (with its codec, for a latent run) or the autoencoder."""
    if isinstance(model, AutoencoderModel):
        return AutoencoderModel(ema)
    denoiser = Denoiser(ema, model.schedule, model.prediction, model.sigma_data)
    return LatentDenoiser(denoiser, codec) if codec is not None else denoiser


REFERENCE_MAX = 10_000  # training images a streamed set's training-time FID is measured against


class _TrainingFID:
    """FID at small n during training, against the training data, clearly labelled as such."""

    def __init__(self, config: Config, dataset: AnyDataset, run_dir: Path, device: torch.device):
        t = config.train
        if t.eval_features:
            self.extractor = get_extractor(t.eval_features, device=device)
        elif isinstance(dataset, StreamingDataset):
            raise ValueError(
                f"train.eval_every on a dataset streamed from disk ({dataset.name}, {len(dataset)} images) needs "
                "--train.eval_features=inception:PATH or classifier:DIR (fitting a classifier needs it in memory)"
            )
        else:
            self.extractor = default_extractor(run_dir, dataset, config.data.name, progress=False)
        # The reference: every image of an in-memory set, a fixed spread of REFERENCE_MAX of a streamed one.
        rows = None
        if isinstance(dataset, StreamingDataset) and len(dataset) > REFERENCE_MAX:
            rows = torch.linspace(0, len(dataset) - 1, REFERENCE_MAX).long()
        self.reference = reference_stats(
            self.extractor,
            dataset.images(rows),
            dataset=config.data.name,
            split="train",
            cache_dir=run_dir / "features" / "reference",
            progress=False,
        )
        self.config, self.device = config, device

    def __call__(self, ema_denoiser: Denoiser, step: int) -> dict:
        t, data = self.config.train, self.config.data
        fake = generate(
            ema_denoiser,
            (data.channels, data.resolution, data.resolution),
            t.eval_n,
            sampler=t.sampler,
            steps=t.sample_steps,
            spacing=t.sample_spacing or None,
            seed=t.seed,
            progress=False,
            num_classes=self.config.model.num_classes,
            device=self.device,
        )
        fid = frechet_distance(self.reference.feats, self.extractor.features(fake, progress=False))
        return {
            "fid": fid,
            "n": t.eval_n,
            "extractor": self.extractor.name,
            "sampler": resolve_sampling(t.sampler, t.sample_steps, ema_denoiser.schedule)[0],
            "steps": t.sample_steps,
            "note": "training-time FID at small n (biased upward); report numbers from `sculpt eval`",
        }


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from (they will be redone)."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    write_text(path, "".join(line + "\n" for line in lines))


def _plot_log(run_dir: Path) -> None:
    lines = (run_dir / "log.jsonl").read_text().splitlines()
    records = [r for r in (json.loads(line) for line in lines if line.strip()) if "loss" in r]
    if records:
        plot_loss(
            run_dir / "loss.png",
            [r["step"] for r in records],
            [r["loss"] for r in records],
            smooth=max(1, min(20, len(records) // 5)),
        )
