"""gRPC plumbing every service shares: server factory, error interceptor, channels, health.

``create_server`` is split from ``main()`` (as in grpc's graceful-shutdown example) so tests
bind port 0 and get the real port back. Every server has the health service, reflection, the
OpenTelemetry interceptor (health checks excluded) and the error interceptor that applies the
one exception table in ``shared.errors``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry.instrumentation.grpc import (
    aio_client_interceptors,
    aio_server_interceptor,
    filters,
)

from shared import metrics
from shared.errors import message_of, status_of

log = logging.getLogger(__name__)

HEALTH_SERVICE = health.SERVICE_NAME
#: Trailing metadata key naming the service that produced an error status. Its absence on an
#: UNAVAILABLE means the peer itself was unreachable (connection refused, reset, gone).
ORIGIN_KEY = "infermesh-origin"
_NOT_TRACED = filters.negate(filters.health_check())


def peer_unreachable(err: grpc.aio.AioRpcError) -> bool:
    """Whether an UNAVAILABLE came from the transport (peer gone), not from the peer's logic."""
    if err.code() != grpc.StatusCode.UNAVAILABLE:
        return False
    trailing = err.trailing_metadata() or ()
    return not any(key == ORIGIN_KEY for key, _ in trailing)


def message_options(max_bytes: int) -> list[tuple[str, Any]]:
    """Channel/server options that bound message sizes in both directions."""
    return [
        ("grpc.max_send_message_length", max_bytes),
        ("grpc.max_receive_message_length", max_bytes),
    ]


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Turns any exception from a handler into a defined gRPC status and counts the call.

    Handlers raise ``shared.errors`` types; this is the one place they become a status code
    (never UNKNOWN), and the one place request counts and latencies are recorded.
    """

    def __init__(self, service: str) -> None:
        self._service = service

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(f"/{HEALTH_SERVICE}/"):
            return handler
        method = details.method.rsplit("/", 1)[-1]
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                self._wrap_stream(handler.stream_stream, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    def _wrap_unary(self, fn: Any, method: str) -> Any:
        service = self._service

        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            start = time.perf_counter()
            target = _target_of(request)
            try:
                response = await fn(request, context)
            except grpc.aio.AbortError:
                metrics.observe_request(service, method, target, _code_name(context), start)
                raise
            except Exception as exc:
                code = status_of(exc)
                if code == grpc.StatusCode.INTERNAL:
                    log.exception("internal error in %s", method)
                metrics.observe_request(service, method, target, code.name, start)
                await context.abort(code, message_of(exc), ((ORIGIN_KEY, service),))
            metrics.observe_request(service, method, target, "OK", start)
            return response

        return wrapped

    def _wrap_stream(self, fn: Any, method: str) -> Any:
        service = self._service

        async def wrapped(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                async for response in fn(requests, context):
                    yield response
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                code = status_of(exc)
                if code == grpc.StatusCode.INTERNAL:
                    log.exception("internal error in stream %s", method)
                metrics.observe_request(service, method, "", code.name, time.perf_counter())
                await context.abort(code, message_of(exc))

        return wrapped


def _target_of(request: Any) -> str:
    # Label requests by what they are for, where the message says (model/target/collection).
    for field in ("model", "target", "collection", "model_name"):
        value = getattr(request, field, None)
        if isinstance(value, str) and value:
            return value[:64]
    return ""


def _code_name(context: grpc.aio.ServicerContext) -> str:
    code = context.code()
    return code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"


def create_server(
    service: str,
    host: str,
    port: int,
    register: Sequence[Callable[[grpc.aio.Server], None]],
    service_names: Sequence[str],
    max_message_bytes: int = 64 * 1024 * 1024,
    tracing: bool = True,
) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """Build a grpc.aio server with health, reflection and interceptors; bind host:port.

    Returns (server, bound port, health servicer). The health status starts NOT_SERVING;
    the service sets SERVING once it can do its work.
    """
    interceptors: list[grpc.aio.ServerInterceptor] = []
    if tracing:
        interceptors.append(aio_server_interceptor(filter_=_NOT_TRACED))
    interceptors.append(ErrorInterceptor(service))
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[*message_options(max_message_bytes), ("grpc.so_reuseport", 0)],
    )
    for add in register:
        add(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*service_names, HEALTH_SERVICE, reflection.SERVICE_NAME], server
    )
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind gRPC server to {host}:{port}")
    return server, bound, health_servicer


async def set_serving(health_servicer: health.aio.HealthServicer, serving: bool) -> None:
    """Set the overall health status ("" service) to SERVING or NOT_SERVING."""
    status = (
        health_pb2.HealthCheckResponse.SERVING
        if serving
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    await health_servicer.set("", status)


def channel(
    target: str, max_message_bytes: int = 64 * 1024 * 1024, tracing: bool = True
) -> grpc.aio.Channel:
    """An insecure grpc.aio channel with message limits, keepalive and trace propagation."""
    options = [
        *message_options(max_message_bytes),
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 5_000),
        ("grpc.http2.max_pings_without_data", 0),
        # Reconnect fast after a peer restarts instead of backing off for up to 2 minutes.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 2_000),
    ]
    interceptors = aio_client_interceptors(filter_=_NOT_TRACED) if tracing else None
    return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)


async def check_health(target: str, timeout: float = 1.0) -> bool:
    """Whether the server at target reports SERVING for the overall service."""
    async with grpc.aio.insecure_channel(target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.aio.AioRpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
