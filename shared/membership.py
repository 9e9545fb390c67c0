"""Membership: every service heartbeats into a JetStream KV bucket; readers keep a live view.

Writers put ``Member`` under ``<service>.<instance>`` every heartbeat; the bucket's TTL
removes entries of instances that died. Readers watch the bucket and drop a member whose
heartbeat is older than the TTL, but only while NATS is connected (and not in the first TTL
after a reconnect): with NATS down nobody can heartbeat, and the data path keeps the last
known view (gRPC failures remove workers).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from nats.js.kv import KeyValue

from shared.bus import Bus
from shared.events import MEMBERS_BUCKET, Member, encode, member_decoder
from shared.kvview import KVView

log = logging.getLogger(__name__)


def member_key(service: str, instance: str) -> str:
    """KV key of one instance (KV keys allow [-/_=.a-zA-Z0-9])."""
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in instance)
    return f"{service}.{safe}"


class Heartbeat:
    """Publishes this instance's Member record periodically until stopped."""

    def __init__(
        self,
        bus: Bus,
        make_member: Callable[[], Member],
        period_s: float,
        ttl_s: float,
    ) -> None:
        self._bus = bus
        self._make = make_member
        self._period = period_s
        self._ttl = ttl_s
        self._kv: KeyValue | None = None
        self._key = ""
        self._stopped = False

    async def beat(self) -> None:
        """Write the record once (also called right away on start and on health changes)."""
        if self._kv is None:
            self._kv = await self._bus.kv(MEMBERS_BUCKET, ttl=self._ttl)
        member = self._make()
        self._key = member_key(member.service, member.instance)
        # Bounded: a put caught by a NATS outage would otherwise wait out the client's 5 s
        # request timeout, and the first beat after a reconnect would come that much late.
        await asyncio.wait_for(self._kv.put(self._key, encode(member)), timeout=self._ttl / 2)

    async def run(self) -> None:
        """Heartbeat loop; NATS outages are ridden out (the record expires and comes back)."""
        while not self._stopped:
            try:
                await self.beat()
            except Exception as exc:
                log.debug("heartbeat failed (%s); retrying", type(exc).__name__)
            await asyncio.sleep(self._period)

    def stop(self) -> None:
        """End the loop after its current beat (shutdown, before leave())."""
        self._stopped = True

    async def leave(self) -> None:
        """Remove this instance's record at shutdown so readers stop routing to it at once."""
        if self._kv is not None and self._key and self._bus.connected:
            try:
                await asyncio.wait_for(self._kv.delete(self._key), timeout=1.0)
            except Exception as exc:
                log.debug("leave failed: %s", exc)


class MemberView(KVView[Member]):
    """A live view of the members, fed by a KV watcher."""

    def __init__(self, bus: Bus, ttl_s: float) -> None:
        super().__init__(bus, MEMBERS_BUCKET, member_decoder, ttl_s=ttl_s)
        self._member_ttl = ttl_s

    def members(self, service: str | None = None) -> list[Member]:
        """Live members, optionally of one service."""
        now = time.time()
        # Ages count only while NATS is up, and from one TTL after a reconnect on: a member
        # that could not heartbeat through an outage has that long to do so before it is
        # taken for dead (dead ones vanish sooner, when the re-watch finds their key gone).
        check_age = self._bus.connected and now - self._bus.reconnected_unix > self._member_ttl
        return [
            m
            for m in self.values.values()
            if (service is None or m.service == service)
            and not (check_age and now - m.heartbeat_unix > self._member_ttl)
        ]

    def _vanished(self, key: str) -> None:
        # Records expire on the server during an outage longer than the TTL, though their
        # members live on; keep them until the age check resumes, by which time live ones
        # have heartbeated again and dead ones are filtered out by age.
        if time.time() - self._bus.reconnected_unix > self._member_ttl:
            super()._vanished(key)

    def forget(self, endpoint: str) -> None:
        """Drop a member that failed on the data path until it heartbeats again."""
        for key, m in list(self.values.items()):
            if m.endpoint == endpoint:
                del self.values[key]
