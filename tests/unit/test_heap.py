"""A service process reuses the memory large messages pass through (shared/heap.py)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc", reason="the heap tuning applies to glibc's malloc only"
)

#: Copies a 1.5 MiB query batch the way a hop does, and prints the page faults per round.
COPIES = """
import os, resource, sys
import numpy as np
from shared import heap
print(heap.keep_large_buffers() if sys.argv[1] == "tuned" else "untuned")
src = os.urandom(1536 << 10)
def hop():
    a = np.frombuffer(src, dtype=np.float32).copy()
    b = a.tobytes()
    return len(bytes(bytearray(b)) + b"x")
for _ in range(5):
    hop()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    hop()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 50)
"""


def faults_per_round(mode: str, **env: str) -> tuple[str, float]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run(
        [sys.executable, "-c", COPIES, mode], cwd=ROOT, env={**base, **env},
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout.split()
    return out[0], float(out[1])


def test_copies_of_a_large_batch_stop_faulting_pages_in_once_the_heap_keeps_them() -> None:
    _, untuned = faults_per_round("untuned")
    applied, tuned = faults_per_round("tuned")
    assert applied == "True"
    assert untuned > 300  # each 1.5 MiB copy lands in memory just given back: ~380 pages
    assert tuned < untuned / 10


def test_the_users_own_malloc_settings_win() -> None:
    applied, _ = faults_per_round("tuned", MALLOC_TRIM_THRESHOLD_="131072")
    assert applied == "False"
