"""gRPC plumbing every service shares: server factory, error interceptor, channels, health.

``create_server`` is split from ``main()`` (as in grpc's graceful-shutdown example) so tests
bind port 0 and get the real port back. Every server has the health service, reflection, the
OpenTelemetry interceptor (health checks excluded) and the error interceptor that applies the
one exception table in ``shared.errors``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

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
from shared.grpc_env import message_options
from shared.status_codes import ORIGIN_KEY

log = logging.getLogger(__name__)
T = TypeVar("T")

HEALTH_SERVICE = health.SERVICE_NAME
#: Not traced by the interceptors: health checks, and the data path's long-lived streams,
#: whose messages get one span each instead (shared/streams.py).
_NOT_TRACED = filters.negate(
    filters.any_of(
        filters.health_check(),
        filters.full_method_name("/infermesh.v1.Batcher/SubmitStream"),
        filters.full_method_name("/infermesh.v1.InferenceWorker/ExecuteStream"),
        filters.full_method_name("/infermesh.v1.RetrievalWorker/SearchStream"),
    )
)


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
        deserializer = _tolerant(handler.request_deserializer)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, method),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                self._wrap_stream(handler.stream_stream, method),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    def _wrap_unary(self, fn: Any, method: str) -> Any:
        service = self._service

        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            start = time.perf_counter()
            if isinstance(request, Malformed):
                metrics.observe_request(service, method, "", "INVALID_ARGUMENT", start)
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT, request.message, ((ORIGIN_KEY, service),)
                )
            target = target_of(request)
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
            malformed: list[Malformed] = []

            async def parsed() -> Any:
                # The handler sees the stream end at the first unparsable message; the
                # stream is then answered INVALID_ARGUMENT once its answers so far are out.
                async for request in requests:
                    if isinstance(request, Malformed):
                        malformed.append(request)
                        return
                    yield request

            try:
                async for response in fn(parsed(), context):
                    yield response
                if malformed:
                    metrics.observe_request(
                        service, method, "", "INVALID_ARGUMENT", time.perf_counter()
                    )
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, malformed[0].message)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                code = status_of(exc)
                if code == grpc.StatusCode.INTERNAL:
                    log.exception("internal error in stream %s", method)
                metrics.observe_request(service, method, "", code.name, time.perf_counter())
                await context.abort(code, message_of(exc))

        return wrapped


class Malformed:
    """A request whose bytes did not parse as the method's message type."""

    def __init__(self, message: str) -> None:
        self.message = message


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """deserializer, returning Malformed instead of raising on bytes that do not parse.

    grpc answers a deserializer's exception with UNKNOWN; garbage from a caller is bad input
    (INVALID_ARGUMENT), and the handler wrappers answer it so, naming the message type.
    """
    if deserializer is None:
        return None

    def parse(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except Exception as exc:  # protobuf's DecodeError (and any parser's own error)
            return Malformed(f"request is not a valid message: {message_of(exc)}")

    return parse


def target_of(request: Any) -> str:
    """The metrics label of a request: what it is for, where the message says it."""
    for field in ("model", "target", "collection", "model_name"):
        value = getattr(request, field, None)
        if isinstance(value, str) and value:
            return value[:64]
    return ""


def _code_name(context: grpc.aio.ServicerContext) -> str:
    code = context.code()
    return code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"


class Transport:
    """How this process speaks gRPC: message limit, tracing, TLS/mTLS material.

    TLS is off by default (local runs); with ``tls_cert``/``tls_key`` set, servers listen
    with TLS, and with ``tls_client_auth`` they also require client certificates (mTLS).
    Clients trust ``tls_ca`` and present ``tls_cert``/``tls_key`` (the mesh's services are
    each other's clients, so one certificate per service serves both ways).
    """

    def __init__(
        self,
        max_message_bytes: int = 64 * 1024 * 1024,
        tracing: bool = True,
        tls_ca: bytes | None = None,
        tls_cert: bytes | None = None,
        tls_key: bytes | None = None,
        client_auth: bool = False,
        server_name: str = "",
    ) -> None:
        if bool(tls_cert) != bool(tls_key):
            raise ValueError("TLS needs both a certificate and its key")
        if client_auth and not tls_ca:
            raise ValueError("mTLS (client auth) needs a CA to verify client certificates")
        self.max_message_bytes = max_message_bytes
        self.tracing = tracing
        self.tls_ca = tls_ca
        self.tls_cert = tls_cert
        self.tls_key = tls_key
        self.client_auth = client_auth
        self.server_name = server_name

    @classmethod
    def from_files(
        cls,
        max_message_bytes: int,
        tracing: bool,
        ca: str = "",
        cert: str = "",
        key: str = "",
        client_auth: bool = False,
        server_name: str = "",
    ) -> Transport:
        """Read TLS material from files (empty path = not set)."""

        def read(path: str, what: str) -> bytes | None:
            if not path:
                return None
            try:
                with open(path, "rb") as f:
                    return f.read()
            except OSError as exc:
                raise ValueError(f"cannot read TLS {what} {path}: {exc.strerror}") from None

        return cls(
            max_message_bytes,
            tracing,
            read(ca, "CA"),
            read(cert, "certificate"),
            read(key, "key"),
            client_auth,
            server_name,
        )

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None or self.tls_ca is not None

    def server_credentials(self) -> grpc.ServerCredentials | None:
        if self.tls_cert is None or self.tls_key is None:
            return None
        return grpc.ssl_server_credentials(
            [(self.tls_key, self.tls_cert)],
            root_certificates=self.tls_ca,
            require_client_auth=self.client_auth,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        if not self.tls:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=self.tls_ca,
            private_key=self.tls_key,
            certificate_chain=self.tls_cert,
        )

    def channel(self, target: str) -> grpc.aio.Channel:
        """A channel to target with limits, keepalive, retry budget and trace propagation."""
        options = [
            *message_options(self.max_message_bytes),
            ("grpc.keepalive_time_ms", 20_000),
            ("grpc.keepalive_timeout_ms", 5_000),
            ("grpc.http2.max_pings_without_data", 0),
            # Reconnect fast after a peer restarts instead of backing off for minutes.
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 2_000),
            ("grpc.enable_retries", 1),
            ("grpc.service_config", RETRY_SERVICE_CONFIG),
        ]
        if self.server_name:
            options.append(("grpc.ssl_target_name_override", self.server_name))
        interceptors = aio_client_interceptors(filter_=_NOT_TRACED) if self.tracing else None
        creds = self.channel_credentials()
        if creds is None:
            return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
        return grpc.aio.secure_channel(target, creds, options=options, interceptors=interceptors)


#: Retries only where a call is idempotent (running a batch again, searching again), only on
#: UNAVAILABLE (the call did not reach the peer) and on a CANCELLED the caller did not ask for
#: (a server that shuts down cancels the calls still queued for a handler, grpc/grpc#41785;
#: our own handlers answer CANCELLED only to a caller that already left), and under a budget:
#: retryThrottling stops retrying once failures exceed about 10 % of calls, so an outage does
#: not multiply load.
RETRY_SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [
                    {"service": "infermesh.v1.InferenceWorker", "method": "Execute"},
                    {"service": "infermesh.v1.RetrievalWorker", "method": "Search"},
                    {"service": "infermesh.v1.Batcher", "method": "Submit"},
                    {"service": "infermesh.v1.Router", "method": "Infer"},
                ],
                "retryPolicy": {
                    "maxAttempts": 3,
                    "initialBackoff": "0.01s",
                    "maxBackoff": "0.2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"],
                },
            }
        ],
        "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1},
    }
)


class Channels:
    """One cached channel per peer endpoint, made by the process's Transport."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[tuple[str, type], Any] = {}
        self._closers: list[Callable[[], Awaitable[None]]] = []

    def on_close(self, closer: Callable[[], Awaitable[None]]) -> None:
        """Run closer (e.g. end the streams on these channels) before the channels close."""
        self._closers.append(closer)

    def get(self, endpoint: str) -> grpc.aio.Channel:
        ch = self._channels.get(endpoint)
        if ch is None:
            ch = self._channels[endpoint] = self.transport.channel(endpoint)
        return ch

    def stub(self, endpoint: str, stub_type: type[T]) -> T:
        """A stub of stub_type on the endpoint's channel (cached)."""
        key = (endpoint, stub_type)
        stub = self._stubs.get(key)
        if stub is None:
            stub = self._stubs[key] = stub_type(self.get(endpoint))
        return stub  # type: ignore[no-any-return]

    async def drop(self, endpoint: str) -> None:
        """Close the channel to a peer that went away."""
        ch = self._channels.pop(endpoint, None)
        for key in [k for k in self._stubs if k[0] == endpoint]:
            del self._stubs[key]
        if ch is not None:
            await ch.close()

    async def close(self) -> None:
        for closer in self._closers:
            await closer()
        for ch in self._channels.values():
            await ch.close()
        self._channels.clear()
        self._stubs.clear()


def create_server(
    service: str,
    host: str,
    port: int,
    register: Sequence[Callable[[grpc.aio.Server], None]],
    service_names: Sequence[str],
    max_message_bytes: int = 64 * 1024 * 1024,
    tracing: bool = True,
    transport: Transport | None = None,
) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """Build a grpc.aio server with health, reflection and interceptors; bind host:port.

    Returns (server, bound port, health servicer). The health status starts NOT_SERVING;
    the service sets SERVING once it can do its work. With a TLS transport the port is TLS.
    """
    transport = transport or Transport(max_message_bytes, tracing)
    interceptors: list[grpc.aio.ServerInterceptor] = []
    if transport.tracing:
        interceptors.append(aio_server_interceptor(filter_=_NOT_TRACED))
    interceptors.append(ErrorInterceptor(service))
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[*message_options(transport.max_message_bytes), ("grpc.so_reuseport", 0)],
    )
    for add in register:
        add(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*service_names, HEALTH_SERVICE, reflection.SERVICE_NAME], server
    )
    creds = transport.server_credentials()
    address = f"{host}:{port}"
    bound = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"cannot bind gRPC server to {address}")
    return server, bound, health_servicer


async def health_only_server(
    host: str, port: int, health_servicer: health.aio.HealthServicer
) -> tuple[grpc.aio.Server, int]:
    """A plaintext server with only grpc.health.v1 (k8s probes when the main port is mTLS)."""
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind health port {host}:{port}")
    await server.start()
    return server, bound


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
    """A plaintext channel with the mesh's options (tests and local tools)."""
    return Transport(max_message_bytes, tracing).channel(target)
