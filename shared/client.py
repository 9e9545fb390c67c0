"""The Python client of the mesh: Router.Infer with numpy in and out.

    with Client("127.0.0.1:8001") as mesh:
        result = mesh.infer("minilm-l6", texts=["hello"])
        result.outputs["embedding"]  # numpy array

Errors arrive as ``shared.errors.RPCError`` with the gRPC status and the server's message.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import grpc
import numpy as np

from shared.errors import RPCError
from shared.pb.infermesh.v1 import common_pb2, router_pb2, router_pb2_grpc
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
    opts: list[tuple[str, object]] = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]
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

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
