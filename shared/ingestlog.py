"""The durable ingest log: collection declarations (KV) and the messages of the ingest stream.

Ingest is appended to the JetStream stream ``INFERMESH_INGEST`` (subjects
``infermesh.ingest.<collection>``, file storage) before the caller gets an answer; every
retrieval worker that holds the collection applies it from there and records the last
applied stream sequence in the collection's manifest. Collections themselves are declared in
the KV bucket ``infermesh_collections`` (one ``CollectionDeclared`` per name), which every
retrieval worker follows, and which the router and batcher read for dim and metric.

Messages are tagged msgspec Structs in msgpack, vectors as raw little-endian bytes with dtype
and shape. One upsert is chunked into several messages so each stays under the server's
``max_payload`` (8 MiB in the local nats.conf).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

import msgspec
import numpy as np
from nats.js import JetStreamContext
from nats.js.api import RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError

from shared.errors import InvalidArgument
from shared.events import INGEST_STREAM, INGEST_SUBJECT, Event, encode

COLLECTIONS_BUCKET = "infermesh_collections"

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

#: Room left in each message for the msgpack framing and NATS/JetStream headers.
_ENVELOPE_BYTES = 4096


class CollectionDeclared(Event, frozen=True, kw_only=True, tag="collection_declared"):
    """A collection exists in the mesh: its spec, and where in the stream its history starts."""

    name: str
    dim: int
    metric: str = "ip"
    nlist: int = 1024
    dtype: str = "float32"
    lists_per_block: int = 8
    start_seq: int = 0
    """Stream sequence at creation: messages up to it belong to an earlier, dropped namesake."""
    created_unix: float = 0.0


class IngestUpsert(Event, frozen=True, kw_only=True, tag="ingest_upsert"):
    """Insert or replace rows: ids INT64 [n], vectors (dtype, shape [n, dim]), payloads."""

    collection: str
    ids: bytes
    vectors: bytes
    dtype: str = "FP32"
    shape: tuple[int, int] = (0, 0)
    payloads: tuple[bytes, ...] = ()
    """One JSON object per row (``{"text": ..., "metadata": ...}``); b"" = no payload."""


class IngestDelete(Event, frozen=True, kw_only=True, tag="ingest_delete"):
    """Delete rows by id (ids INT64 [n]); unknown ids are ignored."""

    collection: str
    ids: bytes


IngestMessage = IngestUpsert | IngestDelete

declared_decoder = msgspec.msgpack.Decoder(CollectionDeclared)
ingest_decoder = msgspec.msgpack.Decoder(IngestMessage)


def check_collection_name(name: str) -> str:
    """A collection name (a NATS subject token too): 1-64 of letters, digits, ``_.-``."""
    if not name:
        raise InvalidArgument("collection name is empty")
    if not _NAME_RE.match(name) or "." in name:
        raise InvalidArgument(
            f"bad collection name {name[:80]!r}: use 1-64 letters, digits, '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def subject_of(collection: str) -> str:
    """The stream subject that carries one collection's ingest."""
    return f"{INGEST_SUBJECT}.{collection}"


async def ensure_stream(js: JetStreamContext) -> None:
    """Create the ingest stream if missing (file storage, limits retention); idempotent."""
    config = StreamConfig(
        name=INGEST_STREAM,
        subjects=[f"{INGEST_SUBJECT}.>"],
        storage=StorageType.FILE,
        retention=RetentionPolicy.LIMITS,
    )
    try:
        await js.add_stream(config)
    except BadRequestError:
        # Exists with other limits (an operator tuned it): use it as it is.
        await js.stream_info(INGEST_STREAM)


def upsert_rows(msg: IngestUpsert) -> tuple[np.ndarray, np.ndarray, list[dict[str, object] | None]]:
    """Decode an upsert message into ids, vectors and payload dicts (validated)."""
    if msg.dtype != "FP32":
        raise InvalidArgument(f"ingest vectors must be FP32, got {msg.dtype}")
    n, dim = msg.shape
    ids = np.frombuffer(msg.ids, dtype="<i8")
    if ids.size != n or len(msg.vectors) != n * dim * 4:
        raise InvalidArgument(f"ingest message shape {msg.shape} disagrees with its bytes")
    vectors = np.frombuffer(msg.vectors, dtype="<f4").reshape(n, dim)
    payloads: list[dict[str, object] | None] = [None] * n
    if msg.payloads:
        if len(msg.payloads) != n:
            raise InvalidArgument(f"{n} rows but {len(msg.payloads)} payloads")
        payloads = [json.loads(p) if p else None for p in msg.payloads]
    return ids, vectors, payloads


def chunk_upsert(
    collection: str,
    ids: np.ndarray,
    vectors: np.ndarray,
    payloads: Sequence[bytes] | None,
    max_bytes: int,
) -> list[bytes]:
    """Encode an upsert as messages of at most ``max_bytes`` each (rows are never split)."""
    n, dim = vectors.shape
    ids = np.ascontiguousarray(ids, dtype="<i8")
    vectors = np.ascontiguousarray(vectors, dtype="<f4")
    budget = max_bytes - _ENVELOPE_BYTES
    row_bytes = 8 + 4 * dim
    out: list[bytes] = []
    lo = 0
    while lo < n:
        size = 0
        hi = lo
        while hi < n:
            extra = row_bytes + (len(payloads[hi]) + 8 if payloads else 0)
            if hi > lo and size + extra > budget:
                break
            size += extra
            hi += 1
        if size > budget:
            raise InvalidArgument(
                f"row {lo} needs {size} bytes, more than one ingest message holds ({budget})"
            )
        out.append(
            encode(
                IngestUpsert(
                    collection=collection,
                    ids=ids[lo:hi].tobytes(),
                    vectors=vectors[lo:hi].tobytes(),
                    shape=(hi - lo, dim),
                    payloads=tuple(payloads[lo:hi]) if payloads else (),
                )
            )
        )
        lo = hi
    return out


def chunk_delete(collection: str, ids: np.ndarray, max_bytes: int) -> list[bytes]:
    """Encode a delete as messages of at most ``max_bytes`` each."""
    ids = np.ascontiguousarray(ids, dtype="<i8")
    per = max(1, (max_bytes - _ENVELOPE_BYTES) // 8)
    return [
        encode(IngestDelete(collection=collection, ids=ids[lo : lo + per].tobytes()))
        for lo in range(0, max(ids.size, 1), per)
    ]


async def append(js: JetStreamContext, collection: str, messages: Sequence[bytes]) -> list[int]:
    """Append messages to the stream in order; returns each one's stream sequence.

    Each publish waits for the stream's acknowledgement, so a returned sequence is stored.
    """
    subject = subject_of(collection)
    seqs: list[int] = []
    for data in messages:
        ack = await js.publish(subject, data, stream=INGEST_STREAM, timeout=10.0)
        seqs.append(int(ack.seq))
    return seqs
