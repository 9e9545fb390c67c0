"""Pipelines the router runs: ``search`` = text -> embed(model) -> retrieve(collection).

Declared in config (``INFERMESH_PIPELINES="search=minilm-l6"``: pipeline name = embedding
model). Each step goes through the batcher, so concurrent requests share embedding batches
and search batches; the response carries one StepTiming per step (``embed``, ``retrieve``).
A request may send query vectors instead of text (an FP32 input named ``query``, [n, dim]),
which skips the embed step.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from services.router.coalesce import Coalescer, SearchKey
from services.router.upstream import Batchers
from shared.errors import InvalidArgument, NotFound
from shared.events import ModelSpec
from shared.ingestlog import CollectionDeclared, check_collection_name
from shared.kvview import KVView
from shared.pb.infermesh.v1 import batcher_pb2, common_pb2, router_pb2
from shared.tensors import from_numpy, require_finite, to_numpy
from shared.validation import check_texts

QUERY_INPUT = "query"
DEFAULT_K = 10


def parse_pipelines(text: str) -> dict[str, str]:
    """``"search=minilm-l6,docs=other"`` -> {pipeline: embedding model} (ValueError if bad)."""
    out: dict[str, str] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, sep, model = part.partition("=")
        if not sep or not name.strip() or not model.strip():
            raise ValueError(f"INFERMESH_PIPELINES: expected name=model, got {part!r}")
        out[name.strip()] = model.strip()
    return out


def timing(step: str, target: str, reply: batcher_pb2.SubmitResponse, start: float
           ) -> common_pb2.StepTiming:
    """A step's timing from the batcher's answer (total as the router measured it)."""
    return common_pb2.StepTiming(
        step=step, target=target, queue_ms=reply.queue_ms, exec_ms=reply.exec_ms,
        total_ms=(time.perf_counter() - start) * 1000.0, worker=reply.worker,
        batch_size=reply.batch_size,
    )


class Pipelines:
    """The configured pipelines and the steps they are made of."""

    def __init__(
        self,
        spec: str,
        models: KVView[ModelSpec],
        collections: KVView[CollectionDeclared],
        batchers: Batchers,
        max_k: int,
        max_elements: int,
        coalesce_inflight: int = 2,
    ) -> None:
        self.by_name = parse_pipelines(spec)
        self._searches = Coalescer(self._submit_search, coalesce_inflight)
        self._models = models
        self.collections = collections
        self._batchers = batchers
        self._max_k = max_k
        self._max_elements = max_elements

    def names(self) -> list[str]:
        return sorted(self.by_name)

    def collection(self, name: str) -> CollectionDeclared:
        """A declared collection; NotFound naming the known ones."""
        decl = self.collections.values.get(check_collection_name(name))
        if decl is None:
            known = ", ".join(sorted(self.collections.values)) or "none"
            raise NotFound(f"unknown collection {name!r} (collections: {known})")
        return decl

    async def embed(
        self, model: str, texts: list[str], timeout: float, priority: int = 0, request_id: str = ""
    ) -> tuple[np.ndarray, batcher_pb2.SubmitResponse]:
        """Embeddings [len(texts), d] of texts by model, through the batcher."""
        spec = self._models.values.get(model)
        if spec is None:
            known = ", ".join(sorted(self._models.values)) or "none"
            raise NotFound(f"embedding model {model!r} is not served (served: {known})")
        check_texts(spec, texts)
        item = common_pb2.WorkItem(
            request_id=request_id, texts=texts,
            deadline_unix_ms=int((time.time() + timeout) * 1000),
        )
        reply = await self._batchers.submit(
            batcher_pb2.SubmitRequest(target=model, kind=batcher_pb2.TARGET_KIND_MODEL,
                                      item=item, priority=priority),
            timeout,
        )
        outputs = {t.name: t for t in reply.result.outputs}
        if "embedding" not in outputs:
            raise InvalidArgument(f"model {model!r} returns no 'embedding' output")
        return to_numpy(outputs["embedding"]), reply

    async def run(
        self, request: router_pb2.InferRequest, request_id: str, timeout: float
    ) -> router_pb2.InferResponse:
        """Run the request's pipeline (search: embed unless vectors are given, retrieve)."""
        model = self.by_name.get(request.pipeline)
        if model is None:
            known = ", ".join(self.names()) or "none"
            raise NotFound(f"unknown pipeline {request.pipeline!r} (configured: {known})")
        if not request.collection:
            raise InvalidArgument(f"pipeline {request.pipeline!r} needs a collection")
        decl = self.collection(request.collection)
        k = request.k or DEFAULT_K
        if k > self._max_k:
            raise InvalidArgument(f"k must be in [1, {self._max_k}], got {k}")
        if request.nprobe > decl.nlist:
            raise InvalidArgument(
                f"nprobe must be in [1, nlist={decl.nlist}] for collection {decl.name!r} "
                f"(0 = default), got {request.nprobe}"
            )
        deadline = time.perf_counter() + timeout
        timings: list[common_pb2.StepTiming] = []
        vectors = [t for t in request.inputs if t.name == QUERY_INPUT]
        if len(vectors) != len(request.inputs):
            raise InvalidArgument(f"search takes one input named {QUERY_INPUT!r} (FP32 [n, dim])")
        if vectors and request.texts:
            raise InvalidArgument("send texts or a query tensor, not both")
        if vectors:
            queries = to_numpy(vectors[0], self._max_elements)
            if queries.dtype != np.float32:
                raise InvalidArgument(f"input {QUERY_INPUT!r} must be FP32, got {vectors[0].dtype}")
        elif request.texts:
            start = time.perf_counter()
            queries, reply = await self.embed(
                model, list(request.texts), timeout, request.priority, request_id
            )
            timings.append(timing("embed", model, reply, start))
        else:
            raise InvalidArgument(f"pipeline {request.pipeline!r} needs texts or a query tensor")
        if queries.ndim != 2 or queries.shape[1] != decl.dim or queries.shape[0] == 0:
            source = f"model {model!r} embeds to" if not vectors else "query vectors have"
            raise InvalidArgument(
                f"{source} shape {list(queries.shape)}; collection {decl.name!r} needs "
                f"[n, {decl.dim}]"
            )
        require_finite(QUERY_INPUT, queries)
        start = time.perf_counter()
        # Concurrent searches with the same parameters share one Submit (coalesce.py).
        key = SearchKey(decl.name, k, request.nprobe, request.omit_hits, request.priority)
        part = await self._searches.search(key, queries, deadline - start, request_id)
        timings.append(timing("retrieve", decl.name, part.reply, start))
        results = [] if request.omit_hits else _hit_lists(part.hits, k, queries.shape[0])
        return router_pb2.InferResponse(
            request_id=request_id, outputs=part.outputs, timings=timings, results=results
        )

    async def _submit_search(
        self, key: SearchKey, queries: np.ndarray, timeout: float, request_id: str
    ) -> batcher_pb2.SubmitResponse:
        """One Submit of (possibly several requests') stacked queries to the batcher."""
        item = common_pb2.WorkItem(
            request_id=request_id,
            inputs=[from_numpy(QUERY_INPUT, queries)],
            k=key.k,
            nprobe=key.nprobe,
            omit_hits=key.omit_hits,
            deadline_unix_ms=int((time.time() + timeout) * 1000),
        )
        return await self._batchers.submit(
            batcher_pb2.SubmitRequest(
                target=key.collection,
                kind=batcher_pb2.TARGET_KIND_COLLECTION,
                item=item,
                priority=key.priority,
            ),
            timeout,
        )


def _hit_lists(hits: Sequence[common_pb2.Hit], k: int, n: int) -> list[router_pb2.HitList]:
    """Row-major hits ([n * k], id -1 = padding) as one HitList per query."""
    flat = list(hits)
    return [
        router_pb2.HitList(hits=[h for h in flat[r * k : (r + 1) * k] if h.id >= 0])
        for r in range(n)
    ]
