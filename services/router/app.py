"""Router wiring: model specs and batchers from NATS, the public gRPC services."""

from __future__ import annotations

import grpc
from tritonclient.grpc import service_pb2_grpc as kserve_pb2_grpc

from services.router.collections import CollectionsServicer
from services.router.config import RouterConfig
from services.router.handlers import RouterServicer
from services.router.kserve import SERVICE_NAME as KSERVE_SERVICE
from services.router.kserve import KServeServicer
from services.router.pipelines import Pipelines
from services.router.upstream import Batchers
from shared.events import MODELS_BUCKET, ModelSpec, model_spec_decoder
from shared.ingestlog import COLLECTIONS_BUCKET, CollectionDeclared, declared_decoder, ensure_stream
from shared.kvview import KVView
from shared.lifecycle import Service
from shared.pb.infermesh.v1 import (
    collections_pb2,
    collections_pb2_grpc,
    router_pb2,
    router_pb2_grpc,
)


class Router(Service):
    """The mesh's entry point."""

    name = "router"
    grpc_services = (
        router_pb2.DESCRIPTOR.services_by_name["Router"].full_name,
        KSERVE_SERVICE,
        collections_pb2.DESCRIPTOR.services_by_name["Collections"].full_name,
    )

    def __init__(self, config: RouterConfig) -> None:
        super().__init__(config)
        self.cfg = config
        self.servicer: RouterServicer | None = None
        self.batchers: Batchers | None = None
        self.models: KVView[ModelSpec] | None = None
        self.collections: KVView[CollectionDeclared] | None = None
        self.admin: CollectionsServicer | None = None

    def watches_members(self) -> bool:
        return True

    def register(self, server: grpc.aio.Server) -> None:
        # Servicers need the bus, which exists by now (start() connects before registering).
        assert self.bus is not None and self.members is not None
        self.models = KVView(self.bus, MODELS_BUCKET, model_spec_decoder)
        self.batchers = Batchers(self.members, self.channels)
        self.collections = KVView(self.bus, COLLECTIONS_BUCKET, declared_decoder)
        pipelines = Pipelines(
            self.cfg.pipelines,
            self.models,
            self.collections,
            self.batchers,
            self.cfg.max_k,
            self.cfg.max_tensor_elements,
            self.cfg.search_coalesce_inflight,
        )
        self.servicer = RouterServicer(
            self.models,
            self.batchers,
            self.cfg.default_timeout_ms / 1000.0,
            self.cfg.max_tensor_elements,
            pipelines,
        )
        router_pb2_grpc.add_RouterServicer_to_server(self.servicer, server)
        self.admin = CollectionsServicer(
            self.bus,
            self.members,
            pipelines,
            self.cfg.embed_model,
            self.cfg.embed_chunk,
            self.channels,
            self.cfg.default_timeout_ms / 1000.0,
            self.cfg.max_nats_payload,
        )
        collections_pb2_grpc.add_CollectionsServicer_to_server(self.admin, server)
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
        assert self.models is not None and self.collections is not None and self.bus is not None
        self.spawn(self.models.run())
        self.spawn(self.collections.run())
        await ensure_stream(self.bus.js)

    def load(self) -> int:
        return sum(self.batchers.outstanding.values()) if self.batchers else 0
