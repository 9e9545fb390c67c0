"""Router wiring: model specs and batchers from NATS, the public gRPC services."""

from __future__ import annotations

import grpc
from tritonclient.grpc import service_pb2_grpc as kserve_pb2_grpc

from services.router.config import RouterConfig
from services.router.handlers import RouterServicer
from services.router.kserve import SERVICE_NAME as KSERVE_SERVICE
from services.router.kserve import KServeServicer
from services.router.upstream import Batchers
from shared.events import MODELS_BUCKET, ModelSpec, model_spec_decoder
from shared.kvview import KVView
from shared.lifecycle import Service
from shared.pb.infermesh.v1 import router_pb2, router_pb2_grpc


class Router(Service):
    """The mesh's entry point."""

    name = "router"
    grpc_services = (router_pb2.DESCRIPTOR.services_by_name["Router"].full_name, KSERVE_SERVICE)

    def __init__(self, config: RouterConfig) -> None:
        super().__init__(config)
        self.cfg = config
        self.servicer: RouterServicer | None = None
        self.batchers: Batchers | None = None
        self.models: KVView[ModelSpec] | None = None

    def watches_members(self) -> bool:
        return True

    def register(self, server: grpc.aio.Server) -> None:
        # Servicers need the bus, which exists by now (start() connects before registering).
        assert self.bus is not None and self.members is not None
        self.models = KVView(self.bus, MODELS_BUCKET, model_spec_decoder)
        self.batchers = Batchers(self.members, self.cfg.max_message_bytes)
        self.servicer = RouterServicer(
            self.models,
            self.batchers,
            self.cfg.default_timeout_ms / 1000.0,
            self.cfg.max_tensor_elements,
        )
        router_pb2_grpc.add_RouterServicer_to_server(self.servicer, server)
        kserve = KServeServicer(
            self.servicer, lambda: self._serving, self._model_ready, self.cfg.max_tensor_elements
        )
        kserve_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(kserve, server)

    def _model_ready(self, model: str) -> bool:
        """KServe ModelReady: some healthy inference worker serves the model."""
        assert self.members is not None
        return any(
            m.health == "SERVING" and model in m.targets
            for m in self.members.members("inference-worker")
        )

    async def on_start(self) -> None:
        assert self.models is not None
        self.spawn(self.models.run())

    async def on_stop(self) -> None:
        if self.batchers is not None:
            await self.batchers.close()

    def load(self) -> int:
        return sum(self.batchers.outstanding.values()) if self.batchers else 0
