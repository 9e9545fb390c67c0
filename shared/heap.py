"""A service process's memory: the C heap that large messages pass through, and the
Python collector's view of what was built at start-up.

**The C heap: keep the memory that large messages pass through.**

By default glibc serves an allocation of more than 128 KiB (a threshold that adapts upwards)
with a fresh ``mmap`` and gives it back on ``free``, and gives the top of its heap back once
more than twice that is free. A search batch of 1 024 x 384 floats is 1.5 MiB, and each hop
copies it a few times (the message's bytes, numpy, protobuf's copy into a bundle), so each
copy landed in memory just given back and faulted its pages in again: 900-1 300 minor
faults per request in the router and in the batcher. Serving every allocation up to 32 MiB
from the heap and keeping up to 128 MiB of it free removes them: measured on 2 cores
through router + batcher + worker, 1 024-query searches, two alternating pairs: the mesh's
time outside the worker's scan 9.6 / 11.3 -> 6.9 / 7.7 ms, the router's CPU per request
6.0 -> 3.5-4.0 ms, 1.18x / 1.29x the queries per second. What a process keeps is bounded
by its own peak (at most 128 MiB above what it uses at a time).

glibc only (musl and others keep their own behaviour). The usual environment variables
(``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``) win over these defaults.

**The collector: leave start-up's objects out of full collections.** A running service
holds a few hundred thousand long-lived container objects (modules, protobuf descriptors,
gRPC, OpenTelemetry and NATS machinery, loaded specs) and its requests make short-lived
ones; every so often CPython's oldest-generation collection walks all of them, and the
event loop stands still meanwhile. Measured under MiniLM at c=32 on 2 cores: 48-78 ms
pauses in the router and the batcher, 18-28 ms in the worker, a few times a minute each;
every request in flight waits them out, which made most of that run's latency spikes.
``gc.freeze()`` once start-up is done moves what exists then to a permanent generation
the collector no longer walks (as CPython's docs suggest for long-lived servers); what
requests create is still collected as before.
"""

from __future__ import annotations

import ctypes
import gc
import os
import platform

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

#: Allocations up to this size come from the heap (glibc's largest allowed value on 64-bit).
MMAP_THRESHOLD = 32 << 20
#: Free memory the heap keeps at its top before giving it back to the kernel.
TRIM_THRESHOLD = 128 << 20


def keep_large_buffers() -> bool:
    """Tune glibc's malloc as above; whether it applied (False: not glibc, or overridden)."""
    if platform.libc_ver()[0] != "glibc":
        return False
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )


def freeze_startup_objects() -> int:
    """Collect once, then exempt every object alive now from later collections; how many."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
