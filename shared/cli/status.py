"""A snapshot of the mesh's control-path state, read from NATS (for `infermesh status`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from shared.bus import Bus
from shared.events import (
    MEMBERS_BUCKET,
    MODELS_BUCKET,
    POLICY_BUCKET,
    TIER_STATUS_BUCKET,
    BatchPolicy,
    Member,
    ModelSpec,
    TierStatus,
    batch_policy_decoder,
    member_decoder,
    model_spec_decoder,
    tier_status_decoder,
)


@dataclass
class Snapshot:
    """What `infermesh status` prints."""

    now: float
    members: list[Member] = field(default_factory=list)
    models: list[ModelSpec] = field(default_factory=list)
    policies: list[BatchPolicy] = field(default_factory=list)
    """Each target's batch policy as the controller last wrote it."""
    tiers: list[TierStatus] = field(default_factory=list)
    """Per retrieval worker: bytes per tier, hit shares, recent moves."""


async def _values(bus: Bus, bucket: str, decoder: object) -> list[object]:
    items = await bus.kv_items(bucket, create=False)
    return [decoder.decode(value) for value in items.values()]  # type: ignore[attr-defined]


async def read(bus: Bus) -> Snapshot:
    """Read members, model specs, batch policies and tier status once over an open bus."""
    snap = Snapshot(now=time.time())
    members = await _values(bus, MEMBERS_BUCKET, member_decoder)
    snap.members = sorted(
        (m for m in members if isinstance(m, Member)), key=lambda m: (m.service, m.instance)
    )
    models = await _values(bus, MODELS_BUCKET, model_spec_decoder)
    snap.models = sorted((m for m in models if isinstance(m, ModelSpec)), key=lambda m: m.name)
    policies = await _values(bus, POLICY_BUCKET, batch_policy_decoder)
    snap.policies = sorted(
        (p for p in policies if isinstance(p, BatchPolicy)), key=lambda p: p.target
    )
    tiers = await _values(bus, TIER_STATUS_BUCKET, tier_status_decoder)
    snap.tiers = sorted((t for t in tiers if isinstance(t, TierStatus)), key=lambda t: t.worker)
    return snap


async def collect(nats_url: str) -> Snapshot:
    """Connect, read the snapshot once, disconnect."""
    bus = await Bus.connect(nats_url, name="infermesh-status", attempts=2)
    try:
        return await read(bus)
    finally:
        await bus.close()
