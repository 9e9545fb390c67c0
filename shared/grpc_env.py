"""gRPC core settings that take effect only when set before ``grpc`` is first imported.

gRPC core reads ``GRPC_EXPERIMENTS`` once, when the ``grpc`` package loads; setting it later
changes nothing. So ``services/__init__.py`` calls ``apply()``: Python runs it before any
service module imports ``grpc``. Clients (ours and the benchmarks' peers) keep gRPC's
defaults.
"""

from __future__ import annotations

import os
import sys

#: The EventEngine client and listener (on by default since grpcio 1.6x) do socket I/O on
#: their own thread pool and hand each completion to the asyncio thread: two extra thread
#: wake-ups per message. With them off, grpc.aio polls on its own poller thread as before.
#: Measured on 2 cores, echo through router + batcher + worker, four alternating pairs of
#: runs: c=1 406 -> 482 req/s, c=32 1 379 -> 1 688 req/s, and ~15 % less CPU per request
#: in the router and the batcher. A user's own GRPC_EXPERIMENTS wins.
EXPERIMENTS = "-event_engine_client,-event_engine_listener"


def apply() -> None:
    """Put the data path's gRPC core settings in the environment (if grpc is not loaded yet)."""
    if "grpc" not in sys.modules:
        os.environ.setdefault("GRPC_EXPERIMENTS", EXPERIMENTS)
