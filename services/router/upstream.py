"""The router's side of the batcher hop: pick a live batcher, submit on its stream, map errors.

Submits travel on one long-lived Batcher.SubmitStream per batcher (shared/streams.py): a
message on an open stream costs about half a unary call, and every request pays this hop.
"""

from __future__ import annotations

import logging
import random
import time

from shared import rpc
from shared.errors import Unavailable
from shared.membership import MemberView
from shared.pb.infermesh.v1 import batcher_pb2, batcher_pb2_grpc
from shared.status_codes import error_from
from shared.streams import PeerGone, Streams

log = logging.getLogger(__name__)


class Batchers:
    """Channels to the batcher replicas in membership; least outstanding first."""

    def __init__(self, members: MemberView, channels: rpc.Channels) -> None:
        self._members = members
        self._streams: Streams[batcher_pb2.SubmitRequest, batcher_pb2.SubmitResponse] = Streams(
            channels,
            batcher_pb2_grpc.BatcherStub,
            "SubmitStream",
            batcher_pb2.SubmitCalls,
            "infermesh.v1.Batcher/Submit",
            "batcher",
        )
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

    async def submit(
        self, request: batcher_pb2.SubmitRequest, timeout: float
    ) -> batcher_pb2.SubmitResponse:
        """Submit to a batcher; on an unreachable batcher try one other replica."""
        tried: set[str] = set()
        deadline = time.monotonic() + timeout
        for _ in range(2):
            endpoint = self._pick(tried)
            if endpoint is None:
                break
            tried.add(endpoint)
            self.outstanding[endpoint] = self.outstanding.get(endpoint, 0) + 1
            try:
                reply = await self._streams.get(endpoint).call(request, deadline - time.monotonic())
            except PeerGone as gone:
                # The batcher never ran it (unreachable, or draining): one other replica.
                log.warning("batcher %s: %s; trying another", endpoint, gone)
                self._members.forget(endpoint)
                continue
            finally:
                self.outstanding[endpoint] -= 1
            if reply.result.error_code:
                raise error_from(reply.result.error_code, reply.result.error_message, "batcher")
            return reply
        raise Unavailable(
            "no healthy batcher is reachable"
            + (f" (tried {', '.join(sorted(tried))})" if tried else "")
        )
