"""`infermesh ingest COLLECTION FILE`: bulk-load vectors (.npy) or texts (.jsonl) into the mesh.

Rows go to the router's Collections.Upsert in batches; each batch is acknowledged once it is
in the JetStream ingest stream (durable), and retrieval workers apply it from there. `.jsonl`
lines are ``{"text": ..., "id": optional int, "metadata": optional object}``; their texts are
embedded by the mesh itself (router -> batcher -> inference worker). The collection is created
first when missing (``--dim``, ``--nlist``, ``--metric``, ``--dtype``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from shared.errors import RPCError
from shared.grpc_env import message_options
from shared.pb.infermesh.v1 import collections_pb2, collections_pb2_grpc, retrieval_worker_pb2
from shared.tensors import from_numpy

#: Output size of the default embedding model (minilm-l6), the dim of text collections.
TEXT_DIM = 384


class IngestError(ValueError):
    """The input file or the mesh refused the ingest; the message is one line for the user."""


@dataclass
class Batch:
    """Rows of one Upsert."""

    ids: np.ndarray
    vectors: np.ndarray | None = None
    texts: list[str] | None = None
    metadata: list[str] | None = None


def default_nlist(n: int) -> int:
    """About sqrt(n) lists (a power of two, 1..4096): ~sqrt(n) vectors per list."""
    if n <= 1:
        return 1
    return int(min(4096, 2 ** round(math.log2(math.sqrt(n)))))


def read_npy(path: Path, ids_path: Path | None) -> tuple[np.ndarray, np.ndarray]:
    """Vectors [n, dim] as float32 and their ids (from ids_path, or 0..n-1)."""
    try:
        x = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise IngestError(f"cannot read {path}: {exc}") from None
    if x.ndim != 2 or x.dtype.kind != "f":
        raise IngestError(f"{path}: expected a float array [n, dim], got {x.dtype} {x.shape}")
    if ids_path is None:
        return x, np.arange(x.shape[0], dtype=np.int64)
    try:
        ids = np.load(ids_path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise IngestError(f"cannot read {ids_path}: {exc}") from None
    if ids.shape != (x.shape[0],) or ids.dtype.kind not in "iu":
        raise IngestError(
            f"{ids_path}: expected {x.shape[0]} integer ids, got {ids.dtype} {ids.shape}"
        )
    return x, ids.astype(np.int64)


def read_jsonl(path: Path) -> list[tuple[int, str, str]]:
    """(id, text, metadata json) per line; ids default to the line number (0-based)."""
    rows = []
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise IngestError(f"cannot read {path}: {exc}") from None
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise IngestError(f"{path}:{n + 1}: not JSON ({exc})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise IngestError(f"{path}:{n + 1}: expected an object with a string 'text'")
        doc_id = obj.get("id", n)
        if not isinstance(doc_id, int) or doc_id < 0:
            raise IngestError(f"{path}:{n + 1}: 'id' must be a non-negative integer")
        meta = obj.get("metadata")
        if meta is not None and not isinstance(meta, dict):
            raise IngestError(f"{path}:{n + 1}: 'metadata' must be an object")
        rows.append((doc_id, obj["text"], json.dumps(meta) if meta is not None else ""))
    if not rows:
        raise IngestError(f"{path}: no rows")
    return rows


class Ingester:
    """Creates the collection if needed and streams batches to Collections.Upsert."""

    def __init__(self, router: str) -> None:
        self._channel = grpc.insecure_channel(router, options=message_options(64 << 20))
        self.stub = collections_pb2_grpc.CollectionsStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def describe(self, name: str) -> retrieval_worker_pb2.CollectionInfo | None:
        """The collection, or None when it does not exist."""
        try:
            return self.stub.DescribeCollection(  # type: ignore[no-any-return]
                retrieval_worker_pb2.DescribeCollectionRequest(name=name), timeout=30)
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:  # type: ignore[attr-defined]
                return None
            raise _rpc(err) from None

    def ensure(self, name: str, dim: int, nlist: int, metric: str, dtype: str
               ) -> retrieval_worker_pb2.CollectionInfo:
        """Describe the collection, creating it first if missing; check its dim."""
        info = self.describe(name)
        if info is None:
            try:
                info = self.stub.CreateCollection(
                    retrieval_worker_pb2.CreateCollectionRequest(
                        name=name, dim=dim, nlist=nlist, metric=metric, storage_dtype=dtype),
                    timeout=30,
                )
            except grpc.RpcError as err:
                raise _rpc(err) from None
        if info.dim != dim:
            raise IngestError(f"collection {name!r} has dim {info.dim}; the input has dim {dim}")
        return info

    def upsert(self, name: str, batch: Batch) -> collections_pb2.IngestResponse:
        request = collections_pb2.UpsertRequest(
            collection=name,
            ids=from_numpy("ids", batch.ids),
            texts=batch.texts or [],
            metadata_json=batch.metadata or [],
        )
        if batch.vectors is not None:
            request.vectors.CopyFrom(
                from_numpy("vectors", np.ascontiguousarray(batch.vectors, dtype=np.float32)))
        try:
            return self.stub.Upsert(request, timeout=300)  # type: ignore[no-any-return]
        except grpc.RpcError as err:
            raise _rpc(err) from None


def _rpc(err: grpc.RpcError) -> RPCError:
    code = err.code()  # type: ignore[attr-defined]
    return RPCError(f"{code.name}: {err.details()}", code)  # type: ignore[attr-defined]


def batches(path: Path, ids_path: Path | None, rows_per_batch: int
            ) -> tuple[int, int, Iterator[Batch]]:
    """(row count, dim, batches) of an input file; texts have the embedding model's dim."""
    if path.suffix == ".npy":
        x, ids = read_npy(path, ids_path)

        def npy() -> Iterator[Batch]:
            for lo in range(0, x.shape[0], rows_per_batch):
                yield Batch(ids=ids[lo : lo + rows_per_batch],
                            vectors=np.asarray(x[lo : lo + rows_per_batch], dtype=np.float32))

        return x.shape[0], x.shape[1], npy()
    if path.suffix == ".jsonl":
        if ids_path is not None:
            raise IngestError("--ids applies to .npy input; .jsonl rows carry their own 'id'")
        rows = read_jsonl(path)

        def jsonl() -> Iterator[Batch]:
            for lo in range(0, len(rows), rows_per_batch):
                part = rows[lo : lo + rows_per_batch]
                yield Batch(ids=np.array([r[0] for r in part], dtype=np.int64),
                            texts=[r[1] for r in part], metadata=[r[2] for r in part])

        return len(rows), TEXT_DIM, jsonl()
    raise IngestError(f"{path}: expected a .npy (vectors) or .jsonl (texts) file")


def ingest(
    router: str,
    collection: str,
    path: Path,
    *,
    ids_path: Path | None = None,
    nlist: int = 0,
    metric: str = "ip",
    dtype: str = "float32",
    rows_per_batch: int = 0,
    on_start: Callable[[int], None] = lambda _: None,
    on_progress: Callable[[int], None] = lambda _: None,
) -> tuple[int, int]:
    """Load a file into a collection; returns (rows acknowledged, last stream sequence)."""
    n, dim, parts = batches(path, ids_path, rows_per_batch or
                            (256 if path.suffix == ".jsonl" else 20_000))
    client = Ingester(router)
    try:
        client.ensure(collection, dim, nlist or default_nlist(n), metric, dtype)
        on_start(n)
        done, seq = 0, 0
        for batch in parts:
            reply = client.upsert(collection, batch)
            done += reply.count
            seq = reply.seq
            on_progress(reply.count)
        return done, seq
    finally:
        client.close()
