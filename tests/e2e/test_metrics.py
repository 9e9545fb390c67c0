"""Every service's Prometheus endpoint, scraped after real load through a process mesh."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from shared.cli.supervisor import LocalMesh
from shared.client import Client
from shared.errors import RPCError


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    data = tmp_path_factory.mktemp("mesh")
    mesh = LocalMesh(Path(data), service_env={"inference-worker": {"INFERMESH_MODELS": "echo"}})
    try:
        mesh.start()
        yield mesh
    finally:
        mesh.stop()


def scrape(mesh: LocalMesh, service: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    port = next(c.metrics_port for c in mesh.children if c.service == service)
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    return sum(
        v
        for (n, ls), v in samples.items()
        if n == name and all(dict(ls).get(k) == want for k, want in labels.items())
    )


def test_request_and_batch_metrics_move_with_load(mesh: LocalMesh) -> None:
    before = scrape(mesh, "router")
    with Client(mesh.router_address) as client:
        for i in range(25):
            client.infer("echo", texts=[f"m{i}"])
        for _ in range(3):
            with pytest.raises(RPCError) as info:
                client.infer("nope", texts=["x"])
            assert info.value.status == grpc.StatusCode.NOT_FOUND
    router = scrape(mesh, "router")
    ok = dict(service="router", method="Infer", target="echo", code="OK")
    assert value(router, "infermesh_requests_total", **ok) - value(
        before, "infermesh_requests_total", **ok
    ) == 25
    assert value(router, "infermesh_requests_total", code="NOT_FOUND", target="nope") == 3
    assert value(
        router, "infermesh_request_duration_seconds_count", service="router", target="echo"
    ) >= 25

    batcher = scrape(mesh, "batcher")
    assert value(batcher, "infermesh_requests_total", method="Submit", code="OK") >= 25
    assert value(batcher, "infermesh_batch_size_count", target="echo") >= 1
    assert value(batcher, "infermesh_batch_size_sum", target="echo") >= 25
    assert value(batcher, "infermesh_batch_policy_max_batch_size", target="echo") >= 1
    assert value(batcher, "infermesh_target_slo_seconds", target="echo") == pytest.approx(0.02)
    assert ("infermesh_queue_depth", (("target", "echo"),)) in batcher

    worker = scrape(mesh, "inference-worker")
    assert value(worker, "infermesh_requests_total", method="Execute", code="OK") >= 1


def test_every_service_serves_metrics(mesh: LocalMesh) -> None:
    for service in ("router", "batcher", "inference-worker", "retrieval-worker", "tiering"):
        samples = scrape(mesh, service)
        assert value(samples, "process_resident_memory_bytes") > 0, service
