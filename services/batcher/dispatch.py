"""Dispatch of formed batches to the least-loaded healthy worker that serves the target.

Load is the number of items this batcher has outstanding on each worker (exact and current),
tie-broken by the load the worker last reported in membership (which counts other batcher
replicas too). A worker that fails mid-batch is dropped from the view until it heartbeats
again, and the batch is retried once on another worker (model execution is idempotent).
Batches travel on one long-lived InferenceWorker.ExecuteStream per worker (shared/streams.py).
"""

from __future__ import annotations

import logging
import random
import time

from opentelemetry.trace import Span

from services.batcher.queue import Outcome, Pending
from services.batcher.tracing import batch_span, next_batch_id
from shared import rpc
from shared.errors import Unavailable
from shared.events import Member
from shared.membership import MemberView
from shared.pb.infermesh.v1 import inference_worker_pb2, inference_worker_pb2_grpc
from shared.status_codes import error_from
from shared.streams import PeerGone, Streams

log = logging.getLogger(__name__)


class WorkerPool:
    """Channels to the workers of one service and the items outstanding on each."""

    def __init__(self, members: MemberView, service: str, channels: rpc.Channels) -> None:
        self._members = members
        self._service = service
        self._streams: Streams[
            inference_worker_pb2.ExecuteRequest, inference_worker_pb2.ExecuteResponse
        ] = Streams(
            channels,
            inference_worker_pb2_grpc.InferenceWorkerStub,
            "ExecuteStream",
            inference_worker_pb2.ExecuteCalls,
            "infermesh.v1.InferenceWorker/Execute",
            service,
        )
        self.outstanding: dict[str, int] = {}

    def candidates(self, target: str) -> list[Member]:
        """Live, SERVING workers that serve target."""
        return [
            m
            for m in self._members.members(self._service)
            if target in m.targets and m.health == "SERVING"
        ]

    def pick(self, target: str, exclude: set[str]) -> Member | None:
        """The least-loaded candidate not in exclude."""
        best: list[Member] = []
        best_key: tuple[int, int] | None = None
        for m in self.candidates(target):
            if m.endpoint in exclude:
                continue
            key = (self.outstanding.get(m.endpoint, 0), m.load)
            if best_key is None or key < best_key:
                best, best_key = [m], key
            elif key == best_key:
                best.append(m)
        return random.choice(best) if best else None

    async def execute(self, target: str, batch: list[Pending]) -> None:
        """Run a batch on a worker and resolve every request's future."""
        start = time.monotonic()
        queue_ms = sum((start - p.enqueued) for p in batch) * 1000.0 / len(batch)
        request = inference_worker_pb2.ExecuteRequest(
            model=target,
            batch_id=next_batch_id(),
            items=[p.item for p in batch],
            queue_ms=queue_ms,
        )
        timeout = max(p.deadline for p in batch) - start
        with batch_span(target, "model", batch) as span:
            span.set_attribute("infermesh.batch_id", request.batch_id)
            await self._run(target, batch, request, start, timeout, span)

    async def _run(
        self,
        target: str,
        batch: list[Pending],
        request: inference_worker_pb2.ExecuteRequest,
        start: float,
        timeout: float,
        span: Span,
    ) -> None:
        tried: set[str] = set()
        try:
            for _attempt in range(2):
                member = self.pick(target, tried)
                if member is None:
                    break
                endpoint = member.endpoint
                tried.add(endpoint)
                span.set_attribute("infermesh.worker", endpoint)
                self.outstanding[endpoint] = self.outstanding.get(endpoint, 0) + len(batch)
                try:
                    reply = await self._streams.get(endpoint).call(
                        request, max(start + timeout - time.monotonic(), 0.001)
                    )
                except PeerGone as gone:
                    # The worker went away or drains: the batch may run again elsewhere,
                    # since model execution is idempotent.
                    log.warning(
                        "worker %s did not run a batch (%s); retrying elsewhere", endpoint, gone
                    )
                    self._members.forget(endpoint)
                    continue
                finally:
                    self.outstanding[endpoint] -= len(batch)
                if reply.error_code:
                    raise error_from(reply.error_code, reply.error_message, self._service)
                _resolve(batch, reply, start)
                return
            raise Unavailable(
                f"no healthy worker serves {target!r}"
                + (f" (tried {', '.join(sorted(tried))})" if tried else "")
            )
        except Exception as exc:
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)


def _resolve(
    batch: list[Pending],
    reply: inference_worker_pb2.ExecuteResponse,
    start: float,
) -> None:
    worker = reply.worker
    for p, result in zip(batch, reply.results, strict=False):
        if not p.future.done():
            p.future.set_result(
                Outcome(
                    result=result,
                    queue_ms=(start - p.enqueued) * 1000.0,
                    exec_ms=reply.exec_ms,
                    worker=worker,
                    batch_size=len(batch),
                )
            )
