"""The search pipeline over text: embed with minilm-l6 through the mesh, then retrieve."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tests_support import eventually

from shared.client import AsyncClient
from shared.errors import RPCError

from .mesh import start_batcher, start_retrieval, start_router, start_worker
from .test_retrieval_path import Admin

DOCS = [
    "argparse: Command-line parsing library",
    "json: JSON (JavaScript Object Notation) encoder and decoder",
    "sqlite3: The sqlite3 extension module provides a DB-API 2.0 interface to SQLite",
    "gzip: Functions that read and write gzipped files",
    "datetime: Fast implementation of the datetime type",
    "random: Random variable generators",
    "socket: Low-level networking interface",
    "re: Support for regular expressions",
]


async def test_a_text_question_finds_the_document_a_person_would_pick(
    nats_server, tmp_path: Path
) -> None:
    parts = []
    try:
        parts.append(await start_retrieval(nats_server.url, tmp_path / "rw", instance="rw"))
        parts.append(await start_worker(nats_server.url, tmp_path, models="minilm-l6"))
        parts.append(await start_batcher(nats_server.url, tmp_path))
        router = await start_router(nats_server.url, tmp_path)
        parts.append(router)
        admin = Admin(router.endpoint)
        await admin.create("mini", dim=384, nlist=4)
        await admin.stub.Upsert(_texts_upsert(DOCS))
        await eventually(lambda: admin.count_is("mini", len(DOCS)), timeout=60, what="indexed")
        async with AsyncClient(router.endpoint) as client:
            async def answer() -> object:
                try:
                    return await client.infer(
                        pipeline="search", collection="mini", k=3, nprobe=4,
                        texts=["how do I parse command-line arguments",
                               "store rows in an embedded database"])
                except RPCError:
                    return None
            result = await eventually(answer, timeout=60, what="search answers")
    finally:
        for p in reversed(parts):
            await p.stop()
    assert result.hits[0][0].text.startswith("argparse")
    assert result.hits[1][0].text.startswith("sqlite3")
    assert [t.step for t in result.timings] == ["embed", "retrieve"]
    assert result.timings[0].target == "minilm-l6" and result.timings[1].target == "mini"
    assert result.outputs["ids"].shape == (2, 3)


def _texts_upsert(texts: list[str]):  # type: ignore[no-untyped-def]
    from shared.pb.infermesh.v1 import collections_pb2
    from shared.tensors import from_numpy

    return collections_pb2.UpsertRequest(
        collection="mini", ids=from_numpy("ids", np.arange(len(texts), dtype=np.int64)),
        texts=texts,
    )
