"""A service process's memory (shared/heap.py): it reuses the memory large messages pass
through, and full collections leave what start-up built alone."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

glibc_only = pytest.mark.skipif(
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


@glibc_only
def test_copies_of_a_large_batch_stop_faulting_pages_in_once_the_heap_keeps_them() -> None:
    _, untuned = faults_per_round("untuned")
    applied, tuned = faults_per_round("tuned")
    assert applied == "True"
    assert untuned > 300  # each 1.5 MiB copy lands in memory just given back: ~380 pages
    assert tuned < untuned / 10


@glibc_only
def test_the_users_own_malloc_settings_win() -> None:
    applied, _ = faults_per_round("tuned", MALLOC_TRIM_THRESHOLD_="131072")
    assert applied == "False"


#: A router's start-up objects, then what a full collection still walks once they are frozen,
#: and whether garbage made afterwards (a reference cycle) is still collected.
FREEZE = """
import gc, weakref
import services.router.app
from shared import heap
before = len(gc.get_objects())
frozen = heap.freeze_startup_objects()
class Node:
    pass
a, b = Node(), Node()
a.peer, b.peer = b, a
gone = weakref.ref(a)
del a, b
gc.collect()
print(before, frozen, len(gc.get_objects()), gone() is None)
"""


def test_full_collections_after_start_up_walk_only_what_requests_made() -> None:
    # Each full collection walked all of start-up's objects: 48-78 ms pauses of the router's
    # event loop under MiniLM at c=32, every request in flight waiting them out.
    out = subprocess.run(
        [sys.executable, "-c", FREEZE], cwd=ROOT, capture_output=True, text=True, timeout=120,
        check=True,
    ).stdout.split()
    before, frozen, walked, collected = int(out[0]), int(out[1]), int(out[2]), out[3]
    assert before > 20_000  # modules, descriptors, gRPC/OTel/NATS machinery
    assert frozen >= before * 0.9
    assert walked < 1_000
    assert collected == "True"
