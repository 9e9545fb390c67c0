"""Search batches of a collection: cover its blocks with workers, scatter, gather, merge top-k.

A formed batch becomes ONE Search RPC per retrieval worker in the cover: the queries of every
request in the batch are stacked into one matrix, each worker scans only the blocks the cover
gives it, and the answers are merged (``shared.topk.merge_topk``) and split back per request.

The cover assigns every block that some live worker advertises (membership ``blocks``) to
exactly one of the workers advertising it, balancing block counts (ties broken by a
rendezvous hash, so the same membership gives the same cover). Workers advertise a
collection only after its ingest caught up, so a joining worker takes blocks only once it can
answer for them. A worker that fails mid-scatter is forgotten and its blocks are searched
again on the others (search is read-only, so a retry is safe): adding or removing a worker
while searches run keeps every answer complete.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Mapping
from typing import cast

import numpy as np

from services.batcher.queue import Outcome, Pending
from services.batcher.tracing import next_batch_id
from shared import rpc
from shared.errors import DeadlineExceeded, InvalidArgument, Unavailable
from shared.ingestlog import CollectionDeclared
from shared.kvview import KVView
from shared.membership import MemberView
from shared.pb.infermesh.v1 import (
    common_pb2,
    retrieval_worker_pb2,
    retrieval_worker_pb2_grpc,
)
from shared.status_codes import error_from
from shared.streams import PeerGone, Streams
from shared.tensors import from_numpy, to_numpy
from shared.topk import Metric, merge_topk

log = logging.getLogger(__name__)

SERVICE = "retrieval-worker"
#: Retry rounds after workers fail mid-scatter (each round re-covers the missing blocks).
ROUNDS = 3


def _rank(endpoint: str, block: int) -> int:
    digest = hashlib.blake2b(f"{endpoint}/{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def cover(owners: Mapping[str, frozenset[int]], blocks: frozenset[int] | None = None
          ) -> dict[str, list[int]]:
    """Assign each block (default: every advertised one) to exactly one worker that owns it.

    Balanced by block count; deterministic for the same owners. Unavailable when a block has
    no owner.
    """
    wanted = sorted(blocks if blocks is not None else frozenset().union(*owners.values()))
    plan: dict[str, list[int]] = {}
    for b in wanted:
        candidates = [e for e, owned in owners.items() if b in owned]
        if not candidates:
            raise Unavailable(f"no live retrieval worker holds block {b}")
        best = min(candidates, key=lambda e: (len(plan.get(e, ())), _rank(e, b)))
        plan.setdefault(best, []).append(b)
    return plan


class Scatter:
    """Runs a collection's batches on the retrieval workers that cover its blocks."""

    def __init__(
        self,
        members: MemberView,
        collections: KVView[CollectionDeclared],
        channels: rpc.Channels,
    ) -> None:
        self._members = members
        self._collections = collections
        self._streams: Streams[
            retrieval_worker_pb2.SearchRequest, retrieval_worker_pb2.SearchResponse
        ] = Streams(
            channels,
            retrieval_worker_pb2_grpc.RetrievalWorkerStub,
            "SearchStream",
            retrieval_worker_pb2.SearchCalls,
            "infermesh.v1.RetrievalWorker/Search",
            SERVICE,
        )
        self.outstanding: dict[str, int] = {}
        self._covers: dict[
            tuple[frozenset[tuple[str, frozenset[int]]], frozenset[int] | None],
            dict[str, list[int]],
        ] = {}

    def owners(self, collection: str, exclude: set[str] = frozenset()) -> dict[str, frozenset[int]]:  # type: ignore[assignment]
        """Live SERVING workers holding the collection, with the blocks each advertises."""
        return {
            m.endpoint: frozenset(m.blocks.get(collection, ()))
            for m in self._members.members(SERVICE)
            if m.health == "SERVING" and collection in m.targets and m.endpoint not in exclude
        }

    def _cover(self, owners: dict[str, frozenset[int]], blocks: frozenset[int] | None
               ) -> dict[str, list[int]]:
        """``cover(owners, blocks)``, cached: membership changes seldom, batches often.

        Computing a cover hashes every (block, worker) pair (about 0.3 ms for 128 blocks),
        as much as the rest of a one-query batch costs here.
        """
        key = (frozenset(owners.items()), blocks)
        plan = self._covers.get(key)
        if plan is None:
            if len(self._covers) >= 64:  # membership churn: forget old covers
                self._covers.clear()
            plan = self._covers[key] = cover(owners, blocks)
        return plan

    async def execute(self, target: str, batch: list[Pending]) -> None:
        """Run a batch of search requests and resolve each one's future."""
        start = time.monotonic()
        try:
            await self._execute(target, batch, start)
        except Exception as exc:  # not hidden: every waiting caller gets this error
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)

    def _queries(self, target: str, batch: list[Pending]) -> list[tuple[Pending, np.ndarray]]:
        """Each request's query matrix; a malformed request fails alone."""
        decl = self._collections.values.get(target)
        dim = decl.dim if decl is not None else -1
        good = []
        for p in batch:
            try:
                if len(p.item.inputs) != 1:
                    raise InvalidArgument("a search item carries exactly one tensor: the queries")
                q = to_numpy(p.item.inputs[0])
                if q.dtype != np.float32 or q.ndim != 2 or q.shape[0] == 0:
                    raise InvalidArgument(
                        f"queries must be FP32 [n, dim] with n >= 1, got {q.dtype} {list(q.shape)}"
                    )
                if dim > 0 and q.shape[1] != dim:
                    raise InvalidArgument(
                        f"queries have dim {q.shape[1]}; collection {target!r} has dim {dim}"
                    )
                if p.item.k == 0:
                    raise InvalidArgument("search needs k >= 1")
            except InvalidArgument as exc:
                p.future.set_exception(exc)
                continue
            good.append((p, q))
        return good

    async def _execute(self, target: str, batch: list[Pending], start: float) -> None:
        decl = self._collections.values.get(target)
        metric = cast(Metric, decl.metric if decl is not None else "ip")
        items = self._queries(target, batch)
        # Requests with the same nprobe share one matrix; k is the largest asked (cut later).
        groups: dict[int, list[tuple[Pending, np.ndarray]]] = {}
        for p, q in items:
            groups.setdefault(p.item.nprobe, []).append((p, q))
        for nprobe, group in groups.items():
            queries = np.concatenate([q for _, q in group]) if len(group) > 1 else group[0][1]
            k = max(p.item.k for p, _ in group)
            timeout = max(p.deadline for p, _ in group) - time.monotonic()
            # Hits (payload reads, one message per rank) only if some request wants them.
            omit = all(p.item.omit_hits for p, _ in group)
            scores, ids, payload, exec_ms, workers = await self._scatter(
                target, queries, k, nprobe, metric, timeout, omit
            )
            queue_ms = [(start - p.enqueued) * 1000.0 for p, _ in group]
            row = 0
            for (p, q), waited in zip(group, queue_ms, strict=True):
                n, kk = q.shape[0], p.item.k
                s, i = scores[row : row + n, :kk], ids[row : row + n, :kk]
                row += n
                hits = [] if p.item.omit_hits else [
                    _hit(x, sc, payload.get(x))
                    for x, sc in zip(i.reshape(-1).tolist(), s.reshape(-1).tolist(), strict=True)
                ]
                result = common_pb2.WorkResult(
                    request_id=p.item.request_id,
                    outputs=[from_numpy("scores", s), from_numpy("ids", i)],
                    hits=hits,
                )
                if not p.future.done():
                    p.future.set_result(
                        Outcome(result=result, queue_ms=waited, exec_ms=exec_ms,
                                worker=",".join(workers), batch_size=len(batch))
                    )

    async def _scatter(
        self, target: str, queries: np.ndarray, k: int, nprobe: int, metric: Metric,
        timeout: float, omit_hits: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, dict[int, common_pb2.Hit], float, list[str]]:
        """One Search per covering worker; re-cover the blocks of workers that fail."""
        tensor = from_numpy("queries", queries)
        batch_id = next_batch_id()
        parts: list[tuple[np.ndarray, np.ndarray]] = []
        payload: dict[int, common_pb2.Hit] = {}
        failed: set[str] = set()
        workers: list[str] = []
        exec_ms = 0.0
        deadline_ms = int((time.time() + timeout) * 1000)
        missing: frozenset[int] | None = None  # None: every advertised block
        for _round in range(ROUNDS):
            owners = self.owners(target, failed)
            if not owners:
                raise Unavailable(f"no healthy retrieval worker serves collection {target!r}"
                                  + (f" (failed: {', '.join(sorted(failed))})" if failed else ""))
            plan = self._cover(owners, missing)
            # A worker that covers every advertised block alone searches all it holds (no
            # list: a collection of 128 blocks cost ~45 µs per search to send and mask).
            whole = missing is None and len(plan) == 1
            calls = [
                self._search(e, retrieval_worker_pb2.SearchRequest(
                    collection=target, queries=tensor, k=k, nprobe=nprobe,
                    blocks=() if whole else blocks, batch_id=batch_id, omit_hits=omit_hits,
                    deadline_unix_ms=deadline_ms,
                ), timeout)
                for e, blocks in plan.items()
            ]
            answers = await asyncio.gather(*calls, return_exceptions=True)
            lost: set[int] = set()
            for (endpoint, blocks), answer in zip(plan.items(), answers, strict=True):
                if isinstance(answer, BaseException):
                    if isinstance(answer, _Gone):
                        failed.add(endpoint)
                        lost.update(blocks)
                        continue
                    raise answer
                parts.append((to_numpy(answer.scores), to_numpy(answer.ids)))
                for h in answer.hits:
                    if h.id >= 0:
                        payload[h.id] = h
                exec_ms = max(exec_ms, answer.exec_ms)
                workers.append(answer.worker)
            if not lost:
                # One worker's answer is already the top-k: a merge would only copy it.
                one = len(parts) == 1 and parts[0][0].shape[1] == k
                scores, ids = parts[0] if one else merge_topk(parts, k, metric)
                return scores, ids, payload, exec_ms, workers
            log.warning("retrieval workers %s failed a search; re-covering %d blocks",
                        ", ".join(sorted(failed)), len(lost))
            missing = frozenset(lost)
        raise Unavailable(f"search of {target!r} failed on {', '.join(sorted(failed))}")

    async def _search(
        self, endpoint: str, request: retrieval_worker_pb2.SearchRequest, timeout: float
    ) -> retrieval_worker_pb2.SearchResponse:
        n = request.queries.shape[0]
        self.outstanding[endpoint] = self.outstanding.get(endpoint, 0) + n
        try:
            reply = await self._streams.get(endpoint).call(request, max(timeout, 0.001))
        except PeerGone:
            # Unreachable, died or draining: it did not answer, its blocks go elsewhere.
            self._members.forget(endpoint)
            raise _Gone(endpoint) from None
        except DeadlineExceeded:
            raise DeadlineExceeded(f"deadline passed while searching on {endpoint}") from None
        finally:
            self.outstanding[endpoint] -= n
        if reply.error_code:
            raise error_from(reply.error_code, reply.error_message, SERVICE)
        return reply



def _hit(doc_id: int, score: float, src: common_pb2.Hit | None) -> common_pb2.Hit:
    if src is None:
        return common_pb2.Hit(id=doc_id, score=score)
    return common_pb2.Hit(id=doc_id, score=score, text=src.text, metadata_json=src.metadata_json)


class _Gone(Exception):
    """A worker became unreachable during a search (its blocks go to another worker)."""
