"""Collections through the mesh on real NATS/gRPC: create, durable ingest, sharded search."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest
from tests_support import eventually

from shared import rpc
from shared.client import AsyncClient
from shared.errors import RPCError
from shared.pb.infermesh.v1 import (
    collections_pb2,
    collections_pb2_grpc,
    retrieval_worker_pb2,
    retrieval_worker_pb2_grpc,
)
from shared.tensors import from_numpy, to_numpy

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
        try:
            info = await self.describe(name)
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.UNAVAILABLE:  # a worker (re)starting
                return False
            raise
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


async def served_by(admin: Admin, name: str, n: int) -> bool:
    info = await admin.describe(name)
    return len(info.workers) == n


async def test_two_workers_split_the_blocks_and_answer_exactly_as_one_worker_does(
    nats_server, tmp_path: Path
) -> None:
    async with retrieval_mesh(nats_server.url, tmp_path, workers=2) as mesh:
        admin = Admin(mesh["router"].endpoint)
        await admin.create("split")
        x = unit(3000, seed=1)
        await admin.upsert("split", np.arange(3000), x)
        await eventually(lambda: admin.count_is("split", 3000), timeout=30, what="ingest")
        await eventually(lambda: served_by(admin, "split", 2), what="both workers serve")
        q = unit(50, seed=2)
        async with AsyncClient(mesh["router"].endpoint) as client:
            await eventually(lambda: _searchable(client, "split"), what="collection served")
            both = await search(client, "split", q, k=10, nprobe=4)
            assert set(both.timings[0].worker.split(",")) == {"rw0", "rw1"}
            await mesh.pop("rw1").stop()
            await eventually(lambda: served_by(admin, "split", 1), what="rw1 gone")
            one = await search(client, "split", q, k=10, nprobe=4)
    assert one.timings[0].worker == "rw0"
    np.testing.assert_array_equal(one.outputs["ids"], both.outputs["ids"])
    np.testing.assert_allclose(one.outputs["scores"], both.outputs["scores"], rtol=1e-5)


async def test_searches_stay_correct_while_a_worker_joins_and_another_leaves(
    nats_server, tmp_path: Path
) -> None:
    async with retrieval_mesh(nats_server.url, tmp_path, workers=1) as mesh:
        admin = Admin(mesh["router"].endpoint)
        await admin.create("moving")
        x = unit(3000, seed=3)
        await admin.upsert("moving", np.arange(3000), x)
        await eventually(lambda: admin.count_is("moving", 3000), timeout=30, what="ingest")
        q = unit(20, seed=4)
        async with AsyncClient(mesh["router"].endpoint) as client:
            await eventually(lambda: _searchable(client, "moving"), what="collection served")
            expected = (await search(client, "moving", q, k=10, nprobe=4)).outputs["ids"]
            seen_workers: set[str] = set()
            answers = 0
            stop = asyncio.Event()

            async def keep_searching() -> None:
                nonlocal answers
                while not stop.is_set():
                    r = await search(client, "moving", q, k=10, nprobe=4)
                    np.testing.assert_array_equal(r.outputs["ids"], expected)
                    seen_workers.update(r.timings[0].worker.split(","))
                    answers += 1

            searcher = asyncio.create_task(keep_searching())
            mesh["rw1"] = await start_retrieval(nats_server.url, tmp_path / "rw1",
                                                instance="rw1")
            await eventually(lambda: served_by(admin, "moving", 2), timeout=30,
                             what="rw1 caught up and serving")
            await eventually(lambda: _true("rw1" in seen_workers), what="rw1 takes blocks")
            await mesh.pop("rw0").stop()
            await eventually(lambda: served_by(admin, "moving", 1), what="rw0 gone")
            before = answers
            await eventually(lambda: _true(answers > before + 5), what="searches after rw0 left")
            stop.set()
            await searcher  # re-raises any wrong answer or error seen meanwhile
    assert seen_workers == {"rw0", "rw1"}


async def _true(value: bool) -> bool:
    return value


async def test_malformed_searches_and_upserts_are_rejected_with_a_message_naming_the_problem(
    nats_server, tmp_path: Path
) -> None:
    async with retrieval_mesh(nats_server.url, tmp_path) as mesh:
        admin = Admin(mesh["router"].endpoint)
        await admin.create("strict")
        await admin.upsert("strict", np.arange(1500), unit(1500))
        await eventually(lambda: admin.count_is("strict", 1500), timeout=30, what="ingest")
        nan = unit(1)
        nan[0, 3] = np.nan
        cases = [
            (dict(pipeline="search", collection="nope", inputs={"query": unit(1)}),
             grpc.StatusCode.NOT_FOUND, "unknown collection 'nope'"),
            (dict(pipeline="lookup", collection="strict", inputs={"query": unit(1)}),
             grpc.StatusCode.NOT_FOUND, "configured: search"),
            (dict(pipeline="search", collection="strict", inputs={"query": unit(1, dim=8)}),
             grpc.StatusCode.INVALID_ARGUMENT, "needs [n, 16]"),
            (dict(pipeline="search", collection="strict",
                  inputs={"query": unit(1).astype(np.float64)}),
             grpc.StatusCode.INVALID_ARGUMENT, "must be FP32"),
            (dict(pipeline="search", collection="strict", inputs={"query": nan}),
             grpc.StatusCode.INVALID_ARGUMENT, "NaN or Inf"),
            (dict(pipeline="search", collection="strict", inputs={"query": unit(1)}, k=5000),
             grpc.StatusCode.INVALID_ARGUMENT, "k must be in [1, 1024]"),
            (dict(pipeline="search", collection="strict", inputs={"query": unit(1)}, nprobe=17),
             grpc.StatusCode.INVALID_ARGUMENT, "nprobe must be in [1, nlist=16]"),
            (dict(pipeline="search", collection="strict"),
             grpc.StatusCode.INVALID_ARGUMENT, "needs texts or a query tensor"),
            (dict(pipeline="search", collection="bad name!", inputs={"query": unit(1)}),
             grpc.StatusCode.INVALID_ARGUMENT, "bad collection name"),
        ]
        async with AsyncClient(mesh["router"].endpoint) as client:
            for kwargs, code, message in cases:
                with pytest.raises(RPCError) as info:
                    await client.infer(**kwargs)  # type: ignore[arg-type]
                assert (info.value.status, message in info.value.message) == (code, True), (
                    kwargs, info.value.message)
        upserts = [
            (np.arange(3), unit(3, dim=8), "needs [3, 16]"),
            (np.array([1, 1, 2]), unit(3), "must be unique"),
            (np.array([-1, 0, 2]), unit(3), "non-negative"),
            (np.arange(3), np.full((3, DIM), np.inf, np.float32), "NaN or Inf"),
        ]
        for ids, vectors, message in upserts:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await admin.upsert("strict", ids, vectors)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert message in (err.value.details() or ""), err.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await admin.create("strict", dim=32)
        assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await admin.upsert("ghost", np.arange(3), unit(3))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert "unknown collection 'ghost'" in (err.value.details() or "")


async def test_a_search_that_omits_hits_returns_the_same_ids_without_payloads(
    nats_server, tmp_path: Path
) -> None:
    async with retrieval_mesh(nats_server.url, tmp_path) as mesh:
        admin = Admin(mesh["router"].endpoint)
        await admin.create("lean")
        x = unit(1500, seed=4)
        await admin.upsert("lean", np.arange(1500), x, [f"doc {i}" for i in range(1500)])
        await eventually(lambda: admin.count_is("lean", 1500), timeout=30, what="ingest")
        async with AsyncClient(mesh["router"].endpoint) as client:
            await eventually(lambda: _searchable(client, "lean"), what="collection served")
            kw = dict(pipeline="search", collection="lean", inputs={"query": x[:3]}, k=4,
                      nprobe=16)
            full, lean, *mixed = await asyncio.gather(
                client.infer(**kw), client.infer(**kw, omit_hits=True),  # type: ignore[arg-type]
                client.infer(**kw), client.infer(**kw, omit_hits=True),  # type: ignore[arg-type]
            )
    assert lean.hits == [] and [h[0].text for h in full.hits] == ["doc 0", "doc 1", "doc 2"]
    np.testing.assert_array_equal(lean.outputs["ids"], full.outputs["ids"])
    # one batch may carry both kinds: each request still gets what it asked for
    assert mixed[0].hits[0][0].text == "doc 0" and mixed[1].hits == []


async def test_a_collection_bulk_built_offline_is_served_and_takes_later_upserts(
    nats_server, tmp_path: Path
) -> None:
    from services.retrieval_worker import bulk
    from services.retrieval_worker.manifest import CollectionSpec

    x = unit(3000, seed=6)
    spec = CollectionSpec(name="bulk", dim=DIM, nlist=16, lists_per_block=2)
    bulk.build(tmp_path / "rw0" / "collections" / "bulk", spec, np.arange(3000), x,
               [{"text": f"doc {i}"} for i in range(3000)], stream_seq=0)
    async with retrieval_mesh(nats_server.url, tmp_path) as mesh:
        admin = Admin(mesh["router"].endpoint)

        async def advertised() -> bool:
            try:
                return await admin.count_is("bulk", 3000)
            except grpc.aio.AioRpcError as err:  # not yet declared in the router's view
                if err.code() == grpc.StatusCode.NOT_FOUND:
                    return False
                raise

        await eventually(advertised, timeout=30, what="the worker declares and advertises it")
        extra = unit(1, seed=7)
        await admin.upsert("bulk", np.array([5000]), extra)
        await eventually(lambda: admin.count_is("bulk", 3001), timeout=30, what="upsert applied")
        async with AsyncClient(mesh["router"].endpoint) as client:
            old = await search(client, "bulk", x[:2], k=1, nprobe=16)
            new = await search(client, "bulk", extra, k=1, nprobe=16)
    assert [h[0].text for h in old.hits] == ["doc 0", "doc 1"]
    assert new.hits[0][0].id == 5000


async def test_the_search_stream_answers_each_search_and_refuses_bad_or_late_ones_inline(
    nats_server, tmp_path: Path
) -> None:
    async with retrieval_mesh(nats_server.url, tmp_path) as mesh:
        admin = Admin(mesh["router"].endpoint)
        await admin.create("streamed")
        x = unit(1000, seed=5)
        await admin.upsert("streamed", np.arange(1000), x)
        await eventually(lambda: admin.count_is("streamed", 1000), timeout=30, what="ingest")
        channel = rpc.channel(mesh["rw0"].endpoint)
        stub = retrieval_worker_pb2_grpc.RetrievalWorkerStub(channel)

        def req(call_id: int, **kw: object) -> retrieval_worker_pb2.SearchRequest:
            fields: dict[str, object] = dict(
                collection="streamed", queries=from_numpy("queries", x[call_id : call_id + 1]),
                k=3, nprobe=16, omit_hits=True, call_id=call_id,
            )
            fields.update(kw)
            return retrieval_worker_pb2.SearchRequest(**fields)  # type: ignore[arg-type]

        past = int(time.time() * 1000) - 1000
        calls = [req(i) for i in range(1, 6)] + [
            req(6, collection="nope"), req(7, deadline_unix_ms=past), req(8, k=0)
        ]

        async def gen() -> AsyncIterator[retrieval_worker_pb2.SearchCalls]:
            yield retrieval_worker_pb2.SearchCalls(calls=calls[:3])
            yield retrieval_worker_pb2.SearchCalls(calls=calls[3:])

        answers = {
            a.call_id: a
            async for message in stub.SearchStream(gen(), timeout=10)
            for a in message.answers
        }
        await channel.close()
    assert sorted(answers) == list(range(1, 9))
    for i in range(1, 6):
        assert not answers[i].error_code and to_numpy(answers[i].ids)[0, 0] == i
    assert answers[6].error_code == grpc.StatusCode.NOT_FOUND.value[0]
    assert "nope" in answers[6].error_message
    assert answers[7].error_code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    assert answers[8].error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "k must be" in answers[8].error_message
