"""Retrieval worker wiring."""

from __future__ import annotations

import grpc

from services.retrieval_worker.config import RetrievalConfig
from services.retrieval_worker.handlers import RetrievalWorkerServicer
from shared.lifecycle import Service
from shared.pb.infermesh.v1 import retrieval_worker_pb2, retrieval_worker_pb2_grpc


class RetrievalWorker(Service):
    """Holds collections and searches the blocks it owns."""

    name = "retrieval-worker"
    grpc_services = (
        retrieval_worker_pb2.DESCRIPTOR.services_by_name["RetrievalWorker"].full_name,
    )

    def __init__(self, config: RetrievalConfig) -> None:
        super().__init__(config)
        self.servicer = RetrievalWorkerServicer()

    def register(self, server: grpc.aio.Server) -> None:
        retrieval_worker_pb2_grpc.add_RetrievalWorkerServicer_to_server(self.servicer, server)

    def targets(self) -> tuple[str, ...]:
        return tuple(sorted(self.servicer.collections))
