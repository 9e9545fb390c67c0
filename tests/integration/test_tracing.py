"""The shape of a request's trace across router, batcher and worker (in-memory exporter)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from tests_support import eventually

from shared.client import AsyncClient

from .mesh import echo_mesh, serves_echo

_EXPORTER = InMemorySpanExporter()


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
        trace.set_tracer_provider(provider)
    _EXPORTER.clear()
    yield _EXPORTER


def _one(spans: list[ReadableSpan], name: str) -> ReadableSpan:
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, f"expected one {name!r}, got {[s.name for s in spans]}"
    return found[0]


async def test_one_request_is_one_connected_trace_from_router_to_model(
    nats_server, tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    async with echo_mesh(nats_server.url, tmp_path, tracing="true") as mesh:
        async with AsyncClient(mesh["router"].endpoint) as client:
            await eventually(lambda: serves_echo(client), what="mesh ready")
            spans.clear()
            await client.infer("echo", texts=["traced"], request_id="traced-1")
        finished = list(spans.get_finished_spans())

    router = _one(finished, "/infermesh.v1.Router/Infer")
    tid = router.context.trace_id
    mine = [s for s in finished if s.context.trace_id == tid]
    by_id = {s.context.span_id: s for s in mine}

    def parent_chain(span: ReadableSpan) -> list[str]:
        names = []
        while span.parent is not None and span.parent.span_id in by_id:
            span = by_id[span.parent.span_id]
            names.append(span.name)
        return names

    submit = next(
        s
        for s in mine
        if s.name == "/infermesh.v1.Batcher/Submit" and s.kind == trace.SpanKind.SERVER
    )
    assert router.name in parent_chain(submit)
    wait = _one(mine, "batcher.queue_wait")
    assert wait.attributes["infermesh.target"] == "echo"
    batch = _one(mine, "batch echo")
    assert submit.context.span_id in {link.context.span_id for link in batch.links}
    assert batch.attributes["infermesh.batch_size"] >= 1
    execute = next(
        s
        for s in mine
        if s.name == "/infermesh.v1.InferenceWorker/Execute" and s.kind == trace.SpanKind.SERVER
    )
    assert batch.name in parent_chain(execute)
    model = _one(mine, "model.execute")
    assert execute.name in parent_chain(model)
    assert model.attributes["infermesh.model"] == "echo"
    assert model.attributes["infermesh.backend"] == "echo"
    # Health checks are not traced.
    assert not [s for s in finished if "grpc.health" in s.name]
