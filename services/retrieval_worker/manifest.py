"""The collection's spec and manifest, and the atomic file writes both rely on.

The manifest is the one file whose rename commits a flush: it names the segment files that
make up each block and the JetStream sequence (``last_applied_seq``) that state reflects.
Everything it names was written (temp name, fsync, rename, directory fsync) before it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

import msgspec
import numpy as np

from services.retrieval_worker.errors import InvalidArgument, NotFound

MANIFEST_NAME = "manifest.json"
CENTROIDS_NAME = "centroids.npy"
FORMAT_VERSION = 1

Metric = Literal["ip", "l2"]
StorageDtype = Literal["float32", "float16"]

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class CollectionSpec(msgspec.Struct, frozen=True, kw_only=True):
    """What a collection is: fixed at creation, stored in its manifest."""

    name: str
    """Collection name: letters, digits, ``_.-``; at most 64 characters."""
    dim: int
    """Vector dimension."""
    metric: Metric = "ip"
    """``ip`` (inner product, higher is better) or ``l2`` (squared distance, lower is better)."""
    nlist: int = 1024
    """Number of IVF lists (coarse centroids)."""
    dtype: StorageDtype = "float32"
    """Storage dtype of block vectors; float16 halves bytes, scans upcast to float32."""
    lists_per_block: int = 8
    """IVF lists per block; a block (the unit of tiering and sharding) holds lists
    ``[b * lists_per_block, (b + 1) * lists_per_block)``."""
    seed: int = 1234
    """Seed of k-means training, so a rebuild from the same sample gives the same centroids."""

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name):
            raise InvalidArgument(f"bad collection name {self.name!r}")
        if not 1 <= self.dim <= 65536:
            raise InvalidArgument(f"dim must be in [1, 65536], got {self.dim}")
        if self.metric not in ("ip", "l2"):
            raise InvalidArgument(f"metric must be 'ip' or 'l2', got {self.metric!r}")
        if self.dtype not in ("float32", "float16"):
            raise InvalidArgument(f"dtype must be 'float32' or 'float16', got {self.dtype!r}")
        if not 1 <= self.nlist <= 1 << 20:
            raise InvalidArgument(f"nlist must be in [1, 2**20], got {self.nlist}")
        if not 1 <= self.lists_per_block <= self.nlist:
            raise InvalidArgument(
                f"lists_per_block must be in [1, nlist={self.nlist}], got {self.lists_per_block}"
            )

    @property
    def nblocks(self) -> int:
        """Number of blocks (the last one may hold fewer lists)."""
        return -(-self.nlist // self.lists_per_block)

    @property
    def itemsize(self) -> int:
        """Bytes per stored vector component."""
        return 2 if self.dtype == "float16" else 4

    def block_of_list(self, list_no: int) -> int:
        """Block that holds IVF list ``list_no``."""
        return list_no // self.lists_per_block

    def lists_of_block(self, block_id: int) -> range:
        """IVF lists held by block ``block_id``."""
        lo = block_id * self.lists_per_block
        return range(lo, min(lo + self.lists_per_block, self.nlist))


class Manifest(msgspec.Struct, kw_only=True):
    """Committed state of a collection: spec, training flag, applied sequence, block files."""

    format: int = FORMAT_VERSION
    spec: CollectionSpec
    trained: bool = False
    last_applied_seq: int = 0
    """JetStream sequence of the last ingest message reflected by the files named here."""
    next_gen: int = 1
    """Generation number the next segment file gets; never reused, so a file name committed
    once is never overwritten by a later (possibly crashed) flush."""
    blocks: dict[int, list[int]] = msgspec.field(default_factory=dict)
    """block id -> generations of its segments, oldest first."""


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Manifest)


def fsync_dir(path: Path) -> None:
    """Fsync a directory so a rename or create inside it survives a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, *, sync_dir: bool = True) -> None:
    """Write ``data`` to ``path`` via a temp name, fsync and rename (and fsync the directory).

    A reader (or a reopen after a crash) sees either the old file or the whole new one.
    """
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    if sync_dir:
        fsync_dir(path.parent)


def save_npy_atomic(path: Path, array: np.ndarray, *, sync_dir: bool = True) -> None:
    """Write an array as ``.npy`` atomically (see :func:`write_atomic`)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(array), allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    if sync_dir:
        fsync_dir(path.parent)


def save_manifest(root: Path, manifest: Manifest) -> None:
    """Commit ``manifest`` (the last write of a flush)."""
    write_atomic(root / MANIFEST_NAME, _encoder.encode(manifest))


def load_manifest(root: Path) -> Manifest:
    """Read the committed manifest of the collection at ``root``."""
    path = root / MANIFEST_NAME
    if not path.exists():
        raise NotFound(f"no collection at {root} (missing {MANIFEST_NAME})")
    manifest = _decoder.decode(path.read_bytes())
    if manifest.format != FORMAT_VERSION:
        raise InvalidArgument(f"unsupported manifest format {manifest.format} at {root}")
    return manifest
