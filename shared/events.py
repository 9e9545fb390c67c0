"""Control-path events: one tagged msgspec Struct per message, msgpack on the wire.

Subjects are ``infermesh.<domain>.<event>[.<target>]``. Rules: new fields get defaults;
fields are never retyped or reordered. One Decoder per subject, created once here.
"""

from __future__ import annotations

import msgspec

# Subjects and buckets (DESIGN.md's control-path table).
MEMBERS_BUCKET = "infermesh_members"
POLICY_BUCKET = "infermesh_batch_policy"
LEASES_BUCKET = "infermesh_leases"
PLACEMENT_BUCKET = "infermesh_placement"
BATCH_OBSERVED = "infermesh.batch.observed"  # .<target>
TIERING_ACCESS = "infermesh.tiering.access"  # .<worker>
TIERING_MOVE = "infermesh.tiering.move"  # .<worker>
TIERING_MOVED = "infermesh.tiering.moved"  # .<worker>
INGEST_STREAM = "INFERMESH_INGEST"
INGEST_SUBJECT = "infermesh.ingest"  # .<collection>


class Event(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Base of every control-path message."""


class Member(Event, frozen=True, kw_only=True, tag="member"):
    """One service instance's heartbeat in the membership bucket."""

    service: str
    instance: str
    endpoint: str
    health: str = "SERVING"
    load: int = 0
    """Outstanding requests (workers: items in flight; batcher: queued)."""
    targets: tuple[str, ...] = ()
    """Models or collections this instance serves."""
    metrics_port: int = 0
    started_unix: float = 0.0
    heartbeat_unix: float = 0.0
    blocks: dict[str, tuple[int, ...]] = msgspec.field(default_factory=dict)
    """Retrieval workers: collection -> blocks this instance can search (the batcher's cover)."""


class BatchObserved(Event, frozen=True, kw_only=True, tag="batch_observed"):
    """One executed batch, as the worker saw it (input of the batch controller)."""

    target: str
    size: int
    queue_ms: float
    exec_ms: float
    worker: str
    at_unix: float = 0.0


class BatchesObserved(Event, frozen=True, kw_only=True, tag="batches_observed"):
    """Several executed batches of one target from one worker, in one message.

    Workers send at most one message per target every ~50 ms: a message per batch cost the
    worker and the batcher 6-10 % of their data-path CPU (py-spy, echo model at c=1).
    """

    target: str
    worker: str
    batches: tuple[BatchObserved, ...]


class BatchPolicy(Event, frozen=True, kw_only=True, tag="batch_policy"):
    """How a target's queue forms batches; the controller writes it, every batcher applies it."""

    target: str
    max_batch_size: int
    max_delay_ms: float
    preferred_sizes: tuple[int, ...] = ()
    slo_ms: float = 0.0
    reason: str = ""
    """Why it last changed: "<code>: <detail>" (code = initial|increase|decrease|fit|...)."""
    revision: int = 0
    """Counts changes of max_batch_size/max_delay_ms; refreshes of p99_ms keep it."""
    updated_unix: float = 0.0
    p99_ms: float = 0.0
    """p99 latency at the batcher (queue wait + exec) the controller last saw."""
    leader: str = ""
    """The controller instance that wrote it."""
    gather: bool = False
    """Wait up to max_delay_ms for a batch to fill even when none is in flight. Set while
    every slot is busy: the callers of the batch that just ended are on their way back, and
    a batch that leaves with the first of them strands the rest for a whole batch."""


class Lease(Event, frozen=True, kw_only=True, tag="lease"):
    """Who holds a leadership lease (KV ``infermesh_leases``) and until when."""

    holder: str
    expires_unix: float
    acquired_unix: float = 0.0


member_decoder = msgspec.msgpack.Decoder(Member)
batch_observed_decoder = msgspec.msgpack.Decoder(BatchObserved | BatchesObserved)
batch_policy_decoder = msgspec.msgpack.Decoder(BatchPolicy)
lease_decoder = msgspec.msgpack.Decoder(Lease)
encoder = msgspec.msgpack.Encoder()


def encode(event: Event) -> bytes:
    """Serialize an event for the wire."""
    return encoder.encode(event)


MODELS_BUCKET = "infermesh_models"


class TensorSpec(msgspec.Struct, frozen=True, kw_only=True):
    """A model input/output: name, KServe v2 dtype, shape without the batch dim (-1 = any)."""

    name: str
    dtype: str
    shape: tuple[int, ...] = (-1,)


class ModelSpec(Event, frozen=True, kw_only=True, tag="model_spec"):
    """What a served model accepts and returns; workers publish it, router and batcher read it."""

    name: str
    backend: str
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    max_batch_size: int = 32
    max_delay_ms: float = 2.0
    preferred_batch_sizes: tuple[int, ...] = ()
    slo_ms: float = 100.0
    accepts_text: bool = False
    version: str = "1"
    max_queue: int = 1024
    instances: int = 1
    """Batches a worker runs at once (Triton's instance_group count); the batcher keeps at
    least this many in flight per worker."""


model_spec_decoder = msgspec.msgpack.Decoder(ModelSpec)


class BlockPlaced(Event, frozen=True, kw_only=True, tag="block_placed"):
    """Where one block of a collection lives: the tiering service's decision (placement KV)."""

    collection: str
    block: int
    worker: str
    tier: str
    """"hot" | "warm" | "cold"."""
    frequency: float = 0.0
    revision: int = 0


block_placed_decoder = msgspec.msgpack.Decoder(BlockPlaced)


def worker_key(worker: str) -> str:
    """A worker id as one KV key / subject token (keys allow [-/_=.a-zA-Z0-9]; no dots)."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in worker)


def placement_key(worker: str, collection: str, block: int) -> str:
    """KV key of one block's placement: ``<worker>.<collection>.<block>``."""
    return f"{worker_key(worker)}.{collection}.{block}"


class BlockAccess(Event, frozen=True, kw_only=True, tag="block_access"):
    """A retrieval worker's block reads since its last report, with what tiering must know.

    Published every few seconds on ``infermesh.tiering.access.<worker>``; small: one entry
    per block read in the period (plus sizes and tiers of every block it holds).
    """

    worker: str
    collection: str
    reads: dict[int, int] = msgspec.field(default_factory=dict)
    """block -> reads since the last report."""
    block_bytes: dict[int, int] = msgspec.field(default_factory=dict)
    """block -> bytes it takes in its current tier (every block the worker holds)."""
    tiers: dict[int, str] = msgspec.field(default_factory=dict)
    """block -> tier it is in now."""
    hot_budget: int = 0
    """Bytes of GPU memory the worker gives to hot blocks (0 = no GPU tier)."""
    warm_budget: int = 0
    """Bytes of RAM the worker gives to warm blocks."""
    period_s: float = 0.0
    at_unix: float = 0.0
    bytes_in: dict[str, dict[int, int]] = msgspec.field(default_factory=dict)
    """tier -> block -> bytes the block takes (or would take) in that tier, for the fast
    tiers; differs from ``block_bytes`` where a tier holds blocks compressed (float16, SQ8)."""


class TierMove(Event, frozen=True, kw_only=True, tag="tier_move"):
    """Tiering asks a worker to move a block (``infermesh.tiering.move.<worker>``)."""

    collection: str
    block: int
    tier: str
    revision: int = 0


class TierMoved(Event, frozen=True, kw_only=True, tag="tier_moved"):
    """A worker confirms a move (``infermesh.tiering.moved.<worker>``), or says why not."""

    worker: str
    collection: str
    block: int
    tier: str
    revision: int = 0
    ok: bool = True
    error: str = ""
    seconds: float = 0.0


block_access_decoder = msgspec.msgpack.Decoder(BlockAccess)
tier_move_decoder = msgspec.msgpack.Decoder(TierMove)
tier_moved_decoder = msgspec.msgpack.Decoder(TierMoved)


TIER_STATUS_BUCKET = "infermesh_tier_status"


class TierStatus(Event, frozen=True, kw_only=True, tag="tier_status"):
    """Per-worker tier summary the tiering service keeps for ``infermesh status``."""

    worker: str
    tier_bytes: dict[str, int] = msgspec.field(default_factory=dict)
    """tier -> bytes of blocks in it."""
    hit_share: dict[str, float] = msgspec.field(default_factory=dict)
    """tier -> share of recent block reads served from it."""
    recent_moves: tuple[str, ...] = ()
    """Last moves, newest first ("collection/block cold->warm 0.12s")."""
    gpu: bool = False
    updated_unix: float = 0.0


tier_status_decoder = msgspec.msgpack.Decoder(TierStatus)
