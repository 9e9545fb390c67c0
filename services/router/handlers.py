"""The Router gRPC servicer: validate, set the deadline, run each step through the batcher."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator

import grpc
from opentelemetry import trace

from services.router.pipelines import Pipelines
from services.router.upstream import Batchers
from shared import streams
from shared.errors import (
    InvalidArgument,
    NotFound,
)
from shared.events import ModelSpec
from shared.kvview import KVView
from shared.pb.infermesh.v1 import (
    batcher_pb2,
    common_pb2,
    router_pb2,
    router_pb2_grpc,
)
from shared.status_codes import error_fields
from shared.tensors import to_numpy
from shared.validation import check_inputs

log = logging.getLogger(__name__)
tracer = trace.get_tracer("infermesh.router")

MAX_REQUEST_ID = 128


class RouterServicer(router_pb2_grpc.RouterServicer):
    """Router.Infer and friends."""

    def __init__(
        self,
        models: KVView[ModelSpec],
        batchers: Batchers,
        default_timeout_s: float,
        max_tensor_elements: int,
        pipelines: Pipelines | None = None,
    ) -> None:
        self._models = models
        self._batchers = batchers
        self._default_timeout = default_timeout_s
        self._max_elements = max_tensor_elements
        self._pipelines = pipelines

    def _spec(self, name: str) -> ModelSpec:
        spec = self._models.values.get(name)
        if spec is None:
            known = ", ".join(sorted(self._models.values)) or "none"
            raise NotFound(f"unknown model {name!r} (served: {known})")
        return spec

    def spec(self, name: str) -> ModelSpec:
        """A served model's spec (NotFound naming it and the served ones); KServe uses it."""
        return self._spec(name)

    def served(self) -> list[str]:
        """Names of the models the mesh serves now, sorted."""
        return sorted(self._models.values)

    def _timeout(self, request: router_pb2.InferRequest, remaining: float | None) -> float:
        budget = [self._default_timeout]
        if request.timeout_ms:
            budget.append(request.timeout_ms / 1000.0)
        if remaining is not None:
            budget.append(remaining)
        return min(budget)

    async def infer(
        self, request: router_pb2.InferRequest, remaining: float | None
    ) -> router_pb2.InferResponse:
        """One request end to end (shared by Infer, InferStream and KServe ModelInfer)."""
        start = time.perf_counter()
        if len(request.request_id) > MAX_REQUEST_ID:
            raise InvalidArgument(f"request_id longer than {MAX_REQUEST_ID} characters")
        request_id = request.request_id or uuid.uuid4().hex
        if bool(request.model) == bool(request.pipeline):
            raise InvalidArgument("set exactly one of model or pipeline")
        if request.pipeline:
            if self._pipelines is None:
                raise NotFound(f"unknown pipeline {request.pipeline!r} (configured: none)")
            return await self._pipelines.run(
                request, request_id, self._timeout(request, remaining)
            )
        spec = self._spec(request.model)
        inputs = {t.name: to_numpy(t, self._max_elements) for t in request.inputs}
        if len(inputs) != len(request.inputs):
            raise InvalidArgument("input names must be unique")
        check_inputs(spec, inputs, request.texts)
        timeout = self._timeout(request, remaining)
        item = common_pb2.WorkItem(
            request_id=request_id,
            inputs=request.inputs,
            texts=request.texts,
            deadline_unix_ms=int((time.time() + timeout) * 1000),
        )
        submit = batcher_pb2.SubmitRequest(
            target=spec.name,
            kind=batcher_pb2.TARGET_KIND_MODEL,
            item=item,
            priority=request.priority,
        )
        reply = await self._batchers.submit(submit, timeout)
        total_ms = (time.perf_counter() - start) * 1000.0
        return router_pb2.InferResponse(
            request_id=request_id,
            model=spec.name,
            outputs=reply.result.outputs,
            timings=[
                common_pb2.StepTiming(
                    step="infer",
                    target=spec.name,
                    queue_ms=reply.queue_ms,
                    exec_ms=reply.exec_ms,
                    total_ms=total_ms,
                    worker=reply.worker,
                    batch_size=reply.batch_size,
                )
            ],
        )

    async def Infer(
        self, request: router_pb2.InferRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.InferResponse:
        return await self.infer(request, context.time_remaining())

    async def InferStream(
        self,
        requests: AsyncIterator[router_pb2.InferRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[router_pb2.InferResponse]:
        """Requests run concurrently; each answer carries its request_id and any error inline."""
        async for reply in streams.answer_concurrently(
            requests,
            lambda req: self.infer(req, None),
            lambda req, exc: _error_response(req.request_id, exc),
        ):
            yield reply

    async def ListTargets(
        self, request: router_pb2.ListTargetsRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.ListTargetsResponse:
        return router_pb2.ListTargetsResponse(
            models=sorted(self._models.values),
            pipelines=self._pipelines.names() if self._pipelines else [],
            collections=sorted(self._pipelines.collections.values) if self._pipelines else [],
        )


def _error_response(request_id: str, exc: BaseException) -> router_pb2.InferResponse:
    return router_pb2.InferResponse(request_id=request_id, **error_fields(exc))
