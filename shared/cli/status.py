"""A snapshot of the mesh's control-path state, read from NATS (for `infermesh status`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from nats.js.errors import BucketNotFoundError, NoKeysError

from shared.bus import Bus
from shared.events import (
    MEMBERS_BUCKET,
    MODELS_BUCKET,
    Member,
    ModelSpec,
    member_decoder,
    model_spec_decoder,
)


@dataclass
class Snapshot:
    """What `infermesh status` prints."""

    now: float
    members: list[Member] = field(default_factory=list)
    models: list[ModelSpec] = field(default_factory=list)


async def _values(bus: Bus, bucket: str, decoder: object) -> list[object]:
    try:
        kv = await bus.js.key_value(bucket)
        keys = await kv.keys()
    except (BucketNotFoundError, NoKeysError):
        return []
    out = []
    for key in keys:
        try:
            entry = await kv.get(key)
        except Exception:  # noqa: BLE001, S112 - a key deleted between keys() and get()
            continue
        if entry.value:
            out.append(decoder.decode(entry.value))  # type: ignore[attr-defined]
    return out


async def collect(nats_url: str) -> Snapshot:
    """Read members and model specs once."""
    bus = await Bus.connect(nats_url, name="infermesh-status", attempts=2)
    try:
        snap = Snapshot(now=time.time())
        members = await _values(bus, MEMBERS_BUCKET, member_decoder)
        snap.members = sorted(
            (m for m in members if isinstance(m, Member)), key=lambda m: (m.service, m.instance)
        )
        models = await _values(bus, MODELS_BUCKET, model_spec_decoder)
        snap.models = sorted((m for m in models if isinstance(m, ModelSpec)), key=lambda m: m.name)
        return snap
    finally:
        await bus.close()
