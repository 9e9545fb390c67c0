"""The public Collections service on the router: collection admin and durable ingest.

Create/Drop/Describe go to a retrieval worker (which declares the collection in the KV bucket
every worker follows). Upsert/Delete are validated here, texts without vectors are embedded
through the mesh (router -> batcher -> inference worker, in concurrent chunks the batcher
batches), and the rows are appended to the JetStream ingest stream in messages under the
NATS max payload. The answer comes only after the stream acknowledged every message, and
carries the stream sequence: from then on the rows survive any worker crash.
"""

from __future__ import annotations

import asyncio
import json
import random
import time

import grpc
import numpy as np

from services.router.pipelines import Pipelines
from shared import rpc
from shared.bus import Bus
from shared.errors import InvalidArgument, RPCError, Unavailable
from shared.ingestlog import append, check_collection_name, chunk_delete, chunk_upsert
from shared.membership import MemberView
from shared.pb.infermesh.v1 import (
    collections_pb2,
    collections_pb2_grpc,
    retrieval_worker_pb2,
    retrieval_worker_pb2_grpc,
)
from shared.status_codes import peer_unreachable
from shared.tensors import require_finite, to_numpy
from shared.validation import MAX_VECTOR_ABS

#: Largest ingest message; the local nats.conf allows 8 MiB, a server may allow less.
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
MAX_ROWS = 1_000_000


def _ids(t: object, what: str = "ids") -> np.ndarray:
    ids = to_numpy(t)  # type: ignore[arg-type]
    if ids.dtype != np.int64 or ids.ndim != 1:
        raise InvalidArgument(f"{what} must be INT64 [n], got {ids.dtype} {list(ids.shape)}")
    if ids.size == 0:
        raise InvalidArgument(f"{what} is empty")
    if ids.size > MAX_ROWS:
        raise InvalidArgument(f"{ids.size} rows exceed the limit of {MAX_ROWS} per request")
    if ids.min() < 0:
        raise InvalidArgument(f"{what} must be non-negative (-1 marks a missing hit)")
    if np.unique(ids).size != ids.size:
        raise InvalidArgument(f"{what} must be unique within one request")
    return ids


def _metadata(items: list[str], n: int) -> list[object]:
    if not items:
        return [None] * n
    if len(items) != n:
        raise InvalidArgument(f"{n} ids but {len(items)} metadata_json entries")
    out: list[object] = []
    for i, text in enumerate(items):
        if not text:
            out.append(None)
            continue
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise InvalidArgument(f"metadata_json[{i}] is not JSON: {exc}") from None
        if not isinstance(value, dict):
            raise InvalidArgument(f"metadata_json[{i}] must be a JSON object")
        out.append(value)
    return out


class CollectionsServicer(collections_pb2_grpc.CollectionsServicer):
    """Collections.* on the router."""

    def __init__(
        self,
        bus: Bus,
        members: MemberView,
        pipelines: Pipelines,
        embed_model: str,
        embed_chunk: int,
        channels: rpc.Channels,
        default_timeout_s: float,
        max_payload: int = MAX_MESSAGE_BYTES,
    ) -> None:
        self._bus = bus
        #: Largest ingest message this router writes (config max_nats_payload); the server's
        #: own max_payload caps it too.
        self._max_payload = max_payload
        self._members = members
        self._pipelines = pipelines
        self._embed_model = embed_model
        self._embed_chunk = embed_chunk
        self._timeout = default_timeout_s
        self._channels = channels

    def _live(self, collection: str) -> list[str]:
        return [
            m.endpoint for m in self._members.members("retrieval-worker")
            if m.health == "SERVING" and (not collection or collection in m.targets)
        ]

    async def _worker(
        self, collection: str = ""
    ) -> tuple[str, retrieval_worker_pb2_grpc.RetrievalWorkerStub]:
        try:
            # Right after start-up the member view may not have seen the workers yet.
            await self._members.wait_for(lambda: bool(self._live(collection)), timeout=5.0)
        except TimeoutError:
            raise Unavailable(
                "no healthy retrieval worker" + (f" serves {collection!r}" if collection else "")
            ) from None
        live = self._live(collection)
        endpoint = random.choice(live)
        stub = self._channels.stub(endpoint, retrieval_worker_pb2_grpc.RetrievalWorkerStub)
        return endpoint, stub

    async def _call(self, method: str, request: object, collection: str = "") -> object:
        for attempt in range(3):
            endpoint, stub = await self._worker(collection)
            try:
                return await getattr(stub, method)(request, timeout=self._timeout)
            except grpc.aio.AioRpcError as err:
                if peer_unreachable(err) and attempt < 2:
                    # A worker that died keeps its member record until the TTL: skip it.
                    self._members.forget(endpoint)
                    continue
                raise RPCError.from_aio(err, "retrieval-worker") from None
        raise AssertionError("unreachable")

    async def CreateCollection(
        self, request: retrieval_worker_pb2.CreateCollectionRequest,
        context: grpc.aio.ServicerContext,
    ) -> retrieval_worker_pb2.CollectionInfo:
        check_collection_name(request.name)
        info = await self._call("CreateCollection", request)
        # Answer once the router itself sees the declaration, so an Upsert right after works.
        await self._pipelines.collections.wait_for(
            lambda: request.name in self._pipelines.collections.values, timeout=5.0
        )
        return info  # type: ignore[return-value]

    async def DropCollection(
        self, request: retrieval_worker_pb2.DropCollectionRequest,
        context: grpc.aio.ServicerContext,
    ) -> retrieval_worker_pb2.DropCollectionResponse:
        self._pipelines.collection(request.name)
        return await self._call("DropCollection", request)  # type: ignore[return-value]

    async def DescribeCollection(
        self, request: retrieval_worker_pb2.DescribeCollectionRequest,
        context: grpc.aio.ServicerContext,
    ) -> retrieval_worker_pb2.CollectionInfo:
        decl = self._pipelines.collection(request.name)
        serving = [
            m.instance for m in self._members.members("retrieval-worker")
            if m.health == "SERVING" and decl.name in m.targets
        ]
        if not serving:
            # Declared, but no worker has caught up yet: describe the declaration.
            return retrieval_worker_pb2.CollectionInfo(
                name=decl.name, dim=decl.dim, metric=decl.metric, nlist=decl.nlist,
                storage_dtype=decl.dtype, lists_per_block=decl.lists_per_block,
            )
        info = await self._call("DescribeCollection", request, decl.name)
        assert isinstance(info, retrieval_worker_pb2.CollectionInfo)
        del info.workers[:]
        info.workers.extend(sorted(serving))
        return info

    async def Upsert(
        self, request: collections_pb2.UpsertRequest, context: grpc.aio.ServicerContext
    ) -> collections_pb2.IngestResponse:
        decl = self._pipelines.collection(request.collection)
        ids = _ids(request.ids)
        n = ids.size
        texts = list(request.texts)
        if texts and len(texts) != n:
            raise InvalidArgument(f"{n} ids but {len(texts)} texts")
        metadata = _metadata(list(request.metadata_json), n)
        embed_ms = 0.0
        if request.vectors.dtype:
            vectors = to_numpy(request.vectors, MAX_ROWS * decl.dim)
            if vectors.dtype != np.float32:
                raise InvalidArgument(f"vectors must be FP32, got {request.vectors.dtype}")
        elif texts:
            start = time.perf_counter()
            vectors = await self._embed(request.model or self._embed_model, texts,
                                        context.time_remaining())
            embed_ms = (time.perf_counter() - start) * 1000.0
        else:
            raise InvalidArgument("upsert needs vectors (FP32 [n, dim]) or texts to embed")
        if vectors.shape != (n, decl.dim):
            raise InvalidArgument(
                f"vectors have shape {list(vectors.shape)}; collection {decl.name!r} needs "
                f"[{n}, {decl.dim}] ({n} ids)"
            )
        require_finite("vectors", vectors)
        if vectors.size and float(np.abs(vectors).max()) > MAX_VECTOR_ABS:
            # Squared distances of larger values overflow float32 in the retrieval worker,
            # and FAISS aborts the whole process on the inf assignments that follow.
            raise InvalidArgument(
                f"vectors hold a value of magnitude {float(np.abs(vectors).max()):.3g}; "
                f"the limit is {MAX_VECTOR_ABS:.0e}"
            )
        payloads: list[bytes] | None = None
        if texts or any(m is not None for m in metadata):
            payloads = [
                json.dumps({"text": texts[i] if texts else "", "metadata": metadata[i]}).encode()
                for i in range(n)
            ]
        limit = min(self._max_payload, self._bus.nc.max_payload)
        messages = chunk_upsert(decl.name, ids, vectors, payloads, limit)
        seqs = await append(self._bus.js, decl.name, messages)
        return collections_pb2.IngestResponse(
            seq=seqs[-1], first_seq=seqs[0], count=n, messages=len(seqs), embed_ms=embed_ms
        )

    async def _embed(self, model: str, texts: list[str], remaining: float | None) -> np.ndarray:
        timeout = min(self._timeout, remaining) if remaining is not None else self._timeout
        chunks = [texts[i : i + self._embed_chunk] for i in range(0, len(texts), self._embed_chunk)]
        parts = await asyncio.gather(
            *(self._pipelines.embed(model, c, timeout) for c in chunks)
        )
        return np.concatenate([p for p, _ in parts])

    async def Delete(
        self, request: collections_pb2.DeleteRequest, context: grpc.aio.ServicerContext
    ) -> collections_pb2.IngestResponse:
        decl = self._pipelines.collection(request.collection)
        ids = _ids(request.ids)
        limit = min(self._max_payload, self._bus.nc.max_payload)
        seqs = await append(self._bus.js, decl.name, chunk_delete(decl.name, ids, limit))
        return collections_pb2.IngestResponse(
            seq=seqs[-1], first_seq=seqs[0], count=ids.size, messages=len(seqs)
        )


