"""The Batcher gRPC servicer: queue a request's work and answer when its batch has run."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import grpc

from services.batcher.queue import Outcome, TargetQueue
from services.batcher.tracing import record_queue_wait
from shared import streams
from shared.errors import DeadlineExceeded, InvalidArgument
from shared.pb.infermesh.v1 import batcher_pb2, batcher_pb2_grpc, common_pb2
from shared.status_codes import error_fields, error_from

log = logging.getLogger(__name__)


class Queues:
    """What the servicer needs from the app: a queue per target and the default timeout."""

    default_timeout_s: float = 30.0
    #: Answers packed into one SubmitStream message at most (streams.bundle_budget).
    bundle_bytes: int = streams.BUNDLE_BYTES
    #: Set when the batcher drains: open SubmitStreams tell the router to go elsewhere.
    draining: asyncio.Event

    def queue_for(self, target: str, kind: int) -> TargetQueue:  # pragma: no cover - protocol
        raise NotImplementedError

    def all(self) -> list[TargetQueue]:  # pragma: no cover - protocol
        raise NotImplementedError


class BatcherServicer(batcher_pb2_grpc.BatcherServicer):
    """Submit / SubmitStream / QueueStatus."""

    def __init__(self, queues: Queues) -> None:
        self._queues = queues

    async def _submit(
        self, request: batcher_pb2.SubmitRequest, time_remaining: float | None
    ) -> batcher_pb2.SubmitResponse:
        if not request.target:
            raise InvalidArgument("submit needs a target (model or collection name)")
        queue = self._queues.queue_for(request.target, request.kind)
        now_unix = time.time()
        timeouts = [self._queues.default_timeout_s]
        if time_remaining is not None:
            timeouts.append(time_remaining)
        if request.item.deadline_unix_ms:
            timeouts.append(request.item.deadline_unix_ms / 1000.0 - now_unix)
        timeout = min(timeouts)
        if timeout <= 0:
            raise DeadlineExceeded(f"request for {request.target!r} arrived past its deadline")
        pending = queue.submit(request.item, request.priority, time.monotonic() + timeout)
        try:
            outcome: Outcome = await asyncio.wait_for(pending.future, timeout=timeout)
        except TimeoutError:
            raise DeadlineExceeded(
                f"deadline of {timeout * 1e3:.0f} ms passed waiting for {request.target!r}"
            ) from None
        record_queue_wait(pending, request.target, outcome.batch_size)
        result = outcome.result
        if result.error_code:
            raise error_from(result.error_code, result.error_message)
        return batcher_pb2.SubmitResponse(
            result=result,
            queue_ms=outcome.queue_ms,
            exec_ms=outcome.exec_ms,
            worker=outcome.worker,
            batch_size=outcome.batch_size,
            call_id=request.call_id,
        )

    async def Submit(
        self, request: batcher_pb2.SubmitRequest, context: grpc.aio.ServicerContext
    ) -> batcher_pb2.SubmitResponse:
        return await self._submit(request, context.time_remaining())

    async def SubmitStream(
        self,
        requests: AsyncIterator[batcher_pb2.SubmitCalls],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[batcher_pb2.SubmitAnswers]:
        """Many submits over one stream (the router's data path); answers matched by call_id.

        Errors come inline. When the batcher drains it tells the router to send new submits
        elsewhere, and answers the ones it has (shared/streams.py).
        """
        async for reply in streams.answer_concurrently(
            requests,
            lambda req: self._submit(req, None),
            _error_reply,
            stopping=self._queues.draining,
            per_message=SUBMIT,
            bundle_bytes=self._queues.bundle_bytes,
        ):
            yield reply

    async def QueueStatus(
        self, request: batcher_pb2.QueueStatusRequest, context: grpc.aio.ServicerContext
    ) -> batcher_pb2.QueueStatusResponse:
        return batcher_pb2.QueueStatusResponse(
            queues=[
                batcher_pb2.TargetQueue(
                    target=q.target,
                    depth=len(q),
                    max_batch_size=q.policy.max_batch_size,
                    max_delay_ms=q.policy.max_delay_ms,
                    capacity=q.policy.capacity,
                )
                for q in self._queues.all()
            ]
        )


def _error_reply(
    request: batcher_pb2.SubmitRequest, exc: BaseException
) -> batcher_pb2.SubmitResponse:
    return batcher_pb2.SubmitResponse(
        result=common_pb2.WorkResult(
            request_id=request.item.request_id, **error_fields(exc)
        ),
        call_id=request.call_id,
    )


#: Metrics and spans of SubmitStream messages, under the unary method's name.
SUBMIT = streams.PerMessage(
    service="batcher",
    method="infermesh.v1.Batcher/Submit",
    answer_code=lambda reply: reply.result.error_code,
    answer=batcher_pb2.SubmitResponse,
    bundle=batcher_pb2.SubmitAnswers,
)
