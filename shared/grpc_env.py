"""gRPC core settings of the data path: experiments, and the options of every channel.

gRPC core reads ``GRPC_EXPERIMENTS`` once, when the ``grpc`` package loads; setting it later
changes nothing. So ``services/__init__.py`` calls ``apply()``: Python runs it before any
service module imports ``grpc``. Clients (ours and the benchmarks' peers) keep gRPC's
default experiments. ``message_options`` is what every server and channel of ours sets
(services, the Python client, the CLI); this module imports nothing heavy, so the client
takes it without the services' plumbing.
"""

from __future__ import annotations

import os
import sys
from typing import Any

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


#: Socket reads of 64 KiB at least (aiming at 256 KiB, up to 4 MiB) instead of gRPC's
#: adaptive estimate, which starts at 8 KiB and follows the small messages that make up most
#: of the traffic, so a large one (a batch of 1 024 queries is 1.5 MiB) arrived in dozens of
#: reads and sometimes waited a round trip more. Measured on 2 cores, one grpc.aio hop:
#: 400 KiB 0.85 -> 0.45 ms, 1.5 MiB 0.7-2.8 (bimodal) -> 0.6-0.8 ms; 200-byte calls at c=32
#: unchanged (6.0-7.0 k/s both). Channel and server options; ours and our client's.
READ_CHUNK_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.experimental.tcp_read_chunk_size", 256 << 10),
    ("grpc.experimental.tcp_min_read_chunk_size", 64 << 10),
    ("grpc.experimental.tcp_max_read_chunk_size", 4 << 20),
)


def message_options(max_bytes: int) -> list[tuple[str, Any]]:
    """Channel/server options that bound message sizes in both directions and read them in
    large chunks (``READ_CHUNK_OPTIONS``): every server and channel of the mesh, the Python
    client's and the CLI's."""
    return [
        ("grpc.max_send_message_length", max_bytes),
        ("grpc.max_receive_message_length", max_bytes),
        *READ_CHUNK_OPTIONS,
    ]
