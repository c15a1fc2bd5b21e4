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

__all__ = ["PRECISIONS", "autocast", "tune_cpu_allocator"]

#: Precisions the training loop and the samplers accept: autocast dtypes, fp32 meaning none.
PRECISIONS = ("fp32", "bf16", "fp16")

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


def autocast(device, precision: str):
    """The context a network runs under at ``precision``: ``torch.autocast`` to bf16 / fp16, or nothing.

    Autocast lowers matmuls and convolutions only; the samplers' arithmetic and the losses
    stay in float32.
    """
    import contextlib

    import torch

    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(torch.device(device).type, dtype=dtype)
