"""The router's side of the batcher hop: pick a live batcher, call it, map its errors."""

from __future__ import annotations

import logging
import random

import grpc

from shared import rpc
from shared.errors import DeadlineExceeded, RPCError, Unavailable
from shared.membership import MemberView
from shared.pb.infermesh.v1 import batcher_pb2, batcher_pb2_grpc

log = logging.getLogger(__name__)


class Batchers:
    """Channels to the batcher replicas in membership; least outstanding first."""

    def __init__(self, members: MemberView, channels: rpc.Channels) -> None:
        self._members = members
        self._channels = channels
        self.outstanding: dict[str, int] = {}

    def _pick(self, exclude: set[str]) -> str | None:
        live = [
            m.endpoint
            for m in self._members.members("batcher")
            if m.health == "SERVING" and m.endpoint not in exclude
        ]
        if not live:
            return None
        low = min(self.outstanding.get(e, 0) for e in live)
        return random.choice([e for e in live if self.outstanding.get(e, 0) == low])

    def _stub(self, endpoint: str) -> batcher_pb2_grpc.BatcherStub:
        return self._channels.stub(endpoint, batcher_pb2_grpc.BatcherStub)

    async def submit(
        self, request: batcher_pb2.SubmitRequest, timeout: float
    ) -> batcher_pb2.SubmitResponse:
        """Submit to a batcher; on an unreachable batcher try one other replica."""
        tried: set[str] = set()
        for _ in range(2):
            endpoint = self._pick(tried)
            if endpoint is None:
                break
            tried.add(endpoint)
            self.outstanding[endpoint] = self.outstanding.get(endpoint, 0) + 1
            try:
                return await self._stub(endpoint).Submit(request, timeout=timeout)  # type: ignore[no-any-return]
            except grpc.aio.AioRpcError as err:
                code = err.code()
                if rpc.peer_unreachable(err):
                    log.warning("batcher %s unreachable; trying another", endpoint)
                    self._members.forget(endpoint)
                    continue
                if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise DeadlineExceeded(
                        err.details() or f"deadline of {timeout * 1e3:.0f} ms passed"
                    ) from None
                raise RPCError.from_aio(err, "batcher") from None
            finally:
                self.outstanding[endpoint] -= 1
        raise Unavailable("no healthy batcher is reachable" + (
            f" (tried {', '.join(sorted(tried))})" if tried else ""))

