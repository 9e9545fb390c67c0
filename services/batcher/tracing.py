"""Spans of the batcher: one per batch, linked to every request it carries; queue waits.

A batch serves many traces at once, so its span cannot be the child of all of them: it is the
child of the first request's span (so a lone request's trace is one connected tree, router to
model) and *links* to every request it carries (OpenTelemetry's batch pattern); the worker's
spans are its children. Each request's own trace gets a ``batcher.queue_wait`` span
covering the time between arrival and dispatch, so a trace shows where the wait went.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Protocol

from opentelemetry import trace
from opentelemetry.trace import Link, Span, SpanContext

tracer = trace.get_tracer("infermesh.batcher")


class Traced(Protocol):
    """What a queued request carries for tracing."""

    span_context: SpanContext | None
    enqueued: float
    dispatched: float


def current_context() -> SpanContext | None:
    """The caller's span context (None when the caller is not traced)."""
    ctx = trace.get_current_span().get_span_context()
    return ctx if ctx.is_valid else None


def _wall_ns(monotonic_s: float) -> int:
    return time.time_ns() - int((time.monotonic() - monotonic_s) * 1e9)


@contextmanager
def batch_span(target: str, kind: str, batch: Sequence[Traced]) -> Iterator[Span]:
    """The span of one dispatched batch, linked to the requests in it.

    A batch none of whose requests is traced gets no span (there is no trace to join), which
    keeps the untraced data path free of span bookkeeping.
    """
    contexts = [p.span_context for p in batch if p.span_context is not None]
    if not contexts:
        yield trace.INVALID_SPAN
        return
    parent = trace.NonRecordingSpan(contexts[0]) if contexts else trace.INVALID_SPAN
    with tracer.start_as_current_span(
        f"batch {target}",
        context=trace.set_span_in_context(parent),
        links=[Link(c) for c in contexts],
        kind=trace.SpanKind.INTERNAL,
        attributes={
            "infermesh.target": target,
            "infermesh.target_kind": kind,
            "infermesh.batch_size": len(batch),
        },
    ) as span:
        yield span


_BATCH_SEQ = itertools.count(1)
_BATCH_PREFIX = uuid.uuid4().hex[:8]


def next_batch_id() -> str:
    """A batch id unique across replicas: a random process prefix and a counter (a uuid4 per
    batch showed up in the batcher's profile)."""
    return f"{_BATCH_PREFIX}-{next(_BATCH_SEQ):x}"


def record_queue_wait(pending: Traced, target: str, batch_size: int) -> None:
    """Add the request's queue wait as a span in its own trace (after the fact)."""
    if pending.span_context is None or not pending.dispatched:
        return
    span = tracer.start_span(
        "batcher.queue_wait",
        start_time=_wall_ns(pending.enqueued),
        attributes={"infermesh.target": target, "infermesh.batch_size": batch_size},
    )
    span.end(end_time=_wall_ns(pending.dispatched))
