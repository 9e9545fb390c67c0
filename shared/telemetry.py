"""Tracing and logging setup: one call per process, before anything makes spans.

Spans go to OTLP/gRPC when OTEL_EXPORTER_OTLP_ENDPOINT is set and nowhere otherwise (the
SDK still creates them, so trace ids propagate and tests can attach an in-memory exporter).
"""

from __future__ import annotations

import logging
import os
import sys

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

_provider: TracerProvider | None = None


def setup_logging(service: str, level: str = "INFO") -> None:
    """One line per record, naming the service; no tracebacks for expected conditions."""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format=f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    # nats-py logs every reconnect attempt with a traceback at ERROR; our callbacks say it once.
    logging.getLogger("nats").setLevel(logging.CRITICAL)


def setup_tracing(service: str) -> TracerProvider:
    """Install the process's tracer provider (idempotent; the first service name wins)."""
    global _provider
    if _provider is not None:
        return _provider
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    _provider = provider
    return provider


def flush(timeout_ms: int = 5_000) -> None:
    """Export what is buffered (called last in the shutdown sequence)."""
    if _provider is not None:
        _provider.force_flush(timeout_ms)
