"""The NATS side of a service: connect with backoff, publish/subscribe with trace context, KV.

Trace context (W3C traceparent) rides in NATS message headers: injected on publish and
extracted on consume, so a span started from an event joins the trace that caused it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import NoServersError
from nats.js.api import KeyValueConfig
from nats.js.errors import BucketNotFoundError
from nats.js.kv import KeyValue
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

from shared.events import Event, encode

log = logging.getLogger(__name__)
tracer = trace.get_tracer("infermesh.bus")


class _Link:
    """Connection facts the client callbacks update: closing, and a reconnect generation."""

    def __init__(self) -> None:
        self.closing = False
        self.generation = 0
        self.changed = asyncio.Event()

    def reconnected(self) -> None:
        self.generation += 1
        self.changed.set()
        self.changed = asyncio.Event()


class Bus:
    """A connected NATS client plus the mesh's conventions on top of it."""

    def __init__(self, nc: Client, name: str, link: _Link | None = None) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.name = name
        self._buckets: dict[str, KeyValue] = {}
        self._link = link or _Link()

    @property
    def generation(self) -> int:
        """Increases on every reconnect: watchers and consumers re-subscribe when it moves."""
        return self._link.generation

    async def wait_reconnect(self, generation: int) -> None:
        """Return once the connection was re-established after `generation`."""
        while self._link.generation == generation:
            await self._link.changed.wait()

    @classmethod
    async def connect(
        cls,
        servers: str,
        name: str,
        max_payload_hint: int = 8 * 1024 * 1024,
        attempts: int = 0,
        on_reconnect: Callable[[], Awaitable[None]] | None = None,
    ) -> Bus:
        """Connect, retrying with capped exponential backoff (attempts=0: forever).

        Each failed attempt logs one line; no traceback reaches the user.
        """
        delay = 0.2
        attempt = 0
        link = _Link()
        urls = [s.strip() for s in servers.split(",") if s.strip()]

        async def reconnected() -> None:
            log.info("nats: reconnected to %s", nc.connected_url)
            link.reconnected()
            if on_reconnect is not None:
                await on_reconnect()

        async def disconnected() -> None:
            if link.closing:  # close() drains on purpose: not an outage
                return
            log.warning("nats: disconnected; data path keeps serving on the last known state")

        async def error_cb(exc: Exception) -> None:
            log.debug("nats: %s", exc)

        while True:
            attempt += 1
            try:
                nc = await nats.connect(
                    urls,
                    name=name,
                    connect_timeout=2,
                    reconnect_time_wait=0.5,
                    # Fail the first connect fast so this loop logs and backs off; once
                    # connected, reconnect forever (set below).
                    max_reconnect_attempts=1,
                    reconnected_cb=reconnected,
                    disconnected_cb=disconnected,
                    error_cb=error_cb,
                    allow_reconnect=True,
                )
                nc.options["max_reconnect_attempts"] = -1
                return cls(nc, name, link)
            except (NoServersError, OSError, TimeoutError) as exc:
                if attempts and attempt >= attempts:
                    raise ConnectionError(
                        f"cannot reach NATS at {servers} after {attempt} attempts: {exc}"
                    ) from None
                log.warning(
                    "cannot reach NATS at %s (%s); retrying in %.1fs",
                    servers,
                    type(exc).__name__,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    @property
    def connected(self) -> bool:
        return bool(self.nc.is_connected)

    async def publish(self, subject: str, event: Event) -> None:
        """Publish an event with the current trace context in its headers."""
        headers: dict[str, str] = {}
        propagate.inject(headers)
        await self.nc.publish(subject, encode(event), headers=headers or None)

    async def subscribe(
        self,
        subject: str,
        decoder: msgspec.msgpack.Decoder[Any],
        handler: Callable[[Any], Awaitable[None]],
        queue: str = "",
    ) -> Any:
        """Subscribe; each message is decoded once and handled inside a consumer span."""

        async def on_msg(msg: Msg) -> None:
            ctx = propagate.extract(msg.headers or {})
            token = otel_context.attach(ctx)
            try:
                with tracer.start_as_current_span(
                    f"{msg.subject} receive",
                    kind=trace.SpanKind.CONSUMER,
                    attributes={
                        "messaging.system": "nats",
                        "messaging.destination.name": msg.subject,
                    },
                ):
                    try:
                        event = decoder.decode(msg.data)
                    except msgspec.DecodeError as exc:
                        log.warning("dropping malformed event on %s: %s", msg.subject, exc)
                        return
                    await handler(event)
            finally:
                otel_context.detach(token)

        return await self.nc.subscribe(subject, queue=queue, cb=on_msg)

    async def kv(self, bucket: str, ttl: float | None = None, history: int = 1) -> KeyValue:
        """The KV bucket, created on first use with the given TTL (seconds) and history."""
        if bucket in self._buckets:
            return self._buckets[bucket]
        try:
            kv = await self.js.key_value(bucket)
        except BucketNotFoundError:
            kv = await self.js.create_key_value(
                KeyValueConfig(bucket=bucket, ttl=ttl, history=history)
            )
        self._buckets[bucket] = kv
        return kv

    async def close(self) -> None:
        """Drain subscriptions and close; safe to call twice."""
        if self.nc.is_closed:
            return
        self._link.closing = True
        try:
            await asyncio.wait_for(self.nc.drain(), timeout=5)
        except (TimeoutError, nats.errors.ConnectionClosedError):
            await self.nc.close()
