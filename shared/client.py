"""The Python client of the mesh: Router.Infer with numpy in and out.

    with Client("127.0.0.1:8001") as mesh:
        result = mesh.infer("minilm-l6", texts=["hello"])
        result.outputs["embedding"]  # numpy array

Errors arrive as ``shared.errors.RPCError`` with the gRPC status and the server's message.

Many concurrent requests from one process are cheaper on one stream than as unary calls (a
stream message costs the router about half a call)::

    async with AsyncClient("127.0.0.1:8001") as mesh:
        async with mesh.stream() as stream:
            results = await asyncio.gather(*(stream.infer("minilm-l6", texts=[t]) for t in texts))
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import grpc
import numpy as np

from shared.errors import RPCError
from shared.grpc_env import message_options
from shared.pb.infermesh.v1 import common_pb2, router_pb2, router_pb2_grpc
from shared.status_codes import error_from, peer_ended_under_a_write
from shared.tensors import from_numpy, to_numpy


@dataclass
class Result:
    """One answer: outputs by name, per-step timings, and hits for search pipelines."""

    request_id: str
    outputs: dict[str, np.ndarray]
    timings: list[common_pb2.StepTiming]
    hits: list[list[common_pb2.Hit]] = field(default_factory=list)


def build_request(
    model: str = "",
    inputs: Mapping[str, np.ndarray] | None = None,
    texts: Sequence[str] = (),
    *,
    pipeline: str = "",
    collection: str = "",
    k: int = 0,
    nprobe: int = 0,
    priority: int = 0,
    timeout_ms: int = 0,
    request_id: str = "",
    omit_hits: bool = False,
) -> router_pb2.InferRequest:
    """The wire request for these arguments."""
    return router_pb2.InferRequest(
        model=model,
        pipeline=pipeline,
        inputs=[from_numpy(name, np.asarray(a)) for name, a in (inputs or {}).items()],
        texts=list(texts),
        collection=collection,
        k=k,
        nprobe=nprobe,
        priority=priority,
        timeout_ms=timeout_ms,
        request_id=request_id,
        omit_hits=omit_hits,
    )


def parse_response(reply: router_pb2.InferResponse) -> Result:
    """Decode a wire response."""
    return Result(
        request_id=reply.request_id,
        outputs={t.name: to_numpy(t) for t in reply.outputs},
        timings=list(reply.timings),
        hits=[list(h.hits) for h in reply.results],
    )


def _options(max_message_bytes: int, server_name: str) -> list[tuple[str, object]]:
    opts: list[tuple[str, object]] = message_options(max_message_bytes)
    if server_name:
        opts.append(("grpc.ssl_target_name_override", server_name))
    return opts


def _open(
    api: Any,
    target: str,
    max_message_bytes: int,
    creds: grpc.ChannelCredentials | None,
    server_name: str,
) -> Any:
    """A channel from grpc or grpc.aio (``api``): TLS when creds are given, else plaintext."""
    opts = _options(max_message_bytes, server_name)
    if creds:
        return api.secure_channel(target, creds, options=opts)
    return api.insecure_channel(target, options=opts)


def credentials(
    tls_ca: bytes | None = None, tls_cert: bytes | None = None, tls_key: bytes | None = None
) -> grpc.ChannelCredentials | None:
    """TLS credentials for a mesh with TLS (CA to trust; cert+key for mTLS), else None."""
    if not (tls_ca or tls_cert):
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=tls_ca, private_key=tls_key, certificate_chain=tls_cert
    )


class Client:
    """A blocking client over one channel (thread-safe, as grpc channels are)."""

    def __init__(
        self,
        target: str,
        max_message_bytes: int = 64 * 1024 * 1024,
        creds: grpc.ChannelCredentials | None = None,
        server_name: str = "",
    ) -> None:
        self._channel = _open(grpc, target, max_message_bytes, creds, server_name)
        self._stub = router_pb2_grpc.RouterStub(self._channel)

    def infer(
        self, model: str = "", *args: object, timeout: float = 30.0, **kwargs: object
    ) -> Result:
        """Run one request; RPCError on failure."""
        request = build_request(model, *args, **kwargs)  # type: ignore[arg-type]
        try:
            return parse_response(self._stub.Infer(request, timeout=timeout))
        except grpc.RpcError as err:
            raise RPCError(err.details() or err.code().name, err.code()) from None  # type: ignore[attr-defined]

    def list_targets(self, timeout: float = 5.0) -> router_pb2.ListTargetsResponse:
        return self._stub.ListTargets(router_pb2.ListTargetsRequest(), timeout=timeout)  # type: ignore[no-any-return]

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncClient:
    """The asyncio client (grpc.aio) for load generators and services."""

    def __init__(
        self,
        target: str,
        max_message_bytes: int = 64 * 1024 * 1024,
        creds: grpc.ChannelCredentials | None = None,
        server_name: str = "",
    ) -> None:
        self._channel = _open(grpc.aio, target, max_message_bytes, creds, server_name)
        self.stub = router_pb2_grpc.RouterStub(self._channel)

    async def infer(
        self, model: str = "", *args: object, timeout: float = 30.0, **kwargs: object
    ) -> Result:
        request = build_request(model, *args, **kwargs)  # type: ignore[arg-type]
        try:
            return parse_response(await self.stub.Infer(request, timeout=timeout))
        except grpc.aio.AioRpcError as err:
            raise RPCError(err.details() or err.code().name, err.code()) from None

    def stream(self) -> InferStream:
        """Requests multiplexed on one Router.InferStream (opened on first use)."""
        return InferStream(self.stub)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


@dataclass
class _Live:
    """One incarnation of the stream: the call, its reader and the requests awaiting answers."""

    call: Any
    waiting: dict[str, asyncio.Future[router_pb2.InferResponse]] = field(default_factory=dict)
    reader: asyncio.Task[None] | None = None


class InferStream:
    """Concurrent requests on one Router.InferStream; answers matched by request_id.

    ``infer`` takes the arguments of ``AsyncClient.infer``. Each request gets its own answer
    or its own ``RPCError`` (an error ends neither the stream nor the other requests). A
    request id the caller sets must be unique among those in flight; without one, the stream
    numbers them. A stream that breaks fails its pending requests UNAVAILABLE, and the next
    request opens a new one.
    """

    def __init__(self, stub: router_pb2_grpc.RouterStub) -> None:
        self._stub = stub
        self._live: _Live | None = None
        self._ids = itertools.count(1)
        self._write = asyncio.Lock()  # grpc.aio allows one pending write per stream

    def _ensure(self) -> _Live:
        if self._live is None:
            live = self._live = _Live(call=self._stub.InferStream())
            live.reader = asyncio.get_running_loop().create_task(self._read(live))
        return self._live

    async def _read(self, live: _Live) -> None:
        failure = RPCError("the router ended the stream", grpc.StatusCode.UNAVAILABLE)
        try:
            async for reply in live.call:
                future = live.waiting.pop(reply.request_id, None)
                if future is not None and not future.done():
                    future.set_result(reply)
        except grpc.aio.AioRpcError as err:
            if not peer_ended_under_a_write(err):  # else: the router ended it (drain)
                failure = RPCError(err.details() or err.code().name, err.code())
        except asyncio.CancelledError:
            failure = RPCError("stream closed", grpc.StatusCode.CANCELLED)
        finally:
            if self._live is live:
                self._live = None
            for future in live.waiting.values():
                if not future.done():
                    future.set_exception(failure)

    async def infer(
        self, model: str = "", *args: object, timeout: float = 30.0, **kwargs: object
    ) -> Result:
        """Send one request on the stream and wait for its answer (at most timeout s)."""
        request = build_request(model, *args, **kwargs)  # type: ignore[arg-type]
        if not request.timeout_ms:
            request.timeout_ms = max(1, int(timeout * 1000))  # the router's deadline too
        live = self._ensure()
        if not request.request_id:
            request.request_id = f"s{next(self._ids)}"
        elif request.request_id in live.waiting:
            raise ValueError(f"request_id {request.request_id!r} is already in flight")
        future = live.waiting[request.request_id] = (
            asyncio.get_running_loop().create_future()
        )
        try:
            async with self._write:
                await live.call.write(request)
            reply = await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise RPCError(
                f"no answer within {timeout * 1e3:.0f} ms", grpc.StatusCode.DEADLINE_EXCEEDED
            ) from None
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            if future.done() and future.exception() is not None:
                raise future.exception() from None  # type: ignore[misc]
            raise RPCError("the stream to the router broke", grpc.StatusCode.UNAVAILABLE) from None
        finally:
            live.waiting.pop(request.request_id, None)
        if reply.error_code:
            raise error_from(reply.error_code, reply.error_message)
        return parse_response(reply)

    async def close(self) -> None:
        """Half-close after the requests in flight; waits for their answers."""
        live, self._live = self._live, None
        if live is None:
            return
        try:
            await live.call.done_writing()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass  # already broken: the reader has failed what was pending
        if live.reader is not None:
            await live.reader

    async def __aenter__(self) -> InferStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
