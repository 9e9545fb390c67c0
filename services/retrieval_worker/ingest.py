"""Applying the durable ingest stream to a collection: pull, upsert/delete, flush, ack.

Consumer model: one *ephemeral* pull consumer per (worker, collection), created at
``last_applied_seq + 1`` from the collection's manifest, filtered to
``infermesh.ingest.<collection>``, acknowledged with AckPolicy.ALL after each flush commits.
The manifest, not the server, is the source of truth for the position: it is written in the
same commit as the vectors (so it can never run ahead of or behind what is on disk), a worker
whose disk was wiped replays everything, and a dead worker leaves no durable consumer behind
(the server removes an ephemeral one after ``inactive_threshold``). After a crash or a NATS
reconnect the consumer is simply created again from the manifest; messages the engine has
already seen are ignored by their sequence, so replaying too much is harmless.

Flushes (fsync + manifest) run when the stream has nothing more for us, when ``flush_rows``
rows are pending, or ``flush_interval_s`` after the first unflushed message, whichever comes
first. An untrained collection trains on its first ``max(39 * nlist, 1000)`` rows (the engine's
rule); a smaller collection trains on what it has once the stream stayed quiet for
``QUIET_S`` and at least ``nlist`` rows arrived, so small collections become searchable too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import msgspec
import nats.errors
import numpy as np
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from services.retrieval_worker.holdings import Held
from shared.bus import Bus
from shared.errors import InfermeshError
from shared.events import INGEST_STREAM
from shared.ingestlog import (
    IngestDelete,
    IngestUpsert,
    ensure_stream,
    ingest_decoder,
    subject_of,
    upsert_rows,
)

log = logging.getLogger(__name__)

#: NATS trouble that ends one subscription; the loop subscribes again from the manifest.
_NATS_TROUBLE = (nats.errors.Error, OSError, TimeoutError)
#: How long the stream must stay quiet before a small untrained collection trains anyway.
QUIET_S = 2.0


class IngestApplier:
    """Keeps one held collection current with its subject of the ingest stream."""

    def __init__(
        self,
        bus: Bus,
        held: Held,
        *,
        fetch: int,
        flush_rows: int,
        flush_interval_s: float,
    ) -> None:
        self._bus = bus
        self._held = held
        self._fetch = fetch
        self._flush_rows = flush_rows
        self._interval = flush_interval_s
        self._unflushed_rows = 0
        self._unflushed_since = 0.0
        self._sample: list[np.ndarray] = []  # vectors seen while untrained (idle training)
        self._sample_rows = 0
        self.skipped = 0
        """Messages that could not be applied (malformed); logged, never retried."""

    @property
    def name(self) -> str:
        return self._held.spec.name

    async def run(self) -> None:
        """Consume until the collection is dropped; after NATS trouble, resubscribe."""
        while not self._held.dropped:
            generation = self._bus.generation
            try:
                sub = await self._subscribe()
            except _NATS_TROUBLE as exc:
                log.debug("ingest of %s: cannot subscribe (%s); retrying", self.name, exc)
                await asyncio.sleep(0.5)
                continue
            try:
                await self._consume(sub, generation)
            except InfermeshError:
                if self._held.dropped:  # dropped while a batch was being applied
                    return
                raise
            except _NATS_TROUBLE as exc:
                log.info("ingest of %s interrupted (%s); resuming from the manifest",
                         self.name, type(exc).__name__)
                await asyncio.sleep(0.2)
            finally:
                with contextlib.suppress(*_NATS_TROUBLE):
                    await sub.unsubscribe()

    async def _subscribe(self) -> object:
        await ensure_stream(self._bus.js)
        col = self._held.collection
        config = ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=col.last_applied_seq + 1,
            ack_policy=AckPolicy.ALL,
            # Redelivery only matters if a fetch was lost; the engine ignores repeats.
            ack_wait=300.0,
            max_ack_pending=1_000_000,
            inactive_threshold=60.0,
        )
        return await self._bus.js.pull_subscribe(
            subject_of(self.name), stream=INGEST_STREAM, config=config
        )

    async def _consume(self, sub: object, generation: int) -> None:
        unacked: Msg | None = None
        last_seq = 0
        idle_since = time.monotonic()
        while self._bus.generation == generation and not self._held.dropped:
            try:
                msgs: list[Msg] = await sub.fetch(self._fetch, timeout=0.25)  # type: ignore[attr-defined]
            except nats.errors.TimeoutError:
                msgs = []
            if msgs:
                last_seq = msgs[-1].metadata.sequence.stream
                rows = await asyncio.to_thread(self._apply, msgs)
                if not self._unflushed_rows and not unacked:
                    self._unflushed_since = time.monotonic()
                self._unflushed_rows += rows
                unacked = msgs[-1]
            idle = not msgs or msgs[-1].metadata.num_pending == 0
            if msgs:
                idle_since = time.monotonic()
            # Idle training only once the stream stayed quiet: a bulk load in progress
            # pauses between requests, and training on its first chunk would hurt recall.
            quiet = not msgs and time.monotonic() - idle_since >= QUIET_S
            due = unacked is not None and (
                idle
                or quiet
                or self._unflushed_rows >= self._flush_rows
                or time.monotonic() - self._unflushed_since >= self._interval
            )
            if due and unacked is not None:
                if await asyncio.to_thread(self._flush, last_seq, quiet):
                    await unacked.ack()
                    unacked = None
                    self._unflushed_rows = 0
            if idle and not self._held.caught_up.is_set():
                log.info("collection %s caught up at seq %d (%d vectors)", self.name,
                         self._held.collection.last_applied_seq,
                         self._held.collection.describe().count)
                self._held.caught_up.set()

    def _apply(self, msgs: list[Msg]) -> int:
        """Hand each message to the engine with its stream sequence (runs in a thread)."""
        col = self._held.collection
        rows = 0
        for msg in msgs:
            seq = msg.metadata.sequence.stream
            try:
                event = ingest_decoder.decode(msg.data)
                match event:
                    case IngestUpsert():
                        ids, vectors, payloads = upsert_rows(event)
                        if col.upsert(ids, vectors, payloads, seq=seq):
                            rows += ids.size
                            if not col.trained:
                                self._sample.append(vectors)
                                self._sample_rows += ids.size
                    case IngestDelete():
                        ids = np.frombuffer(event.ids, dtype="<i8")
                        col.delete(ids, seq=seq, missing_ok=True)
                        rows += ids.size
            except (msgspec.DecodeError, InfermeshError, ValueError) as exc:
                # A message no replay can apply would wedge the collection forever: skip it,
                # loudly. The router validates before appending, so this means a foreign writer.
                self.skipped += 1
                log.error("collection %s: skipping stream message %d: %s", self.name, seq, exc)
        return rows

    def _flush(self, seq: int, quiet: bool) -> bool:
        """Commit what is pending through ``seq``; False while too few rows to train on."""
        col = self._held.collection
        if col.flush(seq):
            if col.trained:
                self._sample.clear()
                self._sample_rows = 0
            return True
        if col.trained or not quiet or self._sample_rows < col.spec.nlist:
            return col.last_applied_seq >= seq
        # A small collection: the stream is idle and the engine's rule will not be met soon.
        col.train(np.concatenate(self._sample))
        self._sample.clear()
        self._sample_rows = 0
        return col.flush(seq)
