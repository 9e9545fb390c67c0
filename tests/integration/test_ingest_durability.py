"""Acknowledged ingest survives kill -9 of the retrieval worker process mid-ingest."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import numpy as np
from tests_support import eventually

from shared.cli.procs import Child, free_port, start_service
from shared.cli.supervisor import grpc_serving
from shared.client import AsyncClient

from .mesh import start_batcher, start_router
from .test_retrieval_path import Admin

N = 100_000
DIM = 32
CHUNK = 2_000


def start_worker_process(nats_url: str, data: Path, port: int) -> Child:
    env = {
        "INFERMESH_NATS_URL": nats_url,
        "INFERMESH_GRPC_PORT": str(port),
        "INFERMESH_METRICS_PORT": "0",
        "INFERMESH_DATA_DIR": str(data),
        "INFERMESH_INSTANCE": "rw-proc",
        "INFERMESH_HEARTBEAT_S": "0.2",
        "INFERMESH_MEMBER_TTL_S": "2",
        "INFERMESH_FLUSH_INTERVAL_S": "0.3",
    }
    return start_service("retrieval-worker", env, data / "logs")


async def test_every_acknowledged_vector_is_searchable_exactly_once_after_kill_9(
    nats_server, tmp_path: Path
) -> None:
    rng = np.random.default_rng(7)
    x = rng.standard_normal((N, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    port = free_port()
    worker = start_worker_process(nats_server.url, tmp_path / "rw", port)
    batcher = await start_batcher(nats_server.url, tmp_path)
    router = await start_router(nats_server.url, tmp_path)
    try:
        await eventually(lambda: asyncio.to_thread(grpc_serving, f"127.0.0.1:{port}"),
                         timeout=60, what="worker process serving")
        admin = Admin(router.endpoint)
        await admin.create("durable", dim=DIM, nlist=64)
        acked = 0
        killed = False
        for lo in range(0, N, CHUNK):
            reply = await admin.upsert("durable", np.arange(lo, lo + CHUNK), x[lo : lo + CHUNK])
            assert reply.count == CHUNK
            acked += CHUNK
            if not killed and acked >= 40_000:
                # Kill while the worker is applying: some rows flushed, others not yet.
                await eventually(lambda: _applied_some(admin), timeout=60, what="some applied")
                worker.signal(signal.SIGKILL)
                assert worker.proc.wait(10) == -signal.SIGKILL
                killed = True
        assert killed and acked == N
        worker = start_worker_process(nats_server.url, tmp_path / "rw", port)
        await eventually(lambda: admin.count_is("durable", N), timeout=180, interval=0.5,
                         what="replay after restart")
        async with AsyncClient(router.endpoint) as client:
            ids = []
            for lo in range(0, N, 50_000):
                r = await client.infer(pipeline="search", collection="durable",
                                       inputs={"query": x[lo : lo + 50_000]}, k=2, nprobe=1,
                                       timeout=120)
                ids.append(r.outputs["ids"])
        found = np.concatenate(ids)
        # Each vector finds itself first, and no second copy of itself.
        np.testing.assert_array_equal(found[:, 0], np.arange(N))
        assert not np.any(found[:, 1] == found[:, 0])
        assert (await admin.describe("durable")).count == N
    finally:
        await router.stop()
        await batcher.stop()
        worker.stop(10)


async def _applied_some(admin: Admin) -> bool:
    info = await admin.describe("durable")
    return info.count > 0
