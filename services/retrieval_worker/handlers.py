"""The RetrievalWorker gRPC servicer."""

from __future__ import annotations

import grpc

from shared.errors import NotFound
from shared.pb.infermesh.v1 import retrieval_worker_pb2, retrieval_worker_pb2_grpc


class RetrievalWorkerServicer(retrieval_worker_pb2_grpc.RetrievalWorkerServicer):
    """Search and collection admin over the collections this worker holds."""

    def __init__(self) -> None:
        self.collections: dict[str, object] = {}

    def _missing(self, name: str) -> NotFound:
        known = ", ".join(sorted(self.collections)) or "none"
        return NotFound(f"unknown collection {name!r} (held here: {known})")

    async def Search(
        self, request: retrieval_worker_pb2.SearchRequest, context: grpc.aio.ServicerContext
    ) -> retrieval_worker_pb2.SearchResponse:
        raise self._missing(request.collection)

    async def DescribeCollection(
        self,
        request: retrieval_worker_pb2.DescribeCollectionRequest,
        context: grpc.aio.ServicerContext,
    ) -> retrieval_worker_pb2.CollectionInfo:
        raise self._missing(request.name)
