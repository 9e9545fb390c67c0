"""Tiering wiring: the placement KV view and the gRPC service."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

import grpc

from services.tiering.config import TieringConfig
from services.tiering.controller import TieringController
from services.tiering.handlers import TieringServicer
from shared.events import PLACEMENT_BUCKET, BlockPlaced, block_placed_decoder
from shared.kvview import KVView
from shared.lifecycle import Service
from shared.pb.infermesh.v1 import tiering_pb2, tiering_pb2_grpc


class Tiering(Service):
    """Turns block access statistics into placement (hot/warm/cold) per worker."""

    name = "tiering"
    grpc_services = (tiering_pb2.DESCRIPTOR.services_by_name["Tiering"].full_name,)

    def __init__(self, config: TieringConfig) -> None:
        super().__init__(config)
        self.cfg = config
        self.placement: KVView[BlockPlaced] | None = None
        self.controller: TieringController | None = None

    def register(self, server: grpc.aio.Server) -> None:
        assert self.bus is not None
        self.placement = KVView(self.bus, PLACEMENT_BUCKET, block_placed_decoder)
        tiering_pb2_grpc.add_TieringServicer_to_server(TieringServicer(self.placement), server)

    async def on_start(self) -> None:
        assert self.placement is not None and self.bus is not None
        self.controller = TieringController(self.bus, self.cfg)
        self.spawn(self.placement.run())

    def loops(self) -> list[Callable[[], Coroutine[Any, Any, None]]]:
        assert self.controller is not None
        return [self.controller.run]
