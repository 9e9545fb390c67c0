"""Concurrent searches of one collection leave the router as one batcher Submit.

A hop costs per RPC, not per byte (about 0.25 ms of CPU at each end, more with tracing, on
the 2-core dev machine), so b single-query requests arriving together should not become b
Submits and b queue entries at the batcher. Per search key (collection, k, nprobe,
omit_hits, priority) at most ``max_inflight`` Submits are in flight; a search that arrives
while they are all busy waits for the next one and shares it with every other search that
arrived meanwhile. Nothing waits on a timer: a search with a free slot goes at once, so
batch 1 pays no delay, and under load the Submit size follows the load (as the batcher's
own queue does for Search calls).

A shared Submit's answer is split back by rows; a failed one fails each of its searches;
a search whose caller went away or timed out is dropped before it is sent.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from shared.errors import DeadlineExceeded
from shared.pb.infermesh.v1 import batcher_pb2, common_pb2
from shared.tensors import from_numpy, to_numpy


class SearchKey(NamedTuple):
    """Searches that can share one Submit: same collection, parameters and priority."""

    collection: str
    k: int
    nprobe: int
    omit_hits: bool
    priority: int


@dataclass
class Part:
    """One search's share of a Submit's answer."""

    outputs: list[common_pb2.Tensor]
    hits: list[common_pb2.Hit]
    reply: batcher_pb2.SubmitResponse
    """The shared answer (timings, worker, batch size)."""


#: Sends one Submit of stacked queries [n, dim] for a key (timeout s, request id).
Send = Callable[[SearchKey, np.ndarray, float, str], Awaitable[batcher_pb2.SubmitResponse]]


@dataclass
class _Waiting:
    queries: np.ndarray
    deadline: float  # time.monotonic()
    request_id: str
    future: asyncio.Future[Part] = field(repr=False)


class Coalescer:
    """Shares batcher Submits among concurrent searches with the same key."""

    def __init__(self, send: Send, max_inflight: int = 2, max_rows: int = 4096) -> None:
        """``max_inflight`` Submits per key before searches share one (0: never share)."""
        self._send = send
        self._max_inflight = max_inflight if max_inflight > 0 else 1 << 30
        self._max_rows = max_rows
        self._waiting: dict[SearchKey, list[_Waiting]] = {}
        self._inflight: dict[SearchKey, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def search(
        self, key: SearchKey, queries: np.ndarray, timeout: float, request_id: str = ""
    ) -> Part:
        """Top-k of ``queries`` [n, dim] through a (possibly shared) Submit."""
        future: asyncio.Future[Part] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(key, []).append(
            _Waiting(queries, time.monotonic() + timeout, request_id, future)
        )
        self._pump(key)
        # A caller that times out or goes away cancels its future: _take skips it.
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise DeadlineExceeded(
                f"deadline of {timeout * 1e3:.0f} ms passed searching {key.collection!r}"
            ) from None

    def _pump(self, key: SearchKey) -> None:
        while self._inflight.get(key, 0) < self._max_inflight:
            group = self._take(key)
            if not group:
                return
            self._inflight[key] = self._inflight.get(key, 0) + 1
            task = asyncio.get_running_loop().create_task(self._run(key, group))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _take(self, key: SearchKey) -> list[_Waiting]:
        waiting = self._waiting.get(key)
        group: list[_Waiting] = []
        rows = 0
        while waiting:
            w = waiting[0]
            if w.future.done():
                waiting.pop(0)
                continue
            if group and rows + w.queries.shape[0] > self._max_rows:
                break
            group.append(waiting.pop(0))
            rows += w.queries.shape[0]
        if not waiting:
            self._waiting.pop(key, None)
        return group

    async def _run(self, key: SearchKey, group: list[_Waiting]) -> None:
        try:
            queries = (
                group[0].queries if len(group) == 1 else np.concatenate([w.queries for w in group])
            )
            timeout = max(w.deadline for w in group) - time.monotonic()
            try:
                reply = await self._send(key, queries, timeout, group[0].request_id)
            except Exception as exc:  # not hidden: every search of the Submit gets it
                for w in group:
                    if not w.future.done():
                        w.future.set_exception(exc)
                return
            for w, part in zip(
                group, _split(reply, [w.queries.shape[0] for w in group], key.k), strict=True
            ):
                if not w.future.done():
                    w.future.set_result(part)
        finally:
            self._inflight[key] -= 1
            self._pump(key)


def _split(reply: batcher_pb2.SubmitResponse, rows: list[int], k: int) -> list[Part]:
    """A shared answer's outputs and hits cut back into each search's rows."""
    result = reply.result
    if len(rows) == 1:
        return [Part(list(result.outputs), list(result.hits), reply)]
    outputs = {t.name: to_numpy(t) for t in result.outputs}
    hits = list(result.hits)
    parts = []
    lo = 0
    for n in rows:
        parts.append(
            Part(
                [from_numpy(name, a[lo : lo + n]) for name, a in outputs.items()],
                hits[lo * k : (lo + n) * k] if hits else [],
                reply,
            )
        )
        lo += n
    return parts
