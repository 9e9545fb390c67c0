"""The RetrievalWorker gRPC servicer: validated search and collection admin.

Every request is checked before work (name, dtype, shape, NaN/Inf, k and nprobe bounds,
block ids) and answered with INVALID_ARGUMENT / NOT_FOUND saying what is wrong. Searches run
the engine in a thread (``asyncio.to_thread``) so the event loop keeps serving heartbeats and
other calls while FAISS and numpy work.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import numpy as np

from services.retrieval_worker.config import RetrievalConfig
from services.retrieval_worker.holdings import Held, Holdings
from shared import streams
from shared.errors import DeadlineExceeded, InvalidArgument
from shared.ingestlog import CollectionDeclared, check_collection_name
from shared.pb.infermesh.v1 import common_pb2, retrieval_worker_pb2, retrieval_worker_pb2_grpc
from shared.tensors import from_numpy, to_numpy

#: Searches of at most this many queries run on the event loop instead of a thread.
INLINE_QUERIES = 4

#: Declares a collection to the mesh (KV) and creates it here; drops it mesh-wide.
Declare = Callable[[CollectionDeclared], Awaitable[Held]]
Retract = Callable[[str], Awaitable[None]]


def hits_of(held: Held, ids: np.ndarray, scores: np.ndarray) -> list[common_pb2.Hit]:
    """One Hit per (query, rank), row-major, with the payload text and metadata (-1: padding)."""
    flat_ids = ids.reshape(-1)
    flat_scores = scores.reshape(-1)
    valid = np.unique(flat_ids[flat_ids >= 0])
    payloads = dict(zip(valid.tolist(), held.collection.fetch_payloads(valid), strict=True))
    hits = []
    for i, s in zip(flat_ids.tolist(), flat_scores.tolist(), strict=True):
        p = payloads.get(i) or {}
        meta = p.get("metadata")
        hits.append(
            common_pb2.Hit(
                id=i,
                score=s,
                text=str(p.get("text") or ""),
                metadata_json=json.dumps(meta) if meta is not None else "",
            )
        )
    return hits


def info_of(held: Held, workers: list[str] | None = None) -> retrieval_worker_pb2.CollectionInfo:
    """The wire description of a held collection."""
    d = held.collection.describe()
    return retrieval_worker_pb2.CollectionInfo(
        name=d.name,
        dim=d.dim,
        metric=d.metric,
        nlist=d.nlist,
        storage_dtype=d.dtype,
        count=d.count,
        blocks=held.spec.nblocks,
        last_applied_seq=d.last_applied_seq,
        tier_bytes={k: v for k, v in d.bytes_by_tier.items() if v},
        trained=d.trained,
        lists_per_block=held.spec.lists_per_block,
        workers=workers or [],
    )


class RetrievalWorkerServicer(retrieval_worker_pb2_grpc.RetrievalWorkerServicer):
    """Search and collection admin over the collections this worker holds."""

    def __init__(
        self,
        holdings: Holdings,
        config: RetrievalConfig,
        worker: str,
        declare: Declare,
        retract: Retract,
        draining: asyncio.Event | None = None,
        bundle_bytes: int = streams.BUNDLE_BYTES,
    ) -> None:
        self.holdings = holdings
        self._bundle_bytes = bundle_bytes
        self._cfg = config
        self._worker = worker
        self._declare = declare
        self._retract = retract
        self._draining = draining
        self.outstanding = 0

    def _queries(self, request: retrieval_worker_pb2.SearchRequest, held: Held) -> np.ndarray:
        t = request.queries
        if not t.dtype:
            raise InvalidArgument("search needs queries: an FP32 tensor [n, dim]")
        if t.dtype != "FP32":
            raise InvalidArgument(f"queries must be FP32, got {t.dtype}")
        q = to_numpy(t, self._cfg.max_queries * max(held.spec.dim, 1))
        dim = held.spec.dim
        if q.ndim != 2 or q.shape[1] != dim:
            raise InvalidArgument(
                f"queries must have shape [n, {dim}] for collection {held.spec.name!r}, "
                f"got {list(q.shape)}"
            )
        if q.shape[0] == 0:
            raise InvalidArgument("queries hold no vector (n = 0)")
        if q.shape[0] > self._cfg.max_queries:
            raise InvalidArgument(
                f"{q.shape[0]} queries exceed the limit of {self._cfg.max_queries} per search"
            )
        if not np.isfinite(q).all():
            raise InvalidArgument("queries contain NaN or Inf")
        return q

    def _k_nprobe(self, k: int, nprobe: int, held: Held) -> tuple[int, int]:
        if not 1 <= k <= self._cfg.max_k:
            raise InvalidArgument(f"k must be in [1, {self._cfg.max_k}], got {k}")
        nlist = held.spec.nlist
        if nprobe == 0:
            nprobe = min(self._cfg.default_nprobe, nlist)
        if not 1 <= nprobe <= nlist:
            raise InvalidArgument(
                f"nprobe must be in [1, nlist={nlist}] for collection {held.spec.name!r}, "
                f"got {nprobe}"
            )
        return k, nprobe

    async def Search(
        self, request: retrieval_worker_pb2.SearchRequest, context: grpc.aio.ServicerContext
    ) -> retrieval_worker_pb2.SearchResponse:
        return await self._search_request(request)

    async def SearchStream(
        self,
        requests: AsyncIterator[retrieval_worker_pb2.SearchCalls],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[retrieval_worker_pb2.SearchAnswers]:
        """Searches over one stream (the batcher's data path); answers matched by call_id.

        A failed search answers inline. When the worker drains it tells the batcher to send
        new searches elsewhere, and answers the ones it has (shared/streams.py).
        """
        async for reply in streams.answer_concurrently(
            requests,
            self._search_request,
            stopping=self._draining,
            per_message=SEARCH,
            bundle_bytes=self._bundle_bytes,
        ):
            yield reply

    async def _search_request(
        self, request: retrieval_worker_pb2.SearchRequest
    ) -> retrieval_worker_pb2.SearchResponse:
        if request.deadline_unix_ms and request.deadline_unix_ms <= time.time() * 1000.0:
            # Arrived after its deadline (a slow link): the batcher has given up on it.
            raise DeadlineExceeded("deadline passed before the search ran")
        held = self.holdings.get(check_collection_name(request.collection))
        q = self._queries(request, held)
        k, nprobe = self._k_nprobe(request.k, request.nprobe, held)
        nblocks = held.spec.nblocks
        bad = [b for b in request.blocks if b >= nblocks]
        if bad:
            raise InvalidArgument(
                f"blocks {bad[:5]} do not exist in {held.spec.name!r} (blocks 0..{nblocks - 1})"
            )
        blocks = frozenset(request.blocks) if request.blocks else None
        self.outstanding += q.shape[0]
        start = time.perf_counter()
        try:
            search = (held, q, k, nprobe, blocks, not request.omit_hits)
            if q.shape[0] <= INLINE_QUERIES:
                # A few queries scan in well under a millisecond: handing them to a thread
                # and back costs more CPU than the scan (measured at batch 1).
                scores, ids, hits = self._search(*search)
            else:
                scores, ids, hits = await asyncio.to_thread(self._search, *search)
        finally:
            self.outstanding -= q.shape[0]
        return retrieval_worker_pb2.SearchResponse(
            scores=from_numpy("scores", scores),
            ids=from_numpy("ids", ids),
            hits=hits,
            exec_ms=(time.perf_counter() - start) * 1000.0,
            worker=self._worker,
            call_id=request.call_id,
        )

    @staticmethod
    def _search(
        held: Held, q: np.ndarray, k: int, nprobe: int, blocks: frozenset[int] | None,
        with_hits: bool = True,
    ) -> tuple[np.ndarray, np.ndarray, list[common_pb2.Hit]]:
        scores, ids = held.collection.search(q, k, nprobe, blocks)
        # Hits cost a SQLite read and a protobuf message per (query, rank): only when asked.
        return scores, ids, hits_of(held, ids, scores) if with_hits else []

    async def CreateCollection(
        self,
        request: retrieval_worker_pb2.CreateCollectionRequest,
        context: grpc.aio.ServicerContext,
    ) -> retrieval_worker_pb2.CollectionInfo:
        name = check_collection_name(request.name)
        if not 1 <= request.dim <= 65536:
            raise InvalidArgument(f"dim must be in [1, 65536], got {request.dim}")
        nlist = request.nlist or 1024
        lpb = request.lists_per_block or 8
        if not 1 <= lpb <= nlist:
            raise InvalidArgument(f"lists_per_block must be in [1, nlist={nlist}], got {lpb}")
        decl = CollectionDeclared(
            name=name,
            dim=request.dim,
            metric=request.metric or "ip",
            nlist=nlist,
            dtype=request.storage_dtype or "float32",
            lists_per_block=lpb,
            created_unix=time.time(),
        )
        return info_of(await self._declare(decl))

    async def DropCollection(
        self,
        request: retrieval_worker_pb2.DropCollectionRequest,
        context: grpc.aio.ServicerContext,
    ) -> retrieval_worker_pb2.DropCollectionResponse:
        await self._retract(check_collection_name(request.name))
        return retrieval_worker_pb2.DropCollectionResponse()

    async def DescribeCollection(
        self,
        request: retrieval_worker_pb2.DescribeCollectionRequest,
        context: grpc.aio.ServicerContext,
    ) -> retrieval_worker_pb2.CollectionInfo:
        held = self.holdings.get(check_collection_name(request.name))
        return info_of(held, [self._worker])


#: Metrics and spans of SearchStream messages, under the unary method's name.
SEARCH = streams.PerMessage(
    service="retrieval-worker",
    method="infermesh.v1.RetrievalWorker/Search",
    answer_code=lambda reply: reply.error_code,
    answer=retrieval_worker_pb2.SearchResponse,
    bundle=retrieval_worker_pb2.SearchAnswers,
)
