"""Batcher wiring: model specs and members from NATS, one queue per target, dispatch."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Coroutine
from typing import Any

import grpc

from services.batcher.config import BatcherConfig
from services.batcher.controller import BatchController
from services.batcher.dispatch import WorkerPool
from services.batcher.handlers import BatcherServicer, Queues
from services.batcher.queue import Policy, TargetQueue
from services.batcher.scatter import Scatter
from shared import metrics
from shared.errors import NotFound, Unavailable
from shared.events import (
    MODELS_BUCKET,
    POLICY_BUCKET,
    BatchPolicy,
    ModelSpec,
    batch_policy_decoder,
    model_spec_decoder,
)
from shared.ingestlog import COLLECTIONS_BUCKET, CollectionDeclared, declared_decoder
from shared.kvview import KVView
from shared.lifecycle import Service
from shared.pb.infermesh.v1 import batcher_pb2, batcher_pb2_grpc

log = logging.getLogger(__name__)


class Batcher(Service, Queues):
    """Per-target queues in front of the inference (and later retrieval) workers."""

    name = "batcher"
    grpc_services = (batcher_pb2.DESCRIPTOR.services_by_name["Batcher"].full_name,)

    def __init__(self, config: BatcherConfig) -> None:
        super().__init__(config)
        self.cfg = config
        self.default_timeout_s = config.default_timeout_ms / 1000.0
        self.queues: dict[str, TargetQueue] = {}
        self.models: KVView[ModelSpec] | None = None
        self.policies: KVView[BatchPolicy] | None = None
        self.controller: BatchController | None = None
        self.pool: WorkerPool | None = None
        self.collections: KVView[CollectionDeclared] | None = None
        self.scatter: Scatter | None = None
        self.servicer = BatcherServicer(self)

    def watches_members(self) -> bool:
        return True

    def register(self, server: grpc.aio.Server) -> None:
        batcher_pb2_grpc.add_BatcherServicer_to_server(self.servicer, server)

    async def on_start(self) -> None:
        assert self.bus is not None and self.members is not None
        self.models = KVView(self.bus, MODELS_BUCKET, model_spec_decoder)
        self.collections = KVView(self.bus, COLLECTIONS_BUCKET, declared_decoder)
        self.scatter = Scatter(self.members, self.collections, self.channels)
        self.spawn(self.collections.run())
        self.pool = WorkerPool(self.members, "inference-worker", self.channels)
        self.spawn(self.models.run())
        # Every replica applies the policies in KV; the view keeps the last ones through a
        # NATS outage, so batching goes on as last decided.
        self.policies = KVView(
            self.bus, POLICY_BUCKET, batch_policy_decoder, on_change=self._apply_policy
        )
        self.spawn(self.policies.run())
        if self.cfg.batch_controller:
            law = self.cfg.batch_controller_law
            if law not in ("fitted", "aimd"):
                raise ValueError(f"INFERMESH_BATCH_CONTROLLER_LAW: unknown law {law!r}")
            self.controller = BatchController(
                self.bus,
                self.instance,
                self.models,
                self.policies,
                law_name="aimd" if law == "aimd" else "fitted",
                interval_s=self.cfg.batch_controller_interval_s,
                window_s=self.cfg.batch_controller_window_s,
                lease_s=self.cfg.batch_controller_lease_s,
            )

    def loops(self) -> list[Callable[[], Coroutine[Any, Any, None]]]:
        return [self.controller.run] if self.controller is not None else []

    async def on_stop(self) -> None:
        if self.controller is not None:
            await self.controller.lease.release()
        for q in self.queues.values():
            q.fail_all(Unavailable("batcher is shutting down"))

    def _policy(self, spec: ModelSpec) -> Policy:
        return Policy(
            max_batch_size=spec.max_batch_size,
            max_delay_ms=spec.max_delay_ms,
            preferred_sizes=spec.preferred_batch_sizes,
            capacity=spec.max_queue or self.cfg.default_capacity,
            limit=spec.max_batch_size,
        )

    def _with_kv_policy(self, policy: Policy, target: str, spec: ModelSpec) -> Policy:
        """policy with the batch policy from KV applied, within the model's limits."""
        written = self.policies.values.get(target) if self.policies is not None else None
        if written is None:
            return policy
        return dataclasses.replace(
            policy,
            max_batch_size=max(1, min(written.max_batch_size, spec.max_batch_size)),
            max_delay_ms=max(0.0, written.max_delay_ms),
            preferred_sizes=written.preferred_sizes,
            gather=written.gather,
            limit=spec.max_batch_size,
        )

    def _apply_policy(self, target: str, written: BatchPolicy | None) -> None:
        # A deleted policy leaves the queue as it is: the last decision stays in force.
        queue = self.queues.get(target)
        if written is None or queue is None or self.models is None:
            return
        spec = self.models.values.get(target)
        if spec is None:
            return
        policy = self._with_kv_policy(queue.policy, target, spec)
        if policy != queue.policy:
            queue.set_policy(policy)
            metrics.POLICY_MAX_BATCH.labels(target).set(policy.max_batch_size)
            metrics.POLICY_MAX_DELAY.labels(target).set(policy.max_delay_ms / 1000.0)

    def queue_for(self, target: str, kind: int) -> TargetQueue:
        queue = self.queues.get(target)
        if queue is not None:
            return queue
        if kind == batcher_pb2.TARGET_KIND_COLLECTION:
            return self._collection_queue(target)
        assert self.models is not None and self.pool is not None
        spec = self.models.values.get(target)
        if spec is None:
            known = ", ".join(sorted(self.models.values)) or "none"
            raise NotFound(f"unknown model {target!r} (served: {known})")
        pool, models, inflight = self.pool, self.models, self.cfg.inflight_per_worker

        def slots() -> int:
            spec = models.values.get(target)
            per_worker = max(spec.instances if spec is not None else 1, inflight)
            return max(1, len(pool.candidates(target))) * max(1, per_worker)

        policy = self._with_kv_policy(self._policy(spec), target, spec)
        queue = TargetQueue(target, policy, pool.execute, slots)
        self.queues[target] = queue
        metrics.POLICY_MAX_BATCH.labels(target).set(policy.max_batch_size)
        metrics.POLICY_MAX_DELAY.labels(target).set(policy.max_delay_ms / 1000.0)
        metrics.TARGET_SLO.labels(target).set(spec.slo_ms / 1000.0)
        self.spawn(queue.run())
        return queue

    def _collection_queue(self, target: str) -> TargetQueue:
        """A queue of search requests for a collection; each batch is one scatter/gather."""
        assert self.collections is not None and self.scatter is not None
        if target not in self.collections.values:
            known = ", ".join(sorted(self.collections.values)) or "none"
            raise NotFound(f"unknown collection {target!r} (collections: {known})")
        scatter = self.scatter
        cfg = self.cfg
        policy = Policy(
            max_batch_size=cfg.search_max_batch_size,
            max_delay_ms=cfg.search_max_delay_ms,
            capacity=cfg.default_capacity,
        )
        queue = TargetQueue(
            target,
            policy,
            scatter.execute,
            # Each batch occupies every covering worker once: slots per batch, not per worker.
            lambda: cfg.inflight_per_worker,
        )
        self.queues[target] = queue
        metrics.POLICY_MAX_BATCH.labels(target).set(policy.max_batch_size)
        metrics.POLICY_MAX_DELAY.labels(target).set(policy.max_delay_ms / 1000.0)
        self.spawn(queue.run())
        return queue

    def all(self) -> list[TargetQueue]:
        return list(self.queues.values())

    def targets(self) -> tuple[str, ...]:
        return tuple(sorted(self.queues))

    def load(self) -> int:
        return sum(len(q) for q in self.queues.values())
