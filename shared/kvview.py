"""A live, local copy of a JetStream KV bucket, kept current by a watcher.

Used for membership, model specs, batch policies and placement: readers consult the copy
on the data path (no NATS round trip per request) and keep the last known values while
NATS is down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import msgspec
from nats.js.kv import KV_DEL, KV_PURGE

from shared.bus import Bus

log = logging.getLogger(__name__)

T = TypeVar("T")


class KVView(Generic[T]):
    """Decoded values of a KV bucket by key, updated as the bucket changes."""

    def __init__(
        self,
        bus: Bus,
        bucket: str,
        decoder: msgspec.msgpack.Decoder[T],
        ttl_s: float | None = None,
        on_change: Callable[[str, T | None], None] | None = None,
    ) -> None:
        self._bus = bus
        self._bucket = bucket
        self._decoder = decoder
        self._ttl = ttl_s
        self._on_change = on_change
        self.values: dict[str, T] = {}
        self._changed = asyncio.Event()
        self.ready = asyncio.Event()

    async def wait_for(self, predicate: Callable[[], bool], timeout: float) -> None:
        """Wait until predicate() holds after some update; TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        while not predicate():
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"condition on KV {self._bucket} not met in {timeout}s")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=min(left, 0.25))
            except TimeoutError:
                pass

    def _apply(self, key: str, value: T | None) -> None:
        if value is None:
            self.values.pop(key, None)
        else:
            self.values[key] = value
        self._changed.set()
        if self._on_change is not None:
            self._on_change(key, value)

    def _vanished(self, key: str) -> None:
        """A key held here was missing from a re-watch's replay: drop it (views may defer)."""
        self._apply(key, None)

    async def run(self) -> None:
        """Watch the bucket forever; after a reconnect, watch again from the current state.

        A re-watch replays the bucket's current values; keys that vanished meanwhile are
        dropped once the replay is complete, and until then the last copy keeps serving.
        """
        while True:
            generation = self._bus.generation
            try:
                kv = await self._bus.kv(self._bucket, ttl=self._ttl)
                first, last = await self._bus.kv_sequences(self._bucket)
                replayed_at = last if first <= last else 0  # 0: an empty bucket
                watcher = await kv.watchall()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("watch of %s failed (%s); retrying", self._bucket, exc)
                await asyncio.sleep(0.5)
                continue
            consume = asyncio.ensure_future(self._consume(watcher, replayed_at))
            moved = asyncio.ensure_future(self._bus.wait_reconnect(generation))
            try:
                await asyncio.wait({consume, moved}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (consume, moved):
                    task.cancel()
                with contextlib.suppress(Exception):
                    await watcher.stop()
            if consume.done() and not consume.cancelled() and consume.exception() is not None:
                log.debug("watch of %s interrupted: %s", self._bucket, consume.exception())
                await asyncio.sleep(0.5)

    async def _consume(self, watcher: Any, replayed_at: int) -> None:
        """Apply the watcher's entries; the replay is whole at sequence `replayed_at`.

        The watcher's own end-of-replay marker (None) can come early (nats-io/nats.py#842):
        then the keys still in flight would be dropped as vanished and `ready` would be set on
        a partial copy. So the replay ends at the first entry at or past the stream's last
        sequence taken before the watch, or at the marker if that sequence has since expired.
        """
        seen: set[str] | None = set()

        def replayed() -> None:
            nonlocal seen
            if seen is None:
                return
            for key in set(self.values) - seen:
                self._vanished(key)
            seen = None
            self.ready.set()
            self._changed.set()

        if replayed_at == 0:
            replayed()
        async for entry in watcher:
            if entry is None:
                if seen is not None:  # early, unless `replayed_at` expired (TTL) since
                    first, _ = await self._bus.kv_sequences(self._bucket)
                    if first > replayed_at:
                        replayed()
                continue
            if seen is not None:
                seen.add(entry.key)
            if entry.operation in (KV_DEL, KV_PURGE) or not entry.value:
                self._apply(entry.key, None)
            else:
                try:
                    self._apply(entry.key, self._decoder.decode(entry.value))
                except msgspec.DecodeError as exc:
                    log.warning("skipping bad record %s/%s: %s", self._bucket, entry.key, exc)
            if (entry.revision or 0) >= replayed_at:
                replayed()

    async def put(self, key: str, value: Any) -> int:
        """Write a value (an event Struct) to the bucket; returns the revision."""
        from shared.events import encode

        kv = await self._bus.kv(self._bucket, ttl=self._ttl)
        return int(await kv.put(key, encode(value)))
