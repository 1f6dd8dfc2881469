"""lorakit.heap: after attach, memory freed at the end of a step is reused by the next without page faults."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc thresholds: Linux only")

# Attach to a tiny model, then run three "steps" that each allocate and touch 24 blocks of 8 MiB (192 MiB, like a
# step's activations) and free them all; print the most minor page faults of the second and third.
_CHILD = r"""
import resource, sys, torch, lorakit
from torch import nn
model = nn.Sequential(nn.Linear(8, 8))
lorakit.attach(model, lorakit.LoraConfig(r=2, target_modules=["0"]))
import lorakit.heap
faults = []
for _ in range(3):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [torch.empty(2 << 20).fill_(1.0) for _ in range(24)]
    del blocks
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(lorakit.heap.keep_freed_memory(), max(faults[1:]))
"""

_PAGES = 24 * (8 << 20) // 4096  # pages touched per round


def _run(keep: str) -> tuple[bool, int]:
    env = {**os.environ, "LORAKIT_KEEP_HEAP": keep}
    out = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, check=True)
    kept, faults = out.stdout.split()
    return kept == "True", int(faults)


def _glibc() -> bool:
    import ctypes

    try:
        ctypes.CDLL(None).gnu_get_libc_version  # noqa: B018
    except AttributeError:
        return False
    return True


@pytest.mark.skipif(not _glibc(), reason="needs glibc")
def test_attach_keeps_freed_memory_so_a_later_step_does_not_fault() -> None:
    kept, faults = _run("1")
    assert kept
    assert faults < _PAGES // 20, f"{faults} page faults for a step whose memory was freed and should be reused"


@pytest.mark.skipif(not _glibc(), reason="needs glibc")
def test_opt_out_leaves_malloc_alone() -> None:
    """With LORAKIT_KEEP_HEAP=0 the thresholds stay glibc's. Whether those fault here depends on where glibc's heap
    top lies (usually 49,120 faults, all 192 MiB; once 2,048), so only the setting is checked."""
    kept, _faults = _run("0")
    assert not kept


def test_keep_freed_memory_is_idempotent() -> None:
    from lorakit import heap

    first = heap.keep_freed_memory()
    assert heap.keep_freed_memory() is first
