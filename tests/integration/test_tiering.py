"""Tiering over real NATS: skewed searches promote blocks, placement survives restarts.

One retrieval worker with a small warm budget (about two of its eight blocks), the tiering
service in-process with short periods, searches sent to the worker over gRPC with nprobe=1 at
the centroids of two chosen blocks, so those blocks take (nearly) all reads.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import numpy as np
from tests_support import eventually

from services.retrieval_worker.blocks import Tier
from services.retrieval_worker.collection import Collection
from shared.bus import Bus
from shared.cli.status import read as read_status
from shared.events import TIERING_MOVE, TierMove, tier_move_decoder
from shared.pb.infermesh.v1 import retrieval_worker_pb2, retrieval_worker_pb2_grpc
from shared.tensors import from_numpy, to_numpy

from .mesh import Running, start_batcher, start_retrieval, start_router, start_tiering
from .test_retrieval_path import Admin, unit

POPULAR = (5, 6)
WARM_BUDGET = 100_000  # bytes: ~36 KB per block here, so the popular two fit, not all eight
WORKER = {"instance": "rw0", "access_period_s": 0.2, "warm_budget_bytes": WARM_BUDGET}
TIERING = {"tiering_period_s": 0.3, "half_life_s": 5.0}


@asynccontextmanager
async def tiered_mesh(nats_url: str, tmp: Path) -> AsyncIterator[dict[str, Running]]:
    """Worker + batcher + router with a 4000-vector collection "docs" (8 blocks), no tiering."""
    parts: dict[str, Running] = {}
    try:
        parts["rw0"] = await start_retrieval(nats_url, tmp / "rw0", **WORKER)
        parts["batcher"] = await start_batcher(nats_url, tmp)
        parts["router"] = await start_router(nats_url, tmp)
        admin = Admin(parts["router"].endpoint)
        await admin.create("docs")
        await admin.upsert("docs", np.arange(4000), unit(4000, seed=3))
        await eventually(lambda: admin.count_is("docs", 4000), timeout=30, what="ingest applied")
        yield parts
    finally:
        for name in reversed(list(parts)):
            await parts[name].stop()


def collection(worker: Running) -> Collection:
    return worker.service.holdings.get("docs").collection  # type: ignore[attr-defined,no-any-return]


def skewed_queries(col: Collection) -> np.ndarray:
    """Queries at the centroids of the popular blocks' lists (nprobe=1 reads only those)."""
    lists = [b * col.spec.lists_per_block + j for b in POPULAR
             for j in range(col.spec.lists_per_block)]
    return np.ascontiguousarray(col.centroids[lists], dtype=np.float32)


async def search(endpoint: str, q: np.ndarray, nprobe: int = 1) -> np.ndarray:
    async with grpc.aio.insecure_channel(endpoint) as channel:
        stub = retrieval_worker_pb2_grpc.RetrievalWorkerStub(channel)
        reply = await stub.Search(retrieval_worker_pb2.SearchRequest(
            collection="docs", queries=from_numpy("queries", q), k=5, nprobe=nprobe),
            timeout=30)
    return to_numpy(reply.ids, 10**6)


@asynccontextmanager
async def load(endpoint: str, q: np.ndarray) -> AsyncIterator[None]:
    """Keep searching ``q`` in the background."""
    async def loop() -> None:
        while True:
            await search(endpoint, q)
            await asyncio.sleep(0.01)

    task = asyncio.get_running_loop().create_task(loop())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def popular_are_warm(col: Collection) -> bool:
    placement = col.placement()
    return all(placement[b] is Tier.WARM for b in POPULAR)


async def test_skewed_searches_get_their_blocks_promoted_to_warm_within_the_budget(
    nats_server, tmp_path: Path
) -> None:
    async with tiered_mesh(nats_server.url, tmp_path) as mesh:
        worker = mesh["rw0"]
        col = collection(worker)
        # the default placement filled the warm budget in block order: the popular are cold
        assert [col.placement()[b] for b in POPULAR] == [Tier.COLD, Tier.COLD]
        q = skewed_queries(col)
        probe = unit(200, seed=9)
        before = await search(worker.endpoint, probe, nprobe=16)
        tiering = await start_tiering(nats_server.url, tmp_path, **TIERING)
        try:
            async with load(worker.endpoint, q):
                await eventually_sync_true(lambda: popular_are_warm(col), 20, "popular warm")
                bus = await Bus.connect(nats_server.url, name="status")
                try:
                    async def status_shows_warm_hits() -> bool:
                        snap = await read_status(bus)
                        mine = [t for t in snap.tiers if t.worker == "rw0"]
                        return bool(mine) and mine[0].hit_share.get("warm", 0) > 0.9 and (
                            0 < mine[0].tier_bytes["warm"] <= WARM_BUDGET)
                    await eventually(status_shows_warm_hits, timeout=20, what="status")
                    snap = await read_status(bus)
                finally:
                    await bus.close()
        finally:
            await tiering.stop()
        assert sum(n for b, n in col.block_bytes().items()
                   if col.placement()[b] is Tier.WARM) <= WARM_BUDGET
        status = next(t for t in snap.tiers if t.worker == "rw0")
        assert status.gpu is False and status.tier_bytes["hot"] == 0
        assert any("->warm" in m for m in status.recent_moves)
        # moves changed where blocks live, never what a search returns
        after = await search(worker.endpoint, probe, nprobe=16)
        np.testing.assert_array_equal(after, before)


async def test_a_restarted_tiering_service_recovers_placement_and_moves_nothing(
    nats_server, tmp_path: Path
) -> None:
    async with tiered_mesh(nats_server.url, tmp_path) as mesh:
        worker = mesh["rw0"]
        col = collection(worker)
        q = skewed_queries(col)
        async with load(worker.endpoint, q):
            tiering = await start_tiering(nats_server.url, tmp_path, **TIERING)
            controller = tiering.service.controller  # type: ignore[attr-defined]
            await eventually_sync_true(
                lambda: popular_are_warm(col) and not controller.pending, 20, "settled")
            revision = controller.revision
            await tiering.stop()
            placed = col.placement()
            moves: list[TierMove] = []
            bus = await Bus.connect(nats_server.url, name="watch")
            try:
                async def seen(move: TierMove) -> None:
                    moves.append(move)

                await bus.subscribe(f"{TIERING_MOVE}.>", tier_move_decoder, seen)
                tiering = await start_tiering(nats_server.url, tmp_path, **TIERING)
                try:
                    controller = tiering.service.controller  # type: ignore[attr-defined]
                    # ten planning rounds after the restart, over the worker's live reports
                    await eventually_sync_true(
                        lambda: "rw0" in controller.last_report and controller.rounds >= 10,
                        30, "ten rounds")
                    # decisions resume from the KV: revisions never go backwards
                    assert controller.revision == revision > 0
                finally:
                    await tiering.stop()
            finally:
                await bus.close()
        assert moves == []
        assert col.placement() == placed


async def test_with_tiering_stopped_searches_keep_working_and_a_restarted_worker_keeps_its_tiers(
    nats_server, tmp_path: Path
) -> None:
    async with tiered_mesh(nats_server.url, tmp_path) as mesh:
        worker = mesh["rw0"]
        col = collection(worker)
        probe = unit(100, seed=5)
        before = await search(worker.endpoint, probe, nprobe=16)
        async with load(worker.endpoint, skewed_queries(col)):
            tiering = await start_tiering(nats_server.url, tmp_path, **TIERING)
            await eventually_sync_true(lambda: popular_are_warm(col), 20, "popular warm")
            await tiering.stop()
        placed = col.placement()
        np.testing.assert_array_equal(await search(worker.endpoint, probe, nprobe=16), before)
        await worker.stop()
        mesh["rw0"] = worker = await start_retrieval(nats_server.url, tmp_path / "rw0", **WORKER)
        col = collection(worker)
        # placement comes back from the KV (the tiering service is down: nothing else could)
        await eventually_sync_true(lambda: col.placement() == placed, 10, "placement restored")
        np.testing.assert_array_equal(await search(worker.endpoint, probe, nprobe=16), before)


async def eventually_sync_true(check: object, timeout: float, what: str) -> None:
    """Poll a synchronous predicate until true."""
    async def once() -> bool:
        return bool(check())  # type: ignore[operator]

    await eventually(once, timeout=timeout, what=what)
