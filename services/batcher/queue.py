"""One target's queue: Triton-style dynamic batching with priorities, deadlines and a bound.

A batch is dispatched when it reaches ``max_batch_size`` or a preferred size, or when the
oldest request has waited ``max_delay_ms``, and only while a dispatch slot is free: when
every worker is busy, requests accumulate and the next batch is larger, so batch size
follows load. When no batch of the target is in flight at all, what is queued goes at once
(an idle worker gains nothing from the wait). Saturated (the policy's ``gather``), a slot
that comes free waits, up to the delay, for its even share of the callers of a closed loop
instead. Requests whose deadline passed, or whose caller went away, are never run.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from opentelemetry.trace import SpanContext

from services.batcher.tracing import current_context
from shared import metrics
from shared.errors import DeadlineExceeded, ResourceExhausted
from shared.pb.infermesh.v1 import common_pb2


@dataclass(frozen=True)
class Policy:
    """How batches are formed for one target (written by the controller, applied here)."""

    max_batch_size: int
    max_delay_ms: float
    preferred_sizes: tuple[int, ...] = ()
    capacity: int = 1024
    gather: bool = False
    """Wait the delay for a full batch even with none in flight (``BatchPolicy.gather``)."""
    limit: int = 0
    """The model's own largest batch (0: ``max_batch_size``): a gathering slot takes its
    share of the callers (``TargetQueue._gather``) up to this, not the cap."""


@dataclass(order=True)
class Pending:
    """A queued request: ordered by priority (higher first), then arrival."""

    sort_key: tuple[int, int]
    item: common_pb2.WorkItem = field(compare=False)
    future: asyncio.Future[Outcome] = field(compare=False)
    enqueued: float = field(compare=False)
    deadline: float = field(compare=False)  # time.monotonic(); inf = none
    span_context: SpanContext | None = field(default=None, compare=False)
    dispatched: float = field(default=0.0, compare=False)
    rows: int = field(default=1, compare=False)
    """Samples this request adds to a batch (texts, or the batch dimension of its tensors)."""


def row_count(item: common_pb2.WorkItem) -> int:
    """How many samples a request carries: batch sizes count samples, as in Triton."""
    if item.texts:
        return len(item.texts)
    for t in item.inputs:
        if t.shape:
            return max(1, int(t.shape[0]))
    return 1


@dataclass
class Outcome:
    """What a request's future resolves to."""

    result: common_pb2.WorkResult
    queue_ms: float
    exec_ms: float
    worker: str
    batch_size: int


Dispatch = Callable[[str, list[Pending]], Awaitable[None]]


def even_share(callers: int, slots: int, limit: int) -> int:
    """One slot's batch in a saturated closed loop: its even share of the callers."""
    return min(limit, max(1, math.ceil(callers / max(1, slots))))


class TargetQueue:
    """Forms batches for one target and hands them to dispatch()."""

    def __init__(
        self, target: str, policy: Policy, dispatch: Dispatch, slots: Callable[[], int]
    ) -> None:
        self.target = target
        self.policy = policy
        self._dispatch = dispatch
        self._slots = slots
        self._heap: list[Pending] = []
        self._seq = itertools.count()
        self._arrived = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._first_arrival = 0.0
        self._rows = 0
        self.inflight = 0
        self._inflight_rows = 0
        # (when, rows) of each batch that ended and gave its slot back, oldest first: in a
        # closed loop those callers are what a gathering slot waits for.
        self._freed: deque[tuple[float, int]] = deque(maxlen=64)
        self._tasks: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._heap)

    def set_policy(self, policy: Policy) -> None:
        """Apply a new policy to a running queue; it shapes the next batch taken."""
        self.policy = policy
        # Wake the loop: a batch waiting on the old delay or size re-checks the new one.
        self._arrived.set()

    def submit(self, item: common_pb2.WorkItem, priority: int, deadline: float) -> Pending:
        """Queue a request; RESOURCE_EXHAUSTED when the queue is at capacity."""
        if len(self._heap) >= self.policy.capacity:
            raise ResourceExhausted(
                f"queue for {self.target!r} is full ({self.policy.capacity} requests); retry later"
            )
        now = time.monotonic()
        if not self._heap:
            self._first_arrival = now
        pending = Pending(
            sort_key=(-priority, next(self._seq)),
            item=item,
            future=asyncio.get_running_loop().create_future(),
            enqueued=now,
            deadline=deadline,
            span_context=current_context(),
            rows=row_count(item),
        )
        heapq.heappush(self._heap, pending)
        self._rows += pending.rows
        metrics.QUEUE_DEPTH.labels(self.target).set(len(self._heap))
        self._arrived.set()
        return pending

    def _ready_size(self) -> int:
        # Sizes are in samples (rows), not requests: a request of 32 texts fills 32.
        n = self._rows
        p = self.policy
        if n >= p.max_batch_size:
            return p.max_batch_size
        fits = [s for s in p.preferred_sizes if s <= n]
        return max(fits) if fits else 0

    async def run(self) -> None:
        """Form and dispatch batches forever."""
        while True:
            while not self._heap:
                self._arrived.clear()
                await self._arrived.wait()
            while self.inflight >= max(1, self._slots()):
                self._slot_freed.clear()
                await self._slot_freed.wait()
            size = await self._wait_formed()
            batch = self._take(size)
            if batch:
                self._start(batch)

    async def _wait_formed(self) -> int:
        # Wait for a full or preferred batch, at most until the oldest request's delay is up.
        # With nothing in flight the worker is idle: waiting would only add latency, so the
        # batch goes now. Under load batches are in flight, and the delay lets them grow.
        # Saturated (``gather``), the idle slot is waiting for callers on their way back.
        if not self.policy.gather:
            self._freed.clear()  # only a gathering slot reads them
            if self.inflight == 0:
                return 0
        elif self._freed:
            return await self._gather(*self._freed.popleft())
        while self._heap and not self._ready_size():
            # Read the policy each pass: set_policy() wakes this wait with a new delay.
            due = self._first_arrival + self.policy.max_delay_ms / 1000.0
            left = due - time.monotonic()
            if left <= 0:
                return 0
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), timeout=left)
            except TimeoutError:
                return 0
        return 0

    async def _gather(self, freed_at: float, freed_rows: int) -> int:
        """Saturated: wait for this slot's share of the callers; the batch's size.

        In a closed loop that holds the model full, the callers are those of the batches
        that ended and are on their way back, those of the batches still running, and
        whoever was already queued when this slot came free (left behind by an earlier
        batch). Each slot's batch is an even share of them (at most the model's limit),
        which keeps the slots' groups even whatever the controller's estimate: its cap,
        from Little's N, misses the callers in transit, and a cap of 15 for 32 callers left
        two behind every cycle. Cutting at the cap with the delay counted from the oldest
        queued request made one straggler end the gather at once or take a returning
        caller's seat, and that caller was left behind in turn (MiniLM at c=32: 8 % of the
        requests in broken batches of 4-12, queue p99 75-86 ms). The delay runs from when
        the slot came free.
        """
        p = self.policy
        limit = p.limit or p.max_batch_size
        due = max(freed_at, self._first_arrival) + p.max_delay_ms / 1000.0
        while True:
            behind = sum(q.rows for q in self._heap if q.enqueued < freed_at)
            returning = freed_rows + sum(rows for _, rows in self._freed)
            want = even_share(returning + self._inflight_rows + behind, self._slots(), limit)
            left = due - time.monotonic()
            if self._rows >= want or left <= 0:
                return want
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), timeout=left)
            except TimeoutError:
                return want

    def _take(self, size: int = 0) -> list[Pending]:
        size = size or self._ready_size() or self.policy.max_batch_size
        now = time.monotonic()
        batch: list[Pending] = []
        rows = 0
        while self._heap and rows < size:
            if batch and rows + self._heap[0].rows > size:
                break  # the next request would overfill the batch: it leads the next one
            p = heapq.heappop(self._heap)
            self._rows -= p.rows
            if p.future.done():  # caller gone or timed out: never execute it
                continue
            if p.deadline <= now:
                p.future.set_exception(
                    DeadlineExceeded(
                        f"deadline passed after {(now - p.enqueued) * 1e3:.1f} ms "
                        f"in the queue for {self.target!r}"
                    )
                )
                continue
            p.dispatched = now
            batch.append(p)
            rows += p.rows
        self._first_arrival = min((p.enqueued for p in self._heap), default=now)
        metrics.QUEUE_DEPTH.labels(self.target).set(len(self._heap))
        return batch

    def _start(self, batch: list[Pending]) -> None:
        self.inflight += 1
        rows = sum(p.rows for p in batch)
        self._inflight_rows += rows
        metrics.BATCH_SIZE.labels(self.target).observe(rows)
        task = asyncio.get_running_loop().create_task(self._dispatch(self.target, batch))
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._done(t, rows))

    def _done(self, task: asyncio.Task[None], rows: int) -> None:
        self._tasks.discard(task)
        self.inflight -= 1
        self._inflight_rows -= rows
        self._freed.append((time.monotonic(), rows))
        self._slot_freed.set()

    def fail_all(self, exc: BaseException) -> None:
        """Answer every queued request with exc (shutdown)."""
        while self._heap:
            p = heapq.heappop(self._heap)
            self._rows -= p.rows
            if not p.future.done():
                p.future.set_exception(exc)
