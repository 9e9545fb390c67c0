"""Configuration read once from INFERMESH_* environment variables into frozen Structs.

Each service defines its own Struct (``services/<name>/config.py``) that embeds the fields of
``CommonConfig`` and calls ``from_env`` in ``main()``; nothing reads the environment later.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import msgspec

PREFIX = "INFERMESH_"

T = TypeVar("T", bound=msgspec.Struct)


class ConfigError(ValueError):
    """A configuration value is missing or malformed; the message names the variable."""


class CommonConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Settings every service has."""

    nats_url: str = "nats://127.0.0.1:4222"
    """NATS server URL(s), comma separated."""
    grpc_host: str = "127.0.0.1"
    """Address the gRPC server binds (0.0.0.0 in containers)."""
    grpc_port: int = 0
    """gRPC port; 0 picks a free one (tests). Each service sets its own default."""
    advertise_host: str = ""
    """Host other services use to reach this one; empty = grpc_host."""
    advertise_port: int = 0
    """Port other services use to reach this one (a proxy or NAT in front); 0 = the bound port."""
    metrics_port: int = 0
    """Prometheus /metrics HTTP port; 0 = off."""
    data_dir: str = ".infermesh"
    """Where state lives: collections, model cache, JetStream data (local runs)."""
    instance: str = ""
    """Instance id in membership; empty = <host>-<pid>."""
    heartbeat_s: float = 1.0
    """Membership heartbeat period."""
    member_ttl_s: float = 5.0
    """A member that misses heartbeats this long disappears from the live view."""
    grace_s: float = 10.0
    """How long in-flight RPCs may finish on shutdown."""
    max_message_bytes: int = 64 * 1024 * 1024
    """Largest gRPC message accepted or sent."""
    log_level: str = "INFO"
    tls_cert: str = ""
    """PEM certificate of this service: turns TLS on for its gRPC server and its calls."""
    tls_key: str = ""
    """PEM private key of tls_cert."""
    tls_ca: str = ""
    """PEM CA bundle that peers' certificates are checked against."""
    tls_client_auth: bool = False
    """Require client certificates (mTLS) on this service's gRPC port."""
    tls_server_name: str = ""
    """Name to expect in peers' certificates when endpoints are IPs (empty = the host)."""
    health_port: int = 0
    """Plaintext grpc.health.v1-only port for k8s probes when TLS is on (0 = none)."""
    nats_user: str = ""
    nats_password: str = ""
    nats_token: str = ""
    nats_creds: str = ""
    """NATS credentials file (JWT + nkey seed)."""
    nats_nkey_seed: str = ""
    """File holding an nkey seed (nkey auth without JWT)."""
    nats_tls_ca: str = ""
    nats_tls_cert: str = ""
    nats_tls_key: str = ""
    max_nats_payload: int = 8 * 1024 * 1024
    """Largest control-path message this process publishes (the server's max_payload)."""
    tracing: str = "auto"
    """gRPC tracing interceptors: "true", "false", or "auto" = on when
    OTEL_EXPORTER_OTLP_ENDPOINT is set. Without an exporter the spans go nowhere, and the
    interceptors cost ~0.4 ms per hop on 2 cores, so "auto" keeps them off."""

    def tracing_enabled(self, env: Mapping[str, str] | None = None) -> bool:
        """Whether this process runs the tracing interceptors."""
        mode = self.tracing.strip().lower()
        if mode in ("true", "1", "yes", "on"):
            return True
        if mode in ("false", "0", "no", "off"):
            return False
        env = os.environ if env is None else env
        return bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT"))

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)

    def advertised(self, port: int) -> str:
        """The endpoint (host:port) this service announces in membership."""
        host = self.advertise_host or self.grpc_host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        return f"{host}:{self.advertise_port or port}"


def from_env(cls: type[T], env: Mapping[str, str] | None = None, **defaults: Any) -> T:
    """Build a config Struct from INFERMESH_<FIELD> variables over the given defaults."""
    env = os.environ if env is None else env
    raw: dict[str, Any] = dict(defaults)
    for field in msgspec.structs.fields(cls):
        key = PREFIX + field.name.upper()
        if key in env:
            raw[field.name] = env[key]
    try:
        # strict=False converts "8001" -> 8001, "true" -> True, "1.5" -> 1.5.
        return msgspec.convert(raw, cls, strict=False)
    except msgspec.ValidationError as exc:
        # msgspec says "... - at `$.grpc_port`": name the variable instead.
        text = str(exc)
        for field in msgspec.structs.fields(cls):
            text = text.replace(f"`$.{field.name}`", PREFIX + field.name.upper())
        raise ConfigError(f"bad configuration: {text}") from None
