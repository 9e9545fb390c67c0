"""The Tiering gRPC servicer: placement as currently decided (read from the placement KV)."""

from __future__ import annotations

import grpc

from shared.events import BlockPlaced
from shared.kvview import KVView
from shared.pb.infermesh.v1 import tiering_pb2, tiering_pb2_grpc


class TieringServicer(tiering_pb2_grpc.TieringServicer):
    """GetPlacement."""

    def __init__(self, placement: KVView[BlockPlaced]) -> None:
        self._placement = placement

    async def GetPlacement(
        self, request: tiering_pb2.GetPlacementRequest, context: grpc.aio.ServicerContext
    ) -> tiering_pb2.Placement:
        blocks = [
            tiering_pb2.BlockPlacement(
                collection=p.collection,
                block=p.block,
                worker=p.worker,
                tier=p.tier,
                frequency=p.frequency,
            )
            for p in self._placement.values.values()
            if not request.collection or p.collection == request.collection
        ]
        revision = max((p.revision for p in self._placement.values.values()), default=0)
        return tiering_pb2.Placement(revision=revision, blocks=blocks)
