"""Many calls over one long-lived bidi stream per peer: the data path's hops.

On these machines a grpc.aio unary call costs ~0.5 ms and a message on an open stream about
half that; through router -> batcher -> worker a chain of unary calls added ~1.2 ms more than
the same chain of streams (measured with bare servers). So the internal hops that carry every
request (Batcher.SubmitStream, InferenceWorker.ExecuteStream) keep one stream open per peer
and match answers to calls by a ``call_id`` the caller sets.

Messages are bundles (``SubmitCalls``/``SubmitAnswers``, ...): a caller sends, in one message,
every call that queued while its previous write was in flight, and a server answers, in one
message, every call that finished meanwhile. Nothing waits on a timer, so one call alone
goes at once; under load a stream message (a write, a read, a poller wake-up at each end)
is paid once for many calls. A bundle stays under ``bundle_budget(max_message_bytes)``; a
larger call goes alone.

What a stream has no room for travels in each call: the deadline (``deadline_unix_ms`` of
each item; the receiver refuses expired work), the trace context (``trace_context``, W3C
headers; the receiver opens a SERVER span per message under the sender's CLIENT span), and
the per-call metrics (recorded per message under the unary method's name).

Failure and drain: a draining server sends a closing notice (an answer with call_id 0) and
keeps answering; the caller then sends new calls elsewhere and half-closes, and the stream
ends OK once every call on it is answered. A call still unanswered when its stream ends (a
dead peer, a broken link) fails :class:`PeerGone`, which callers treat as "try another
replica", as a unary call that could not reach its peer: the work is idempotent (a batch, a
search) and may run again elsewhere.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import grpc
from opentelemetry import propagate, trace

from shared import metrics
from shared.errors import DeadlineExceeded, InfermeshError, RPCError, status_of
from shared.rpc import Channels, target_of
from shared.status_codes import (
    error_fields,
    name_of,
    peer_ended_under_a_write,
    peer_unreachable,
)

log = logging.getLogger(__name__)
tracer = trace.get_tracer("infermesh.streams")


class Tagged(Protocol):
    """A message that carries a call id and a trace context map."""

    call_id: int
    trace_context: Any


class Answer(Protocol):
    call_id: int


Req = TypeVar("Req", bound=Tagged)
Resp = TypeVar("Resp", bound=Answer)
In = TypeVar("In")
Out = TypeVar("Out")


#: call_id of the closing notice a draining server sends; callers number calls from 1.
CLOSING = 0

#: Calls (answers) packed into one stream message stop growing past this many bytes (or
#: half the gRPC message limit, when that is smaller): big enough that small calls share.
BUNDLE_BYTES = 4 << 20


def bundle_budget(max_message_bytes: int) -> int:
    """Bytes of calls one bundle may carry under a gRPC message limit (a call alone may not
    fit it anyway: then it fails as it would unbundled)."""
    return max(1, min(BUNDLE_BYTES, max_message_bytes // 2))


class PeerGone(InfermeshError):
    """The stream to a peer ended before answering this call: the peer did not run it here.

    Callers send the call to another replica (and forget this one until it heartbeats).
    """

    status = grpc.StatusCode.UNAVAILABLE

    def __init__(self, endpoint: str, reason: str) -> None:
        super().__init__(f"{endpoint}: {reason}")
        self.endpoint = endpoint


@dataclass
class _Open:
    """One incarnation of the stream: its call, outbox and unanswered calls."""

    call: Any
    outbox: asyncio.Queue[Any]
    pending: dict[int, asyncio.Future[Any]] = field(default_factory=dict)
    reader: asyncio.Task[None] | None = None


class CallStream(Generic[Req, Resp]):
    """Calls to one peer over one bidi stream, reopened when it ends.

    ``open`` starts the stream method with a request iterator (e.g. ``stub.SubmitStream``);
    ``bundle`` packs calls into one of its messages (e.g. ``SubmitCalls``, field ``calls``);
    its answers come in the field ``answers``. ``method`` is the unary method the calls stand
    for ("infermesh.v1.Batcher/Submit"), used for the CLIENT span when ``tracing`` is on;
    ``hop`` names the peer in errors.
    """

    def __init__(
        self,
        endpoint: str,
        open: Callable[[AsyncIterator[Any]], Any],
        bundle: Callable[..., Any],
        method: str,
        hop: str,
        tracing: bool = False,
        max_bytes: int = BUNDLE_BYTES,
    ) -> None:
        self.endpoint = endpoint
        self._open_call = open
        self._bundle = bundle
        self._max_bytes = max_bytes
        self._method = method
        self._hop = hop
        self._tracing = tracing
        self._ids = itertools.count(1)
        self._live: _Open | None = None
        self._closed = False

    def _ensure(self) -> _Open:
        live = self._live
        if live is None:
            outbox: asyncio.Queue[Any] = asyncio.Queue()
            calls = _bundles(outbox, lambda batch: self._bundle(calls=batch), self._max_bytes)
            live = _Open(call=self._open_call(calls), outbox=outbox)
            live.reader = asyncio.get_running_loop().create_task(
                self._read(live), name=f"stream {self._method} {self.endpoint}"
            )
            self._live = live
        return live

    async def call(self, request: Req, timeout: float) -> Resp:
        """Send request and wait for its answer, at most timeout seconds.

        Raises PeerGone (try another replica), DeadlineExceeded, or RPCError (the stream
        failed with the peer's own status).
        """
        if self._closed:
            raise PeerGone(self.endpoint, "stream closed")
        wait: float | None = None if math.isinf(timeout) else timeout
        live = self._ensure()
        call_id = next(self._ids)
        request.call_id = call_id
        future: asyncio.Future[Resp] = asyncio.get_running_loop().create_future()
        live.pending[call_id] = future
        try:
            with self._client_span(request):
                live.outbox.put_nowait(request)
                return await asyncio.wait_for(future, wait)
        except TimeoutError:
            raise DeadlineExceeded(
                f"deadline of {timeout * 1e3:.0f} ms passed waiting for {self._hop} {self.endpoint}"
            ) from None
        finally:
            live.pending.pop(call_id, None)

    @contextmanager
    def _client_span(self, request: Req) -> Iterator[None]:
        # The stream's own span would cover its whole life; each message gets the span a
        # unary call would have had, and carries its context to the peer.
        if not self._tracing:
            yield
            return
        with tracer.start_as_current_span(
            f"/{self._method}",
            kind=trace.SpanKind.CLIENT,
            attributes={"rpc.system": "grpc", "server.address": self.endpoint},
        ):
            propagate.inject(request.trace_context)
            yield

    async def _read(self, live: _Open) -> None:
        failure: Exception = PeerGone(self.endpoint, "stream ended")
        try:
            while True:
                message = await live.call.read()
                if message is grpc.aio.EOF:
                    failure = PeerGone(self.endpoint, f"{self._hop} ended the stream")
                    break
                for answer in message.answers:
                    if answer.call_id == CLOSING:
                        # The peer drains: new calls go to a new stream (or another
                        # replica); this one ends once the calls on it are answered.
                        if self._live is live:
                            self._live = None
                        live.outbox.put_nowait(None)
                        continue
                    future = live.pending.pop(answer.call_id, None)
                    if future is not None and not future.done():
                        future.set_result(answer)
        except grpc.aio.AioRpcError as err:
            failure = _stream_failure(err, self.endpoint, self._hop)
        except asyncio.CancelledError:
            failure = PeerGone(self.endpoint, "stream closed")
        finally:
            if self._live is live:
                self._live = None
            live.outbox.put_nowait(None)
            for future in live.pending.values():
                if not future.done():
                    future.set_exception(failure)
            live.pending.clear()

    async def close(self) -> None:
        """End the stream (after the calls in flight); later calls fail PeerGone."""
        self._closed = True
        live = self._live
        if live is None:
            return
        live.outbox.put_nowait(None)
        if live.reader is not None:
            try:
                await asyncio.wait_for(asyncio.shield(live.reader), 5.0)
            except TimeoutError:
                live.call.cancel()
                live.reader.cancel()


class Streams(Generic[Req, Resp]):
    """One CallStream per peer endpoint for one stream method, closed with the channels."""

    def __init__(
        self,
        channels: Channels,
        stub_type: type,
        stream_method: str,
        bundle: Callable[..., Any],
        method: str,
        hop: str,
    ) -> None:
        self._channels = channels
        self._stub_type = stub_type
        self._stream_method = stream_method
        self._bundle = bundle
        self._method = method
        self._hop = hop
        self._streams: dict[str, CallStream[Req, Resp]] = {}
        channels.on_close(self.close)

    def get(self, endpoint: str) -> CallStream[Req, Resp]:
        stream = self._streams.get(endpoint)
        if stream is None:
            stub = self._channels.stub(endpoint, self._stub_type)
            stream = self._streams[endpoint] = CallStream(
                endpoint,
                getattr(stub, self._stream_method),
                self._bundle,
                self._method,
                self._hop,
                tracing=self._channels.transport.tracing,
                max_bytes=bundle_budget(self._channels.transport.max_message_bytes),
            )
        return stream

    async def close(self) -> None:
        streams, self._streams = list(self._streams.values()), {}
        await asyncio.gather(*(s.close() for s in streams))


def _stream_failure(err: grpc.aio.AioRpcError, endpoint: str, hop: str) -> Exception:
    code = err.code()
    if peer_unreachable(err) or code == grpc.StatusCode.CANCELLED:
        return PeerGone(endpoint, f"{hop} unreachable ({err.details() or code.name})")
    if peer_ended_under_a_write(err):
        # The peer answered what it read and ended the stream (a drain) while a message of
        # ours was on its way: the calls still pending here never reached it.
        return PeerGone(endpoint, f"{hop} ended the stream under a write")
    return RPCError.from_aio(err, hop)


async def _bundles(
    outbox: asyncio.Queue[Any], bundle: Callable[[list[Any]], Any], max_bytes: int
) -> AsyncIterator[Any]:
    """The stream's messages: each takes every call queued by then (None in the outbox ends it).

    grpc.aio pulls the next message only when the previous write is done, so what queued
    during a write leaves together in the next one.
    """
    while (first := await outbox.get()) is not None:
        calls, ended = _take_ready(outbox, first)
        for message in packed(calls, bundle, max_bytes):
            yield message
        if ended:
            return


def _take_ready(queue: asyncio.Queue[Any], first: Any) -> tuple[list[Any], bool]:
    """first and everything queued behind it now, and whether a None (the end) came next."""
    items = [first]
    while not queue.empty():
        item = queue.get_nowait()
        if item is None:
            return items, True
        items.append(item)
    return items, False


def packed(
    messages: list[Any], bundle: Callable[[list[Any]], Any], max_bytes: int = BUNDLE_BYTES
) -> Iterator[Any]:
    """messages in order, as few bundles as keep each under max_bytes (one over it alone)."""
    if len(messages) == 1:
        yield bundle(messages)
        return
    batch: list[Any] = []
    size = 0
    for m in messages:
        n = m.ByteSize()
        if batch and size + n > max_bytes:
            yield bundle(batch)
            batch, size = [], 0
        batch.append(m)
        size += n
    if batch:
        yield bundle(batch)


# -- the server side ---------------------------------------------------------------------


@dataclass(frozen=True)
class PerMessage:
    """What a stream server records per message: metrics and a span under the unary name."""

    service: str
    method: str
    """The unary method the messages stand for, e.g. "infermesh.v1.Batcher/Submit"."""
    answer_code: Callable[[Any], int] = lambda _resp: 0
    """The wire status an answer carries inline (0 = OK)."""
    answer: Callable[..., Any] | None = None
    """The answer message type (with ``call_id``): a data-path stream's closing notice and,
    unless the server gives its own, each failed call's inline error are built from it."""
    bundle: Callable[..., Any] | None = None
    """The answers envelope (e.g. ``SubmitAnswers``): incoming messages are bundles of calls
    (field ``calls``) and answers go out bundled (field ``answers``). None: one each."""


async def answer_concurrently(
    requests: AsyncIterator[In],
    handle: Callable[[In], Awaitable[Out]],
    error_reply: Callable[[In, BaseException], Out | None] | None = None,
    *,
    stopping: asyncio.Event | None = None,
    per_message: PerMessage | None = None,
    bundle_bytes: int = BUNDLE_BYTES,
) -> AsyncIterator[Any]:
    """Serve a bidi stream: every request runs concurrently, answers go out as they finish.

    With ``per_message.bundle`` (e.g. ``SubmitAnswers``) each incoming message is a bundle of
    calls (field ``calls``) and every answer ready when the stream can write goes out in one
    bundle (at most ``bundle_bytes`` of answers unless one is larger); without it, one request
    and one answer per message.

    ``error_reply`` turns one request's failure into an inline answer (the stream stays open);
    when it returns None the error ends the stream instead (it reaches the ErrorInterceptor).
    By default the answer is ``per_message.answer(call_id=..., error_code=...,
    error_message=...)``. Unexpected errors are logged with their traceback first.
    When ``stopping`` is set (the service drains) the stream sends a closing notice (an
    answer with call_id CLOSING) and goes on answering until the caller half-closes;
    server.stop(grace) bounds the wait.
    """
    bundle = per_message.bundle if per_message is not None else None
    answer = per_message.answer if per_message is not None else None
    if error_reply is None and answer is None:
        raise ValueError("answer_concurrently needs error_reply or per_message.answer")

    def reply_error(req: Any, exc: BaseException) -> Any:
        if error_reply is not None:
            return error_reply(req, exc)
        assert answer is not None
        return answer(call_id=req.call_id, **error_fields(exc))
    out: asyncio.Queue[Any] = asyncio.Queue()
    tasks: set[asyncio.Task[None]] = set()
    loop = asyncio.get_running_loop()
    notice = object()

    async def one(req: In) -> None:
        start = time.perf_counter()
        code = "OK"
        with _server_span(per_message, req) as span:
            try:
                reply: Any = await handle(req)
                if per_message is not None:
                    code = name_of(per_message.answer_code(reply))
            except Exception as exc:
                if not isinstance(exc, InfermeshError):
                    log.exception("stream request failed")
                code = status_of(exc).name
                reply = reply_error(req, exc)
                if reply is None:
                    reply = exc
            if span is not None:
                span.set_attribute("rpc.grpc.status_code", code)
        if per_message is not None:
            metrics.observe_request(
                per_message.service,
                per_message.method.rsplit("/", 1)[-1],
                target_of(req),
                code,
                start,
            )
        await out.put(reply)

    async def read() -> None:
        async for message in requests:
            for req in message.calls if bundle is not None else (message,):
                task = loop.create_task(one(req))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        await asyncio.gather(*list(tasks), return_exceptions=True)
        await out.put(None)

    async def watch() -> None:
        assert stopping is not None
        await stopping.wait()
        await out.put(notice)

    reader = loop.create_task(read())
    watcher = None
    if stopping is not None and answer is not None:
        watcher = loop.create_task(watch())
    try:
        while (first := await out.get()) is not None:
            items, ended = _take_ready(out, first) if bundle is not None else ([first], False)
            answers: list[Any] = []
            failure: BaseException | None = None
            for item in items:
                if isinstance(item, BaseException):
                    failure = item  # it ends the stream, after the answers before it
                    break
                answers.append(answer(call_id=CLOSING) if item is notice else item)  # type: ignore[misc]
            if bundle is None:
                for a in answers:
                    yield a
            else:
                for message in packed(answers, lambda batch: bundle(answers=batch), bundle_bytes):
                    yield message
            if failure is not None:
                raise failure
            if ended:
                break
    finally:
        reader.cancel()
        if watcher is not None:
            watcher.cancel()
        for task in list(tasks):
            task.cancel()


@contextmanager
def _server_span(per_message: PerMessage | None, request: Any) -> Iterator[trace.Span | None]:
    """A SERVER span for one message, child of the sender's span (when it sent a context)."""
    carrier = getattr(request, "trace_context", None) if per_message is not None else None
    if not carrier:
        yield None
        return
    assert per_message is not None
    parent = propagate.extract(dict(carrier))
    with tracer.start_as_current_span(
        f"/{per_message.method}", context=parent, kind=trace.SpanKind.SERVER
    ) as span:
        yield span

