"""Training and sampling throughput of sculpt's networks against diffusers' at identical configurations.

Two pairs, each built from one set of numbers so that the configurations cannot drift:

- sculpt's ``UNet`` vs diffusers' ``UNet2DModel``: same widths, blocks per level,
  attention resolutions, head width, GroupNorm groups and scale-shift conditioning. The
  parameter counts are printed and must agree to 1% (they agree exactly).
- sculpt's ``DiT`` vs diffusers' ``DiTTransformer2DModel``: same hidden size, depth, heads,
  patch size and class conditioning. diffusers gives every block its own timestep and
  label embedder (12 copies of one MLP); those only ever see a [B, 256] vector, so the
  compute is the same, and the counts are compared without them.

A training step is what each library's own loop does: sculpt ``denoising_loss(D, x0).mean()``
(eps target, DDPM's linear schedule), diffusers ``add_noise`` + ``model(noisy, t).sample``
+ MSE; then backward and an AdamW step on both. Sampling is one denoiser evaluation at the
same batch under ``torch.inference_mode()``. sculpt and diffusers repetitions alternate
and the medians are reported, so a busy machine slows both alike.

Each side runs in its own process, as each library's users run it: sculpt's process tunes
glibc's allocator on the CPU as every ``sculpt`` command and ``sculpt.train`` do
(``sculpt.runtime.tune_cpu_allocator``); diffusers' keeps the default. ``--same-allocator``
gives diffusers' process the same settings, which compares the networks alone.

Peak memory is the growth above what is resident before the step (weights, AdamW state):
activations, gradients and temporaries. On CUDA it is ``torch.cuda.max_memory_allocated``;
on the CPU the process RSS (/proc/self/statm) sampled every millisecond by a thread,
after ``malloc_trim`` has handed freed memory back, during one untimed step.

    python benchmarks/throughput.py                    # CPU, 1 thread, fp32 and bf16: about 12 minutes on 2 cores
    python benchmarks/throughput.py --compile          # adds torch.compile rows (compile seconds printed apart)
    python benchmarks/throughput.py --same-allocator   # the networks alone: both sides tune malloc
    python benchmarks/throughput.py --quick            # smoke run, batch 8
    python benchmarks/throughput.py --device cuda --compile
    python benchmarks/throughput.py --profile unet     # where a training step goes; the dense-kernel floor
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sculpt.denoiser import Denoiser
from sculpt.nets import DiT, UNet
from sculpt.nets.layers import count_parameters
from sculpt.objectives import denoising_loss
from sculpt.runtime import autocast, tune_cpu_allocator
from sculpt.schedules import make
from sculpt.train import make_optimizer

RESOLUTION = 32
CHANNELS = 3
NUM_CLASSES = 10  # the DiT pair is class-conditional: diffusers' DiT requires labels
#: The UNet pair: DDPM/ADM-style CIFAR-sized network with attention at 16x16.
UNET = dict(base_channels=64, channel_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(16,), head_dim=64)
#: DiT-S (Peebles & Xie 2023, Table 1); the patch and depth are command-line options.
DIT = dict(hidden_size=384, num_heads=6)


# -- the two pairs ------------------------------------------------------------------------


def build_unets(scale_shift: bool = True) -> tuple[nn.Module, nn.Module]:
    """sculpt's UNet and diffusers' UNet2DModel of one configuration (see UNET)."""
    from diffusers import UNet2DModel

    sculpt_net = UNet(CHANNELS, resolution=RESOLUTION, norm_groups=32, scale_shift=scale_shift, **UNET)
    levels = [RESOLUTION // 2**level for level in range(len(UNET["channel_mult"]))]
    with_attn = [size in UNET["attn_resolutions"] for size in levels]
    diffusers_net = UNet2DModel(
        sample_size=RESOLUTION,
        in_channels=CHANNELS,
        out_channels=CHANNELS,
        block_out_channels=tuple(UNET["base_channels"] * m for m in UNET["channel_mult"]),
        layers_per_block=UNET["num_res_blocks"],
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in with_attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(with_attn)),
        attention_head_dim=UNET["head_dim"],
        norm_num_groups=32,
        # diffusers drops the middle attention's GroupNorm under scale_shift unless told
        # its groups; sculpt (like ADM) keeps it.
        attn_norm_num_groups=32,
        resnet_time_scale_shift="scale_shift" if scale_shift else "default",
    )
    return sculpt_net, diffusers_net


def build_dits(patch_size: int, depth: int) -> tuple[nn.Module, nn.Module]:
    """sculpt's DiT and diffusers' DiTTransformer2DModel of one configuration (DiT-S widths)."""
    from diffusers import DiTTransformer2DModel

    sculpt_net = DiT(
        in_channels=CHANNELS, resolution=RESOLUTION, patch_size=patch_size, depth=depth, num_classes=NUM_CLASSES, **DIT
    )
    diffusers_net = DiTTransformer2DModel(
        num_attention_heads=DIT["num_heads"],
        attention_head_dim=DIT["hidden_size"] // DIT["num_heads"],
        in_channels=CHANNELS,
        out_channels=CHANNELS,
        num_layers=depth,
        sample_size=RESOLUTION,
        patch_size=patch_size,
        num_embeds_ada_norm=NUM_CLASSES,
        norm_eps=1e-6,  # sculpt's (and the paper's) LayerNorm eps
    )
    return sculpt_net, diffusers_net


def dit_duplicate_embedder_parameters(diffusers_net: nn.Module) -> int:
    """Parameters of the per-block timestep/label embedders beyond the first (diffusers keeps one per block)."""
    return sum(count_parameters(block.norm1.emb) for block in diffusers_net.transformer_blocks[1:])


# -- one side of a comparison -------------------------------------------------------------


@dataclass(frozen=True)
class Mode:
    """One row: a precision, and optionally channels_last and torch.compile."""

    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False

    @classmethod
    def parse(cls, text: str) -> Mode:
        parts = text.split("+")
        if parts[0] not in ("fp32", "bf16", "fp16") or not set(parts[1:]) <= {"cl", "compile"}:
            raise ValueError(f"mode {text!r}: expected fp32|bf16|fp16 with optional +cl and +compile, e.g. bf16+cl")
        return cls(parts[0], "cl" in parts, "compile" in parts)

    def __str__(self) -> str:
        return self.precision + ("+cl" if self.channels_last else "") + ("+compile" if self.compile else "")

    def autocast(self, device: torch.device):
        return autocast(device, self.precision)  # the context sculpt trains and samples under

    @property
    def dtype(self) -> torch.dtype:
        """What the matmuls run in under `autocast`."""
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision, torch.float32)


@dataclass
class Side:
    """A network with its training step and its sampling step, both closures over fixed inputs."""

    name: str
    train_step: Callable[[], None]
    sample_step: Callable[[], None]
    net: nn.Module


def sculpt_side(net: nn.Module, x0: torch.Tensor, cond: dict, mode: Mode, device: torch.device) -> Side:
    denoiser = Denoiser(net, make("linear"), "eps")
    train_net = torch.compile(net) if mode.compile else net
    denoiser.net = train_net
    optimizer = make_optimizer(net.parameters(), lr=1e-4)  # what sculpt.train uses
    scaler = torch.amp.GradScaler(device.type, enabled=mode.precision == "fp16")
    generator = torch.Generator().manual_seed(1)
    # Sampling: one evaluation of D(x, sigma) at noise levels spread over the schedule.
    sigma = make("linear").sigma(torch.linspace(0.05, 1.0, x0.shape[0], dtype=torch.float64))
    x_noisy = x0 + sigma.to(x0).view(-1, 1, 1, 1) * torch.randn_like(x0)

    def train_step() -> None:
        net.train()
        optimizer.zero_grad(set_to_none=True)
        with mode.autocast(device):
            loss = denoising_loss(denoiser, x0, generator=generator, **cond).mean()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    def sample_step() -> None:
        net.eval()
        with torch.inference_mode(), mode.autocast(device):
            denoiser(x_noisy, sigma, **cond)

    return Side("sculpt", train_step, sample_step, net)


def diffusers_side(net: nn.Module, x0: torch.Tensor, cond: dict, mode: Mode, device: torch.device) -> Side:
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000)  # DDPM's linear betas, epsilon target
    model = torch.compile(net) if mode.compile else net
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)  # diffusers' example scripts
    scaler = torch.amp.GradScaler(device.type, enabled=mode.precision == "fp16")
    batch = x0.shape[0]
    timesteps = torch.linspace(50, 999, batch, device=device).long()
    x_noisy = scheduler.add_noise(x0, torch.randn_like(x0), timesteps)

    def train_step() -> None:
        # diffusers' train_unconditional.py loop.
        net.train()
        optimizer.zero_grad(set_to_none=True)
        noise = torch.randn_like(x0)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), device=device)
        noisy = scheduler.add_noise(x0, noise, t)
        with mode.autocast(device):
            prediction = model(noisy, t, **cond).sample
            loss = F.mse_loss(prediction.float(), noise.float())
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    def sample_step() -> None:
        net.eval()
        with torch.inference_mode(), mode.autocast(device):
            _ = model(x_noisy, timesteps, **cond).sample

    return Side("diffusers", train_step, sample_step, net)


# -- measuring ----------------------------------------------------------------------------


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS peaks then over-count reused memory less reliably
        pass


class PeakMemory:
    """Peak memory above the level at entry, in MiB: CUDA allocator stats, or CPU RSS sampled by a thread."""

    def __init__(self, device: torch.device, interval: float = 0.001) -> None:
        self.device, self.interval = device, interval
        self.page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self.mib = float("nan")

    def _rss(self) -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * self.page

    def _watch(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, self._rss())
            time.sleep(self.interval)

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            _malloc_trim()
            self._base = self._peak = self._rss()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._watch, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            peak = max(self._peak, self._rss())
        self.mib = (peak - self._base) / 2**20


def _timed(step: Callable[[], None], device: torch.device, inner: int) -> float:
    """Seconds per step over `inner` back-to-back steps (one synchronisation at the end on CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(inner):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / inner


def measure(sides: list[Remote], reps: int, inner: int, memory: bool) -> None:
    """Warm up, take each side's peak memory in one untimed step, then alternate timed repetitions."""
    for what in ("sample", "train"):
        for side in sides:
            setattr(side, f"{what}_first_s", side("warm", what))  # with torch.compile: the compile time
            if memory:
                setattr(side, f"{what}_mb", side("memory", what))
            else:
                side("warm", what)
        for _ in range(reps):
            for side in sides:
                getattr(side, f"{what}_s").append(side("time", what, inner))


# -- one process per side -----------------------------------------------------------------


def build_side(name: str, model: str, mode: Mode, options: dict, device: torch.device) -> Side:
    """One side of a pair, built from the same seed and numbers as its peer."""
    torch.manual_seed(0)
    if model == "unet":
        sculpt_net, diffusers_net = build_unets()
    else:
        sculpt_net, diffusers_net = build_dits(options["dit_patch"], options["dit_depth"])
    net = sculpt_net if name == "sculpt" else diffusers_net
    memory_format = torch.channels_last if mode.channels_last else torch.contiguous_format
    net = net.to(device, memory_format=memory_format)
    x0 = (torch.rand(options["batch"], CHANNELS, RESOLUTION, RESOLUTION, device=device) * 2 - 1).contiguous(
        memory_format=memory_format
    )
    cond = {}
    if model == "dit":
        cond = {"class_labels": torch.arange(options["batch"], device=device) % NUM_CLASSES}
    return (sculpt_side if name == "sculpt" else diffusers_side)(net, x0, cond, mode, device)


def _serve(connection, name: str, model: str, mode: Mode, options: dict, tune_allocator: bool) -> None:
    """A worker process: build one side, then answer ("warm"|"memory"|"time"|"profile", ...) until "quit"."""
    device = torch.device(options["device"])
    if device.type == "cpu":
        torch.set_num_threads(options["threads"])
    if tune_allocator:
        tune_cpu_allocator()
    try:
        side = build_side(name, model, mode, options, device)
        connection.send(("ok", None))
        while True:
            command, *rest = connection.recv()
            if command == "quit":
                break
            step = getattr(side, f"{rest[0]}_step") if rest else None
            answer = None
            if command == "warm":  # first call: kernel selection, optimizer state, compilation
                began = time.perf_counter()
                step()
                answer = time.perf_counter() - began
            elif command == "memory":
                with PeakMemory(device) as peak:
                    step()
                answer = peak.mib
            elif command == "time":
                answer = _timed(step, device, rest[1])
            elif command == "profile":
                answer = profile(side, mode.dtype)
            else:
                raise ValueError(f"unknown command {command!r}")
            connection.send(("ok", answer))
    except Exception:
        import traceback

        connection.send(("error", traceback.format_exc()))


class Remote:
    """One side of a comparison, running in its own process.

    Each library runs as its users run it: sculpt's process tunes glibc's allocator as every
    ``sculpt`` command and ``sculpt.train`` do on a CPU (``sculpt.runtime``), the peer's keeps
    the default unless ``--same-allocator``. Separate processes also keep one side's freed
    memory and allocator state from helping or hurting the other.
    """

    def __init__(self, name: str, model: str, mode: Mode, options: dict, tune_allocator: bool) -> None:
        import multiprocessing

        self.name, self.tuned = name, tune_allocator
        self.train_s: list[float] = []
        self.sample_s: list[float] = []
        self.train_mb = self.sample_mb = float("nan")
        self.train_first_s = self.sample_first_s = float("nan")
        context = multiprocessing.get_context("spawn")
        self._connection, child = context.Pipe()
        self._process = context.Process(
            target=_serve, args=(child, name, model, mode, options, tune_allocator), daemon=True
        )
        self._process.start()
        self()  # wait until it is built

    def __call__(self, *command):
        if command:
            self._connection.send(command)
        status, answer = self._connection.recv()
        if status == "error":
            raise RuntimeError(f"the {self.name} worker failed:\n{answer}")
        return answer

    def close(self) -> None:
        self._connection.send(("quit",))
        self._process.join()


# -- profiling ----------------------------------------------------------------------------

#: Where time goes: op-name substrings -> a category (first match wins).
CATEGORIES = (
    ("convolution", "convolution"),
    ("scaled_dot_product", "attention"),
    ("_flash_attention", "attention"),
    ("aten::mm", "matmul"),
    ("aten::addmm", "matmul"),
    ("aten::bmm", "matmul"),
    ("aten::linear", "matmul"),
    ("group_norm", "norm"),
    ("layer_norm", "norm"),
    ("silu", "activation"),
    ("gelu", "activation"),
    ("copy_", "copies/casts"),
    ("aten::cat", "copies/casts"),
    ("aten::clone", "copies/casts"),
    ("aten::contiguous", "copies/casts"),
)


#: Ops whose arithmetic both sides must do, op for op, and that `replay_matmuls` can time alone.
MATMULS = ("aten::mm", "aten::addmm")


def profile(side: Side, dtype: torch.dtype, rows: int = 15, steps: int = 3) -> dict[str, float]:
    """Where a training step goes (torch.profiler, `steps` steps after unprofiled ones), and its floor.

    The profiler's own overhead inflates small ops (a DiT step takes 1.4x longer under it), so the
    floor is not read from its times: the step is timed without it, and every matmul it recorded
    is run again alone, outside it, at the recorded shapes (`replay_matmuls`). Returns a step's
    seconds and its matmuls' seconds, both medians without the profiler.
    """
    from torch.profiler import ProfilerActivity, profile

    for _ in range(steps):  # warm-up: kernel choice, the optimizer's state, memory touched for the first time
        side.train_step()
    timed = []
    for _ in range(steps):
        began = time.perf_counter()
        side.train_step()
        timed.append(time.perf_counter() - began)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            side.train_step()
    averages = prof.key_averages()
    total = sum(event.self_cpu_time_total for event in averages) / steps
    by_category: dict[str, float] = {}
    for event in averages:
        category = next((cat for key, cat in CATEGORIES if key in event.key), "other elementwise + optimizer")
        by_category[category] = by_category.get(category, 0.0) + event.self_cpu_time_total / steps
    print(f"\n{side.name}: a training step under the profiler (mean of {steps}), {total / 1e6:.2f} s of self CPU time")
    for category, micros in sorted(by_category.items(), key=lambda item: -item[1]):
        print(f"  {category:32s} {micros / 1e6:6.2f} s  {100 * micros / total:5.1f}%")
    print(averages.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60), flush=True)
    matmuls = replay_matmuls(prof.key_averages(group_by_input_shape=True), steps, dtype)
    return {"step": statistics.median(timed), "matmuls": matmuls}


def replay_matmuls(events, steps: int, dtype: torch.dtype) -> float:
    """Seconds a step's matmuls take on their own: each recorded (op, shapes) alone, median of 3, times its count."""
    seconds = 0.0
    for event in events:
        if event.key not in MATMULS:
            continue
        shapes = event.input_shapes[:2] if event.key == "aten::mm" else event.input_shapes[:3]
        args = [torch.randn(shape, dtype=dtype) for shape in shapes]
        op = torch.mm if event.key == "aten::mm" else torch.addmm
        op(*args)
        runs = []
        for _ in range(3):
            began = time.perf_counter()
            op(*args)
            runs.append(time.perf_counter() - began)
        seconds += statistics.median(runs) * event.count / steps
    return seconds


def floor_line(model: str, sculpt: dict[str, float], other: dict[str, float]) -> str:
    """The most sculpt's step could gain over the peer's: every op but the matmuls taking no time at all."""
    best, now = other["step"] / sculpt["matmuls"], other["step"] / sculpt["step"]
    return (
        f"{model} training step: sculpt {sculpt['step']:.2f} s, of which its matmuls alone take "
        f"{sculpt['matmuls']:.2f} s; "
        f"diffusers {other['step']:.2f} s. With every other op free, sculpt could be at most {best:.2f}x diffusers "
        f"(now {now:.2f}x)"
    )


# -- the run ------------------------------------------------------------------------------


def machine(device: torch.device, threads: int) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            info = dict(line.split(":", 1) for line in handle.read().split("\n\n")[0].splitlines() if ":" in line)
        info = {key.strip(): value.strip() for key, value in info.items()}
        flags = set(info.get("flags", "").split())
        extensions = [flag for flag in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if flag in flags]
        family = f"family {info.get('cpu family')}, model {info.get('model')}"
        name = f"{info['model name']} ({family}; {' '.join(extensions)})"
    except (OSError, KeyError, ValueError):
        pass
    return f"{name}, {os.cpu_count()} logical cores, {threads} torch thread(s), {versions()}"


def versions() -> str:
    """torch, its oneDNN and BLAS, diffusers, numpy, Python: what the figures depend on besides the CPU."""
    import numpy

    parts = [f"torch {torch.__version__}"]
    config = torch.__config__.show()
    for keys, label in ((("oneDNN", "MKL-DNN"), "oneDNN"), (("Math Kernel Library",), "MKL")):
        line = next((line for line in config.splitlines() if any(key in line for key in keys)), "")
        found = [word for word in line.replace(",", " ").split() if word[:1] in "v0123456789" and "." in word]
        if found:
            parts.append(f"{label} {found[0].lstrip('v')}")
    try:
        import diffusers

        parts.append(f"diffusers {diffusers.__version__}")
    except ImportError:
        pass
    parts += [f"numpy {numpy.__version__}", f"Python {platform.python_version()}"]
    return ", ".join(parts)


def summary(model: str, mode: Mode, what: str, sculpt: Remote, other: Remote, batch: int) -> str:
    """One comparison: each side's median img/s with its range, and the median of the pairwise ratios.

    Repetition i of the two sides ran back to back (A B A B ...), so the ratio of pair i cancels
    most of a drift in the machine's speed; its median and range are the figures to quote.
    """
    rates = [[batch / s for s in getattr(side, f"{what}_s")] for side in (sculpt, other)]
    ratios = [a / b for a, b in zip(*rates, strict=True)]
    first = ""
    if mode.compile:
        seconds = [getattr(side, f"{what}_first_s") for side in (sculpt, other)]
        first = f"; first step (compiling) sculpt {seconds[0]:.0f} s, diffusers {seconds[1]:.0f} s"
    parts = [
        f"{name} {statistics.median(r):.1f} img/s ({min(r):.1f}-{max(r):.1f})"
        for name, r in (("sculpt", rates[0]), ("diffusers", rates[1]))
    ]
    return (
        f"{model} {mode} {what}: {parts[0]}, {parts[1]}{first}, "
        f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}, {len(ratios)} pairs)"
    )


def make_pair(model: str, mode: Mode, args) -> list[Remote]:
    options = dict(
        device=args.device, threads=args.threads, batch=args.batch, dit_patch=args.dit_patch, dit_depth=args.dit_depth
    )
    tuned = args.device == "cpu"  # sculpt tunes the allocator only on the CPU
    return [
        Remote("sculpt", model, mode, options, tune_allocator=tuned),
        Remote("diffusers", model, mode, options, tune_allocator=tuned and args.same_allocator),
    ]


def check_parameter_counts(args) -> None:
    with torch.device("meta"):
        sculpt_unet, diffusers_unet = build_unets()
        sculpt_dit, diffusers_dit = build_dits(args.dit_patch, args.dit_depth)
    a, b = count_parameters(sculpt_unet), count_parameters(diffusers_unet)
    print(f"unet parameters: sculpt {a:,}, diffusers {b:,} ({100 * (a - b) / b:+.2f}%)")
    if abs(a - b) > 0.01 * b:
        raise SystemExit("the UNet configurations differ: fix build_unets before comparing speeds")
    a, b = count_parameters(sculpt_dit), count_parameters(diffusers_dit)
    extra = dit_duplicate_embedder_parameters(diffusers_dit)
    print(
        f"dit  parameters: sculpt {a:,}, diffusers {b:,}; without diffusers' {args.dit_depth - 1} duplicate "
        f"per-block embedders ({extra:,}): {b - extra:,} ({100 * (a - b + extra) / (b - extra):+.2f}%)"
    )
    if abs(a - (b - extra)) > 0.01 * (b - extra):
        raise SystemExit("the DiT configurations differ: fix build_dits before comparing speeds")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--quick", action="store_true", help="smoke run: batch 8, DiT depth 2, one repetition")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per side (alternating, A B A B ...)")
    parser.add_argument("--threads", type=int, default=1, help="CPU torch threads (1 keeps a shared machine fair)")
    parser.add_argument("--models", default="unet,dit")
    parser.add_argument("--modes", default=None, help="comma list, e.g. fp32,bf16,fp32+cl,bf16+cl+compile")
    parser.add_argument("--compile", action="store_true", help="add torch.compile rows (default modes only)")
    parser.add_argument("--dit-patch", type=int, default=None, help="default 4 on CPU (64 tokens), 2 on CUDA")
    parser.add_argument("--dit-depth", type=int, default=None, help="default 6 on CPU, 12 (DiT-S) on CUDA")
    parser.add_argument("--no-memory", action="store_true", help="skip the untimed memory steps")
    parser.add_argument("--profile", choices=("unet", "dit"), help="profile 3 training steps a side, print the floor")
    parser.add_argument(
        "--same-allocator",
        action="store_true",
        help="give diffusers' process sculpt's allocator settings too: compares the networks alone",
    )
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    cpu = device.type == "cpu"
    if cpu:
        torch.set_num_threads(args.threads)
    if args.dit_patch is None:
        args.dit_patch = 4 if cpu else 2
    if args.dit_depth is None:
        args.dit_depth = 6 if cpu else 12
    if args.quick:
        args.batch, args.reps, args.dit_depth = 8, 1, 2
    inner = 1 if cpu else 10  # CUDA: 10 steps between synchronisations

    if args.modes:
        modes = [Mode.parse(text) for text in args.modes.split(",")]
    elif cpu:
        # fp16 is left out: CPUs without AVX512-FP16 have no fast fp16 kernels (ask with --modes).
        modes = [Mode.parse(text) for text in ("fp32", "bf16")]  # sculpt's UNet runs fp32 in channels_last itself
        if args.compile:
            modes += [Mode.parse(text) for text in ("fp32+compile", "bf16+compile")]
    else:
        low = "bf16" if torch.cuda.is_bf16_supported() else "fp16"  # fp16 runs with a GradScaler
        modes = [Mode.parse(text) for text in ("fp32", low, f"{low}+cl")]
        if args.compile:
            modes += [Mode.parse(text) for text in (f"{low}+compile", f"{low}+cl+compile")]
    models = args.models.split(",")

    print(f"machine: {machine(device, args.threads if cpu else 0)}")
    dit_name = f"DiT-S/{args.dit_patch}" + ("" if args.dit_depth == 12 else f" at depth {args.dit_depth}")
    print(
        f"config: {RESOLUTION}x{RESOLUTION}x{CHANNELS}, batch {args.batch}; unet {UNET}, scale-shift; "
        f"dit {dit_name} ({NUM_CLASSES} classes); {args.reps} timed repetitions per side after warm-up, "
        "alternating; medians, (ranges)"
    )
    check_parameter_counts(args)

    allocator = "sculpt tunes glibc malloc (sculpt.runtime), diffusers " + (
        "too (--same-allocator)" if args.same_allocator else "keeps the default"
    )
    print(f"one process per side; {allocator if cpu else 'CUDA caching allocator on both sides'}")

    if args.profile:
        found = []
        for side in make_pair(args.profile, modes[0], args):  # the first of --modes
            found.append(side("profile"))
            side.close()
        if args.profile == "dit":  # a UNet's step is convolutions, which replay_matmuls does not time
            print(f"\n{floor_line(args.profile, *found)}")
        return

    started = time.perf_counter()
    results = []
    for model in models:
        for mode in modes:
            if model == "dit" and mode.channels_last:
                continue  # a transformer has no convolutions to lay out
            sides = make_pair(model, mode, args)
            row_start = time.perf_counter()
            measure(sides, args.reps, inner, memory=not args.no_memory)
            for side in sides:
                side.close()
            results.append((model, mode, sides))
            sculpt, other = sides
            print(
                f"  measured {model} {mode} in {time.perf_counter() - row_start:.0f} s: train "
                f"{args.batch / statistics.median(sculpt.train_s):.1f} vs "
                f"{args.batch / statistics.median(other.train_s):.1f} img/s",
                flush=True,
            )
            del sides, sculpt, other
            gc.collect()

    memory_note = "CUDA max_memory_allocated" if device.type == "cuda" else "process RSS sampled every 1 ms"
    print(f"\nimg/s: medians; MiB: peak above the resident weights and optimizer state ({memory_note})")
    groups = ("train img/s", "sample img/s", "train MiB", "sample MiB")
    widths = (28, 28, 18, 18)
    print(f"{'':20s}" + "".join(f"| {name:^{width}s} " for name, width in zip(groups, widths, strict=True)))
    pair_names = f"{'sculpt':>8s}{'diffusers':>10s}"
    print(f"{'model':5s} {'mode':14s}" + f"| {pair_names}{'ratio':>10s} " * 2 + f"| {pair_names} " * 2)
    print("-" * (20 + sum(width + 3 for width in widths)))
    lines = []
    for model, mode, (sculpt, other) in results:
        train = [args.batch / statistics.median(side.train_s) for side in (sculpt, other)]
        sample = [args.batch / statistics.median(side.sample_s) for side in (sculpt, other)]
        print(
            f"{model:5s} {str(mode):14s}"
            f"| {train[0]:8.1f}{train[1]:10.1f}{train[0] / train[1]:9.2f}x "
            f"| {sample[0]:8.1f}{sample[1]:10.1f}{sample[0] / sample[1]:9.2f}x "
            f"| {sculpt.train_mb:8.0f}{other.train_mb:10.0f} | {sculpt.sample_mb:8.0f}{other.sample_mb:10.0f}"
        )
        for what in ("train", "sample"):
            lines.append(summary(model, mode, what, sculpt, other, args.batch))
    print()
    print("\n".join(lines))
    print(f"\nmachine: {machine(device, args.threads if cpu else 0)}")
    print(f"wall time of the measurements: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
