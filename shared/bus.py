"""The NATS side of a service: connect with backoff, publish/subscribe with trace context, KV.

Trace context (W3C traceparent) rides in NATS message headers: injected on publish and
extracted on consume, so a span started from an event joins the trace that caused it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import NoServersError
from nats.js.api import DEFAULT_PREFIX, KeyValueConfig
from nats.js.errors import APIError, BucketNotFoundError, KeyNotFoundError
from nats.js.kv import KeyValue
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

from shared.events import Event, encode

log = logging.getLogger(__name__)
tracer = trace.get_tracer("infermesh.bus")


class NatsAuth:
    """NATS credentials and TLS for nats.connect (user/password, token, nkey, creds file)."""

    def __init__(
        self,
        user: str = "",
        password: str = "",
        token: str = "",
        creds: str = "",
        nkey_seed: str = "",
        tls_ca: str = "",
        tls_cert: str = "",
        tls_key: str = "",
    ) -> None:
        self.user, self.password, self.token = user, password, token
        self.creds, self.nkey_seed = creds, nkey_seed
        self.tls_ca, self.tls_cert, self.tls_key = tls_ca, tls_cert, tls_key

    @classmethod
    def from_config(cls, cfg: Any) -> NatsAuth:
        return cls(
            cfg.nats_user,
            cfg.nats_password,
            cfg.nats_token,
            cfg.nats_creds,
            cfg.nats_nkey_seed,
            cfg.nats_tls_ca,
            cfg.nats_tls_cert,
            cfg.nats_tls_key,
        )

    def options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {}
        if self.user:
            opts["user"], opts["password"] = self.user, self.password
        if self.token:
            opts["token"] = self.token
        if self.creds:
            opts["user_credentials"] = self.creds
        if self.nkey_seed:
            opts["nkeys_seed"] = self.nkey_seed
        if self.tls_ca or self.tls_cert:
            ctx = ssl.create_default_context(cafile=self.tls_ca or None)
            if self.tls_cert:
                ctx.load_cert_chain(self.tls_cert, self.tls_key or None)
            opts["tls"] = ctx
        return opts


class _Link:
    """Connection facts the client callbacks update: closing, and a reconnect generation."""

    def __init__(self) -> None:
        self.closing = False
        self.generation = 0
        self.changed = asyncio.Event()
        #: Wall-clock time of the last reconnect (0 = never reconnected).
        self.reconnected_unix = 0.0
        #: Lost and not yet through reconnected(): the client may already say "connected"
        #: before its reconnect callback runs, and readers must not act on that early.
        self.down = False

    def reconnected(self) -> None:
        self.reconnected_unix = time.time()
        self.down = False
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

    @property
    def reconnected_unix(self) -> float:
        """When the connection was last re-established (0 = never lost)."""
        return self._link.reconnected_unix

    async def wait_reconnect(self, generation: int) -> None:
        """Return once the connection was re-established after `generation`."""
        while self._link.generation == generation:
            await self._link.changed.wait()

    @classmethod
    async def connect(
        cls,
        servers: str,
        name: str,
        attempts: int = 0,
        on_reconnect: Callable[[], Awaitable[None]] | None = None,
        auth: NatsAuth | None = None,
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
            link.down = True
            log.warning("nats: disconnected; data path keeps serving on the last known state")

        last_error: list[str] = []

        async def error_cb(exc: Exception) -> None:
            # Keep the server's own reason (e.g. "Authorization Violation") for our one line.
            last_error[:] = [str(exc) or type(exc).__name__]
            log.debug("nats: %s", exc)

        while True:
            attempt += 1
            try:
                # nats-py can keep retrying a TLS handshake failure on its own; the
                # timeout keeps this loop (and its one-line log) in charge.
                nc = await asyncio.wait_for(
                    nats.connect(
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
                        **(auth.options() if auth else {}),
                    ),
                    timeout=2 * 2 * max(1, len(urls)) + 2,
                )
                nc.options["max_reconnect_attempts"] = -1
                return cls(nc, name, link)
            except (NoServersError, OSError, TimeoutError) as exc:
                reason = last_error[0] if last_error else type(exc).__name__
                if attempts and attempt >= attempts:
                    raise ConnectionError(
                        f"cannot reach NATS at {servers} after {attempt} attempts: {reason}"
                    ) from None
                log.warning(
                    "cannot reach NATS at %s (%s); retrying in %.1fs", servers, reason, delay
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    @property
    def connected(self) -> bool:
        """Connected, and (after an outage) through the reconnect callback."""
        return bool(self.nc.is_connected) and not self._link.down

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

    async def _kv_stream(self, bucket: str, subjects: bool, offset: int = 0) -> dict[str, Any]:
        """The STREAM.INFO reply of a bucket's stream, with one page of its subjects if asked."""
        body = {"subjects_filter": f"$KV.{bucket}.>", "offset": offset} if subjects else {}
        msg = await self.nc.request(
            f"{DEFAULT_PREFIX}.STREAM.INFO.KV_{bucket}", json.dumps(body).encode(), timeout=5
        )
        reply: dict[str, Any] = json.loads(msg.data)
        if "error" in reply:
            APIError.from_error(reply["error"])  # raises the matching NotFoundError etc.
        return reply

    async def kv_sequences(self, bucket: str) -> tuple[int, int]:
        """The first and last stream sequence the bucket holds; first > last when it is empty.

        A watch's own end-of-replay marker can come before buffered or later-numbered entries
        (nats-io/nats.py#842): a replay started now is whole once it reached ``last``.
        """
        state = (await self._kv_stream(bucket, subjects=False))["state"]
        return int(state["first_seq"]), int(state["last_seq"])

    async def kv_items(self, bucket: str, create: bool = True) -> dict[str, bytes]:
        """The bucket's current values by key (deleted keys left out); {} for no bucket.

        Keys come from the stream's subject index (STREAM.INFO with a subjects filter, paged),
        not from ``kv.keys()``: its watcher may end the replay before every key arrived
        (nats-io/nats.py#842), and a restarted service then took a full bucket for an empty one.
        """
        try:
            kv = await self.kv(bucket) if create else await self.js.key_value(bucket)
        except BucketNotFoundError:
            return {}
        prefix = f"$KV.{bucket}."
        keys: list[str] = []
        while True:
            reply = await self._kv_stream(bucket, subjects=True, offset=len(keys))
            page = reply["state"].get("subjects") or {}
            keys.extend(subject[len(prefix) :] for subject in page)
            if not page or len(keys) >= int(reply.get("total", 0)):
                break

        async def value(key: str) -> bytes | None:
            try:
                return (await kv.get(key)).value
            except KeyNotFoundError:  # deleted or purged: its marker keeps the subject listed
                return None

        values = await asyncio.gather(*(value(key) for key in keys))
        return {key: v for key, v in zip(keys, values, strict=True) if v}

    async def close(self) -> None:
        """Drain subscriptions and close; safe to call twice."""
        if self.nc.is_closed:
            return
        self._link.closing = True
        try:
            await asyncio.wait_for(self.nc.drain(), timeout=5)
        except (TimeoutError, nats.errors.Error, OSError):
            # NATS unreachable at shutdown (reconnecting, reset): nothing left to drain to;
            # close the client's side without raising, so the rest of the shutdown runs.
            with contextlib.suppress(nats.errors.Error, OSError, TimeoutError):
                await self.nc.close()
