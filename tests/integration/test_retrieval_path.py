"""Collections through the mesh on real NATS/gRPC: create, durable ingest, sharded search."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest
from tests_support import eventually

from shared.client import AsyncClient
from shared.errors import RPCError
from shared.pb.infermesh.v1 import collections_pb2, collections_pb2_grpc, retrieval_worker_pb2
from shared.tensors import from_numpy

from .mesh import Running, start_batcher, start_retrieval, start_router

DIM = 16


def unit(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


class Admin:
    """The router's Collections service, async."""

    def __init__(self, endpoint: str) -> None:
        self.channel = grpc.aio.insecure_channel(endpoint)
        self.stub = collections_pb2_grpc.CollectionsStub(self.channel)

    async def create(self, name: str, dim: int = DIM, nlist: int = 16, **kw: object
                     ) -> retrieval_worker_pb2.CollectionInfo:
        return await self.stub.CreateCollection(  # type: ignore[no-any-return]
            retrieval_worker_pb2.CreateCollectionRequest(name=name, dim=dim, nlist=nlist,
                                                         lists_per_block=2, **kw))

    async def upsert(self, name: str, ids: np.ndarray, vectors: np.ndarray,
                     texts: list[str] | None = None) -> collections_pb2.IngestResponse:
        return await self.stub.Upsert(collections_pb2.UpsertRequest(  # type: ignore[no-any-return]
            collection=name, ids=from_numpy("ids", ids.astype(np.int64)),
            vectors=from_numpy("vectors", vectors), texts=texts or [],
            metadata_json=[json.dumps({"n": int(i)}) for i in ids] if texts else [],
        ))

    async def describe(self, name: str) -> retrieval_worker_pb2.CollectionInfo:
        return await self.stub.DescribeCollection(  # type: ignore[no-any-return]
            retrieval_worker_pb2.DescribeCollectionRequest(name=name))

    async def count_is(self, name: str, n: int) -> bool:
        info = await self.describe(name)
        return info.count == n and len(info.workers) > 0


@asynccontextmanager
async def retrieval_mesh(nats_url: str, tmp: Path, workers: int = 1
                         ) -> AsyncIterator[dict[str, Running]]:
    parts: dict[str, Running] = {}
    try:
        for i in range(workers):
            parts[f"rw{i}"] = await start_retrieval(nats_url, tmp / f"rw{i}", instance=f"rw{i}")
        parts["batcher"] = await start_batcher(nats_url, tmp)
        parts["router"] = await start_router(nats_url, tmp)
        yield parts
    finally:
        for name in reversed(list(parts)):
            await parts[name].stop()


async def search(client: AsyncClient, name: str, q: np.ndarray, k: int = 5, nprobe: int = 0):  # type: ignore[no-untyped-def]
    return await client.infer(pipeline="search", collection=name, inputs={"query": q}, k=k,
                              nprobe=nprobe)


async def test_vectors_upserted_through_the_router_come_back_from_search_with_payloads(
    nats_server, tmp_path: Path
) -> None:
    async with retrieval_mesh(nats_server.url, tmp_path) as mesh:
        admin = Admin(mesh["router"].endpoint)
        await admin.create("docs")
        x = unit(2000)
        ids = np.arange(2000) + 100
        ack = await admin.upsert("docs", ids, x, [f"doc {i}" for i in ids])
        assert ack.count == 2000 and ack.seq >= 1
        await eventually(lambda: admin.count_is("docs", 2000), timeout=30, what="ingest applied")
        async with AsyncClient(mesh["router"].endpoint) as client:
            await eventually(lambda: _searchable(client, "docs"), what="collection served")
            result = await search(client, "docs", x[:4], k=3, nprobe=16)
    assert [h[0].id for h in result.hits] == [100, 101, 102, 103]
    top = result.hits[0][0]
    assert top.score == pytest.approx(1.0, abs=1e-5)
    assert top.text == "doc 100" and json.loads(top.metadata_json) == {"n": 100}
    assert result.outputs["ids"].shape == (4, 3)
    assert [t.step for t in result.timings] == ["retrieve"]


async def _searchable(client: AsyncClient, name: str) -> bool:
    try:
        await search(client, name, unit(1), k=1)
    except RPCError:
        return False
    return True
