"""The InferenceWorker gRPC servicer: decode a batch, run the backend, encode results."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import numpy as np
from opentelemetry import trace

from services.inference_worker.backends import Backend, Item
from services.inference_worker.repository import ModelConfig
from shared import streams
from shared.errors import DeadlineExceeded, InfermeshError, NotFound
from shared.events import BATCH_OBSERVED, BatchesObserved, BatchObserved, Event
from shared.pb.infermesh.v1 import common_pb2, inference_worker_pb2, inference_worker_pb2_grpc
from shared.status_codes import error_fields
from shared.tensors import from_numpy, to_numpy
from shared.validation import check_inputs

log = logging.getLogger(__name__)
tracer = trace.get_tracer("infermesh.inference_worker")


class Model:
    """A loaded model: its declaration and the backend that runs it."""

    def __init__(self, config: ModelConfig, backend: Backend) -> None:
        self.config = config
        self.spec = config.spec()
        self.backend = backend
        #: The batcher may keep more batches in flight than the model has instances (the next
        #: one is here when one ends); this makes them wait their turn, not run beside them.
        self.slots = asyncio.Semaphore(config.instances)


class Observations:
    """The worker's batch observations for the controller, a message per target per interval.

    The first batch of a target starts an interval (``interval_s``); what the target ran until
    it ends goes out as one BatchesObserved (a lone batch as its BatchObserved), or sooner
    once ``max_batches`` are waiting. Publishing is fire and forget: the control path must
    never slow or fail the data path.
    """

    def __init__(
        self,
        publish: Callable[[str, Event], Awaitable[None]],
        worker: str,
        interval_s: float = 0.05,
        max_batches: int = 64,
    ) -> None:
        self._publish = publish
        self._worker = worker
        self._interval = interval_s
        self._max = max_batches
        self._waiting: dict[str, list[BatchObserved]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def add(self, event: BatchObserved) -> None:
        waiting = self._waiting.setdefault(event.target, [])
        waiting.append(event)
        if len(waiting) >= self._max:
            self.flush(event.target)
        elif len(waiting) == 1:
            asyncio.get_running_loop().call_later(self._interval, self.flush, event.target)

    def flush(self, target: str) -> None:
        """Send what target has waiting (nothing when a full batch already went)."""
        waiting = self._waiting.pop(target, None)
        if not waiting:
            return
        event: Event = (
            waiting[0]
            if len(waiting) == 1
            else BatchesObserved(target=target, worker=self._worker, batches=tuple(waiting))
        )
        task = asyncio.get_running_loop().create_task(
            self._publish(f"{BATCH_OBSERVED}.{target}", event)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


class InferenceWorkerServicer(inference_worker_pb2_grpc.InferenceWorkerServicer):
    """Executes batches formed by the batcher."""

    def __init__(
        self,
        models: dict[str, Model],
        worker: str,
        publish: Callable[[str, Event], Awaitable[None]],
        draining: asyncio.Event | None = None,
        bundle_bytes: int = streams.BUNDLE_BYTES,
    ) -> None:
        self.models = models
        self._bundle_bytes = bundle_bytes
        self.worker = worker
        self._observations = Observations(publish, worker)
        self._draining = draining
        self.outstanding = 0

    async def Execute(
        self, request: inference_worker_pb2.ExecuteRequest, context: grpc.aio.ServicerContext
    ) -> inference_worker_pb2.ExecuteResponse:
        return await self._run(request)

    async def ExecuteStream(
        self,
        requests: AsyncIterator[inference_worker_pb2.ExecuteCalls],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[inference_worker_pb2.ExecuteAnswers]:
        """Batches over one stream (the batcher's data path); answers matched by call_id.

        A batch that fails as a whole answers inline. When the worker drains it tells the
        batcher to send new batches elsewhere, and answers the ones it has.
        """
        async for reply in streams.answer_concurrently(
            requests,
            self._run,
            stopping=self._draining,
            per_message=EXECUTE,
            bundle_bytes=self._bundle_bytes,
        ):
            yield reply

    async def _run(
        self, request: inference_worker_pb2.ExecuteRequest
    ) -> inference_worker_pb2.ExecuteResponse:
        model = self.models.get(request.model)
        if model is None:
            raise NotFound(
                f"model {request.model!r} is not loaded on this worker "
                f"(loaded: {', '.join(sorted(self.models))})"
            )
        n = len(request.items)
        self.outstanding += n
        try:
            return await self._execute(model, request)
        finally:
            self.outstanding -= n

    async def _execute(
        self, model: Model, request: inference_worker_pb2.ExecuteRequest
    ) -> inference_worker_pb2.ExecuteResponse:
        results: list[common_pb2.WorkResult | None] = [None] * len(request.items)
        runnable: list[int] = []
        items: list[Item] = []
        now_ms = time.time() * 1000.0
        expired = 0
        for i, wire in enumerate(request.items):
            if wire.deadline_unix_ms and wire.deadline_unix_ms <= now_ms:
                # Arrived after its deadline (a slow link): the caller has given up.
                results[i] = _failed(
                    wire.request_id, DeadlineExceeded("deadline passed before the batch ran")
                )
                expired += 1
                continue
            try:
                inputs = {t.name: to_numpy(t) for t in wire.inputs}
                check_inputs(model.spec, inputs, wire.texts)
            except InfermeshError as exc:
                results[i] = _failed(wire.request_id, exc)
                continue
            runnable.append(i)
            items.append(Item(inputs=inputs, texts=list(wire.texts)))
        if expired == len(request.items):
            raise DeadlineExceeded(
                f"batch of {expired} arrived after the deadline of every request in it; not run"
            )
        if items:
            async with model.slots:
                outputs, exec_ms = await self._timed(model, items)
            for i, out in zip(runnable, outputs, strict=True):
                results[i] = common_pb2.WorkResult(
                    request_id=request.items[i].request_id,
                    outputs=[from_numpy(name, np.asarray(a)) for name, a in out.items()],
                )
            # The controller fits exec time against samples, as the batcher counts them.
            rows = sum(
                len(it.texts) or next((len(a) for a in it.inputs.values()), 1) for it in items
            )
            self._observe(model.spec.name, rows, request.queue_ms, exec_ms)
        else:
            exec_ms = 0.0
        return inference_worker_pb2.ExecuteResponse(
            results=results, exec_ms=exec_ms, worker=self.worker, call_id=request.call_id
        )

    async def _timed(
        self, model: Model, items: list[Item]
    ) -> tuple[list[dict[str, np.ndarray]], float]:
        """The backend's outputs for items and how long it ran, in ms (the slot's wait aside)."""
        start = time.perf_counter()
        with tracer.start_as_current_span(
            "model.execute",
            attributes={
                "infermesh.model": model.spec.name,
                "infermesh.backend": model.spec.backend,
                "infermesh.batch_size": len(items),
            },
        ):
            if model.backend.blocking:
                outputs = await asyncio.to_thread(model.backend.execute, items)
            else:
                outputs = model.backend.execute(items)
        return outputs, (time.perf_counter() - start) * 1000.0

    def _observe(self, target: str, size: int, queue_ms: float, exec_ms: float) -> None:
        self._observations.add(
            BatchObserved(
                target=target,
                size=size,
                queue_ms=queue_ms,
                exec_ms=exec_ms,
                worker=self.worker,
                at_unix=time.time(),
            )
        )

    async def ListModels(
        self, request: inference_worker_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> inference_worker_pb2.ListModelsResponse:
        out = []
        for m in self.models.values():
            s = m.spec
            out.append(
                inference_worker_pb2.ModelInfo(
                    name=s.name,
                    backend=s.backend,
                    inputs=[
                        inference_worker_pb2.TensorSpec(name=t.name, dtype=t.dtype, shape=t.shape)
                        for t in s.inputs
                    ],
                    outputs=[
                        inference_worker_pb2.TensorSpec(name=t.name, dtype=t.dtype, shape=t.shape)
                        for t in s.outputs
                    ],
                    max_batch_size=s.max_batch_size,
                    slo_ms=s.slo_ms,
                    version=s.version,
                    accepts_text=s.accepts_text,
                )
            )
        return inference_worker_pb2.ListModelsResponse(models=out)


def _failed(request_id: str, exc: BaseException) -> common_pb2.WorkResult:
    return common_pb2.WorkResult(
        request_id=request_id, **error_fields(exc)
    )


#: Metrics and spans of ExecuteStream messages, under the unary method's name.
EXECUTE = streams.PerMessage(
    service="inference-worker",
    method="infermesh.v1.InferenceWorker/Execute",
    answer_code=lambda reply: reply.error_code,
    answer=inference_worker_pb2.ExecuteResponse,
    bundle=inference_worker_pb2.ExecuteAnswers,
)
