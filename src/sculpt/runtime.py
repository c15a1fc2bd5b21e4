"""Process-wide settings that make PyTorch faster on a CPU.

glibc's malloc serves every allocation above a threshold (128 KiB, rising on its own to at
most 32 MiB) with fresh ``mmap`` pages and gives them back on ``free``; it also returns
free memory at the top of the heap to the system. A training step allocates and frees
tens of activations of 16-64 MiB each, so every step the kernel maps and zero-fills them
again: about 290,000 page faults per step for a 7M-parameter UNet at batch 64 on 32x32
images, and a training step 1.2x slower (benchmarks/README.md, ``throughput.py``).
Raising both thresholds keeps freed memory in the process, where the next step reuses it.
The price is that the process keeps its peak footprint, which the next step needs anyway.

``sculpt`` commands and ``sculpt.train.train`` on a CPU call ``tune_cpu_allocator`` once;
``SCULPT_MALLOC_TUNING=0`` in the environment turns it off.
"""

from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["PRECISION_CHOICES", "PRECISIONS", "autocast", "native_bf16", "resolve_precision", "tune_cpu_allocator"]

#: Precisions the training loop and the samplers run at: autocast dtypes, fp32 meaning none.
PRECISIONS = ("fp32", "bf16", "fp16")
#: What a user may ask for: a precision, or ``auto`` (bf16 where the hardware has it, else fp32).
PRECISION_CHOICES = ("auto", *PRECISIONS)

#: /proc/cpuinfo flags of CPUs with native bfloat16 arithmetic (AVX512-BF16 dot products, AMX tiles).
_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: Allocations below this come from the heap and are reused; above it, mmap as before.
MMAP_THRESHOLD = 1 << 30
#: Free memory at the top of the heap beyond this is returned to the system (mallopt takes an int).
TRIM_THRESHOLD = 2**31 - 1

_applied: bool | None = None


def tune_cpu_allocator() -> bool:
    """Keep freed memory in the process for reuse (glibc only). Returns whether it is in effect.

    Idempotent and safe to call anywhere: a no-op (False) on other C libraries, other
    systems, or when ``SCULPT_MALLOC_TUNING=0``.
    """
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("SCULPT_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt, nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; older glibc caps the mmap threshold at 32 MiB.
    mmap_ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) or mallopt(_M_MMAP_THRESHOLD, 32 << 20)
    trim_ok = mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    _applied = bool(mmap_ok and trim_ok)
    return _applied


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_bf16(device) -> bool:
    """Whether `device` computes in bfloat16 natively: a CUDA GPU with bf16 (Ampere and newer), or a
    CPU with AVX512-BF16 or AMX, where oneDNN's bf16 convolutions and matmuls are fast.

    Elsewhere bf16 is emulated (slower than float32 on most CPUs), so ``auto`` stays float32.
    """
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if all(callable(check) for check in checks):
        try:
            return any(check() for check in checks)
        except RuntimeError:  # a build without the CPU capability probes
            pass
    return bool(_cpu_flags() & set(_CPU_BF16_FLAGS))


def resolve_precision(precision: str, device) -> str:
    """``auto`` -> ``bf16`` where `device` has native bfloat16 (`native_bf16`), else ``fp32``; others as given."""
    if precision not in PRECISION_CHOICES:
        raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISION_CHOICES)}")
    if precision != "auto":
        return precision
    return "bf16" if native_bf16(device) else "fp32"


def autocast(device, precision: str):
    """The context a network runs under at ``precision``: ``torch.autocast`` to bf16 / fp16, or nothing.

    Autocast lowers matmuls and convolutions only; the samplers' arithmetic and the losses
    stay in float32. ``auto`` is resolved for `device` first (`resolve_precision`).
    """
    import contextlib

    import torch

    precision = resolve_precision(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(torch.device(device).type, dtype=dtype)
