"""Inference worker wiring: load the model repository, serve Execute, publish model specs."""

from __future__ import annotations

import logging
from pathlib import Path

import grpc

from services.inference_worker.backends import BackendUnavailable
from services.inference_worker.backends.factory import make_backend
from services.inference_worker.config import WorkerConfig
from services.inference_worker.handlers import InferenceWorkerServicer, Model
from services.inference_worker.repository import load_repository
from shared import gpu
from shared.events import MODELS_BUCKET, Event
from shared.lifecycle import Service
from shared.pb.infermesh.v1 import inference_worker_pb2, inference_worker_pb2_grpc

log = logging.getLogger(__name__)


class InferenceWorker(Service):
    """Runs batches of the models in its repository."""

    name = "inference-worker"
    grpc_services = (inference_worker_pb2.DESCRIPTOR.services_by_name["InferenceWorker"].full_name,)

    def __init__(self, config: WorkerConfig) -> None:
        super().__init__(config)
        self.cfg = config
        root = Path(config.model_repository)
        only = tuple(n.strip() for n in config.models.split(",") if n.strip())
        self.configs = load_repository(root, only)
        cache = Path(config.model_cache) if config.model_cache else config.data_path / "models"
        self.models: dict[str, Model] = {}
        for name, c in self.configs.items():
            try:
                backend = make_backend(c, root / name, cache, config.threads)
            except BackendUnavailable as exc:
                if only:
                    raise  # asked for by name: failing to load it is an error, not a choice
                # Loading the whole repository: an optional backend (torch on a machine
                # without it) must not take the other models down.
                log.warning("model %s skipped: %s", name, exc.message)
                continue
            self.models[name] = Model(c, backend)
        self.servicer = InferenceWorkerServicer(
            self.models,
            self.instance,
            self._publish,
            self.draining,
            self.bundle_bytes,
        )

    async def _publish(self, subject: str, event: Event) -> None:
        if self.bus is not None and self.bus.connected:
            await self.bus.publish(subject, event)

    def register(self, server: grpc.aio.Server) -> None:
        inference_worker_pb2_grpc.add_InferenceWorkerServicer_to_server(self.servicer, server)

    async def on_start(self) -> None:
        assert self.bus is not None
        kv = await self.bus.kv(MODELS_BUCKET)
        from shared.events import encode

        for model in self.models.values():
            await kv.put(model.spec.name, encode(model.spec))
        self.spawn(gpu.sample_loop())

    async def on_stop(self) -> None:
        for model in self.models.values():
            model.backend.close()

    def targets(self) -> tuple[str, ...]:
        return tuple(sorted(self.models))

    def load(self) -> int:
        return self.servicer.outstanding
