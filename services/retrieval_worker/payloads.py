"""Payloads (document text, metadata) of a collection, in SQLite beside its blocks.

One table ``payloads(id INTEGER PRIMARY KEY, doc BLOB)`` where ``doc`` is the payload dict as
JSON, plus ``meta(key, value)`` holding the ``seq`` of the last flush that wrote here. WAL mode:
readers (hit fetches) never block the flush that writes.

The collection commits payloads *before* the block files and the manifest of a flush. A crash
in between leaves payloads ahead of ``last_applied_seq``; the replay from
``last_applied_seq + 1`` re-applies the same last-writer-wins upserts and deletes, which leaves
the payloads as they were (replaying a suffix of set/delete operations onto a state that
already includes them is a no-op), so payloads and vectors agree again.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import msgspec

from services.retrieval_worker.errors import InvalidArgument

PAYLOADS_NAME = "payloads.sqlite"

_enc = msgspec.json.Encoder()
_dec = msgspec.json.Decoder(dict[str, Any])

_SCHEMA = """
CREATE TABLE IF NOT EXISTS payloads (id INTEGER PRIMARY KEY, doc BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


def encode_payload(payload: dict[str, Any]) -> bytes:
    """Payload dict as stored (JSON); raises InvalidArgument if it is not JSON-serialisable."""
    if not isinstance(payload, dict):
        raise InvalidArgument(f"payload must be a dict or None, got {type(payload).__name__}")
    try:
        return _enc.encode(payload)
    except (TypeError, msgspec.EncodeError) as e:
        raise InvalidArgument(f"payload is not JSON-serialisable: {e}") from e


class PayloadStore:
    """Payloads by id: batched upsert/delete in one transaction, batched fetch for hits."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # one connection per thread: sqlite3 connections must not be shared across threads
        self._local = threading.local()
        self._write_lock = threading.Lock()
        self._conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        conn = self._conn()
        conn.executescript(_SCHEMA)

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            # FULL: a committed flush survives power loss, as the manifest after it assumes
            conn.execute("PRAGMA synchronous=FULL")
            self._local.conn = conn
            with self._conns_lock:
                self._conns.append(conn)
        return conn

    def apply(
        self,
        upserts: Iterable[tuple[int, bytes | None]],
        deletes: Iterable[int],
        seq: int,
    ) -> None:
        """In one transaction: set or clear the payload of each upserted id, drop deleted ids.

        An upsert with ``None`` clears the id's payload (the record is replaced as a whole).
        """
        with self._write_lock:
            conn = self._conn()
            conn.execute("BEGIN IMMEDIATE")
            try:
                rows = list(upserts)
                conn.executemany(
                    "INSERT INTO payloads(id, doc) VALUES (?, ?) "
                    "ON CONFLICT(id) DO UPDATE SET doc = excluded.doc",
                    [(i, d) for i, d in rows if d is not None],
                )
                gone = [(i,) for i, d in rows if d is None] + [(i,) for i in deletes]
                conn.executemany("DELETE FROM payloads WHERE id = ?", gone)
                conn.execute(
                    "INSERT INTO meta(key, value) VALUES ('seq', ?) "
                    "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    (seq,),
                )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    def get(self, ids: Sequence[int]) -> list[dict[str, Any] | None]:
        """Payloads of ``ids`` in order; None where an id has no payload."""
        if len(ids) == 0:
            return []
        want = [int(i) for i in ids]
        conn = self._conn()
        found: dict[int, dict[str, Any]] = {}
        # one statement per batch: the id list travels as one JSON parameter
        for lo in range(0, len(want), 10_000):
            batch = want[lo : lo + 10_000]
            cur = conn.execute(
                "SELECT id, doc FROM payloads WHERE id IN (SELECT value FROM json_each(?))",
                (_enc.encode(batch),),
            )
            for i, doc in cur:
                found[i] = _dec.decode(doc)
        return [found.get(i) for i in want]

    def seq(self) -> int:
        """Sequence of the last flush that wrote payloads (0 if none)."""
        row = self._conn().execute("SELECT value FROM meta WHERE key = 'seq'").fetchone()
        return int(row[0]) if row else 0

    def count(self) -> int:
        """Number of ids with a payload."""
        return int(self._conn().execute("SELECT count(*) FROM payloads").fetchone()[0])

    def close(self) -> None:
        """Close every connection this store opened."""
        with self._conns_lock:
            for c in self._conns:
                c.close()
            self._conns.clear()
        self._local = threading.local()
