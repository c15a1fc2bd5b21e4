"""sculpt.runtime: the CPU allocator settings do what they claim (fewer page faults), in fresh processes."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc malloc only"
)

# Allocate, touch and free a 48 MiB tensor (above glibc's 32 MiB mmap ceiling) 20 times,
# as a training step does with its large activations; print whether tuning is on and the
# minor page faults of the loop.
PROBE = """
import resource, sys, torch
from sculpt.runtime import tune_cpu_allocator
applied = tune_cpu_allocator() if sys.argv[1] == "tune" else False
torch.ones(12 << 20)  # warm up the allocator once
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    x = torch.ones(12 << 20)
    del x
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def probe(mode: str, **env: str) -> tuple[bool, int]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True, env={**os.environ, **env}
    ).stdout.split()
    return out[0] == "True", int(out[1])


def test_tuned_allocator_reuses_freed_memory_instead_of_faulting_it_in_again():
    applied, tuned = probe("tune")
    _, default = probe("default")
    pages = 20 * (48 << 20) // os.sysconf("SC_PAGE_SIZE")
    assert applied
    assert default > 0.8 * pages  # every allocation is mapped and zero-filled afresh
    assert tuned <= 0.1 * pages  # faulted in at most once or twice, then reused


def test_tuning_can_be_turned_off():
    applied, faults = probe("tune", SCULPT_MALLOC_TUNING="0")
    assert not applied and faults > 0.8 * 20 * (48 << 20) // os.sysconf("SC_PAGE_SIZE")
