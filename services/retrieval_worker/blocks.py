"""Blocks: the on-disk segment files of a group of IVF lists, and the tiers that serve them.

A block holds ``lists_per_block`` consecutive IVF lists. On disk it is a directory of
*segments*; each flush that touches the block appends one segment (never rewrites older
ones), and compaction later folds all segments into one. A segment of generation ``g`` is
four ``.npy`` files written with temp name + fsync + rename:

- ``g{g}.vec.npy``  vectors in the storage dtype, rows sorted by local list,
- ``g{g}.ids.npy``  int64 ids, same order,
- ``g{g}.off.npy``  int64 offsets, ``lists_per_block + 1`` entries: local list ``j`` is rows
  ``off[j]:off[j+1]``,
- ``g{g}.del.npy``  int64 ids whose rows in *older* segments of this block are dead
  (deleted or replaced by this flush).

Where a block's arrays come from is a :class:`BlockSource` (one per tier). A source turns the
committed segment files into a :class:`BlockView`, the read-only object the search engine
scans. Views are immutable: a placement change or a flush builds a new view and swaps it in,
and searches still holding the old one keep reading it until they finish.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import faiss
import numpy as np

from services.retrieval_worker.manifest import fsync_dir, save_npy_atomic
from services.retrieval_worker.tiers import SQ8, Chunk, Codec, Tier, block_bytes

SUFFIXES = ("vec", "ids", "off", "del")

# re-exported: they live in tiers.py (no faiss import)
__all__ = ["SQ8", "Chunk", "Codec", "Tier", "block_bytes"]


@dataclass(frozen=True)
class SegmentFiles:
    """Paths of one committed segment of a block."""

    block_dir: Path
    gen: int

    def path(self, suffix: str) -> Path:
        """Path of this segment's ``suffix`` file (vec, ids, off, del)."""
        return self.block_dir / f"g{self.gen:08d}.{suffix}.npy"

    def paths(self) -> list[Path]:
        """All four file paths."""
        return [self.path(s) for s in SUFFIXES]


def block_dir(root: Path, block_id: int) -> Path:
    """Directory of block ``block_id`` under a collection root."""
    return root / "blocks" / f"b{block_id:06d}"


def write_segment(
    seg: SegmentFiles,
    vectors: np.ndarray,
    ids: np.ndarray,
    offsets: np.ndarray,
    deleted: np.ndarray,
) -> None:
    """Durably write one segment: each file temp+fsync+rename, then one directory fsync."""
    seg.block_dir.mkdir(parents=True, exist_ok=True)
    arrays = (vectors, ids.astype(np.int64, copy=False), offsets.astype(np.int64, copy=False),
              deleted.astype(np.int64, copy=False))
    for suffix, arr in zip(SUFFIXES, arrays, strict=True):
        save_npy_atomic(seg.path(suffix), arr, sync_dir=False)
    fsync_dir(seg.block_dir)


def live_masks(ids_per_seg: Sequence[np.ndarray], del_per_seg: Sequence[np.ndarray]) -> list[
    np.ndarray | None
]:
    """Which rows of each segment are live: a row dies if a *later* segment deletes its id."""
    masks: list[np.ndarray | None] = []
    later_deleted = np.empty(0, dtype=np.int64)
    for ids, deleted in zip(reversed(ids_per_seg), reversed(del_per_seg), strict=True):
        if later_deleted.size and ids.size:
            dead = np.isin(ids, later_deleted)
            masks.append(~dead if dead.any() else None)
        else:
            masks.append(None)
        if deleted.size:
            later_deleted = np.union1d(later_deleted, deleted)
    masks.reverse()
    return masks


class BlockView(Protocol):
    """Read-only view of one block, as the search engine scans it."""

    block_id: int
    tier: Tier
    count: int  # live vectors
    nbytes: int  # bytes this view holds in its tier (vectors + ids)

    def chunks(self, local_list: int) -> Sequence[Chunk]:
        """Runs of local list ``local_list`` (0 <= local_list < lists in block)."""
        ...

    @property
    def invlists(self) -> faiss.InvertedLists | None:
        """The block as FAISS inverted lists (RAM tiers), or None if FAISS cannot read it."""
        ...


class BlockSource(Protocol):
    """One tier: turns a block's committed segment files into a view served from that tier."""

    tier: Tier
    codec: Codec  # how the tier holds vectors (what a block of n rows costs there)

    def load(
        self,
        block_id: int,
        nlists: int,
        segments: Sequence[SegmentFiles],
        live: Sequence[np.ndarray | None],
    ) -> BlockView:
        """Build the view of ``block_id`` (``nlists`` local lists) from its segments."""
        ...


def _open(seg: SegmentFiles, mmap: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if mmap:
        vec = np.load(seg.path("vec"), mmap_mode="r", allow_pickle=False)
        ids = np.load(seg.path("ids"), mmap_mode="r", allow_pickle=False)
    else:
        vec = np.load(seg.path("vec"), allow_pickle=False)
        ids = np.load(seg.path("ids"), allow_pickle=False)
    off = np.load(seg.path("off"), allow_pickle=False)
    return vec, ids, off


class ColdBlock:
    """A block read from disk through memory maps, opened on first scan."""

    tier = Tier.COLD

    def __init__(
        self,
        block_id: int,
        nlists: int,
        segments: Sequence[SegmentFiles],
        live: Sequence[np.ndarray | None],
    ) -> None:
        self.block_id = block_id
        self._nlists = nlists
        self._segments = list(segments)
        self._live = list(live)
        self._lock = threading.Lock()
        self._opened: list[tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None
        # count and bytes come from the offsets and file sizes, so describe() opens nothing
        count = 0
        nbytes = 0
        for seg, mask in zip(self._segments, self._live, strict=True):
            off = np.load(seg.path("off"), allow_pickle=False)
            rows = int(off[-1])
            count += rows if mask is None else int(mask.sum())
            nbytes += seg.path("vec").stat().st_size + seg.path("ids").stat().st_size
        self.count = count
        self.nbytes = nbytes

    def _maps(self) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        opened = self._opened
        if opened is None:
            with self._lock:
                if self._opened is None:
                    self._opened = [_open(s, mmap=True) for s in self._segments]
                opened = self._opened
        return opened

    def chunks(self, local_list: int) -> list[Chunk]:
        """Runs of ``local_list``: one per segment that has rows for it."""
        out = []
        for (vec, ids, off), mask in zip(self._maps(), self._live, strict=True):
            a, b = int(off[local_list]), int(off[local_list + 1])
            if b > a:
                out.append(Chunk(vec[a:b], ids[a:b], None if mask is None else mask[a:b]))
        return out

    @property
    def invlists(self) -> faiss.InvertedLists | None:
        """Cold blocks are not handed to FAISS (it would have to page them all in)."""
        return None


class WarmBlock:
    """A block held in RAM, as its storage dtype, float16 or SQ8 codes.

    Float32 and float16 rows sit in FAISS inverted lists (the codes of ``IndexIVFFlat`` and of
    ``IndexIVFScalarQuantizer`` ``QT_fp16`` are the raw little-endian vectors), so FAISS scans
    them in place and numpy scans view the same memory. SQ8 codes carry ranges of their own
    block, which no FAISS IVF index takes per list: they sit in FAISS lists of their own
    (``sq8_invlists``, not ``invlists``), which the searcher scans with a ``QT_8bit`` index of
    fixed ranges and queries scaled per block (faiss_lists.py), and numpy views them too.
    """

    tier = Tier.WARM

    def __init__(
        self,
        block_id: int,
        nlists: int,
        segments: Sequence[SegmentFiles],
        live: Sequence[np.ndarray | None],
        *,
        codec: Codec = Codec.NONE,
        metric: str = "ip",
    ) -> None:
        self.block_id = block_id
        self.codec = codec
        opened = [_open(s, mmap=True) for s in segments]
        dim = opened[0][0].shape[1] if opened else 1
        stored = opened[0][0].dtype if opened else np.dtype(np.float32)
        per_list: list[tuple[np.ndarray, np.ndarray] | None] = []
        for j in range(nlists):
            vs, ids = [], []
            for (vec, sid, off), mask in zip(opened, live, strict=True):
                a, b = int(off[j]), int(off[j + 1])
                if b > a:
                    v, i = np.asarray(vec[a:b]), np.asarray(sid[a:b])
                    if mask is not None:
                        v, i = v[mask[a:b]], i[mask[a:b]]
                    vs.append(v)
                    ids.append(i)
            if sum(len(i) for i in ids) == 0:
                per_list.append(None)
                continue
            per_list.append((np.concatenate(vs), np.concatenate(ids).astype(np.int64)))
        self.count = sum(len(p[1]) for p in per_list if p is not None)
        self.nbytes = block_bytes(codec, dim, stored.itemsize, metric, self.count)
        self._chunks: list[list[Chunk]] = []
        self._il: faiss.InvertedLists | None = None
        self._sq8_il: faiss.InvertedLists | None = None
        if codec is Codec.SQ8:
            self._load_sq8(per_list, dim, metric)
            return
        dtype = np.dtype(np.float16) if codec is Codec.FLOAT16 else stored
        code_size = dim * dtype.itemsize
        self._il = faiss.ArrayInvertedLists(nlists, code_size)
        for j, found in enumerate(per_list):
            if found is None:
                self._chunks.append([])
                continue
            v_all = np.ascontiguousarray(found[0], dtype=dtype)
            i_all = np.ascontiguousarray(found[1])
            n = i_all.size
            self._il.add_entries(j, n, faiss.swig_ptr(i_all), faiss.swig_ptr(v_all.view(np.uint8)))
            codes = faiss.rev_swig_ptr(self._il.get_codes(j), n * code_size)
            v_view = np.frombuffer(codes, dtype=np.uint8).view(dtype).reshape(n, dim)
            i_view = faiss.rev_swig_ptr(self._il.get_ids(j), n)
            self._chunks.append([Chunk(v_view, i_view, None)])

    def _load_sq8(
        self, per_list: list[tuple[np.ndarray, np.ndarray] | None], dim: int, metric: str
    ) -> None:
        found = [p for p in per_list if p is not None]
        rows = (np.concatenate([p[0] for p in found]) if found
                else np.empty((0, dim), np.float32))
        self.sq8 = SQ8.train(rows)
        codes = self.sq8.encode(rows)
        norms = None
        if metric == "l2":
            decoded = self.sq8.decode(codes)
            norms = np.einsum("ij,ij->i", decoded, decoded).astype(np.float32)
        # FAISS lists of the raw codes: a QT_8bit index whose ranges are [0, 255] reads code
        # c as c + 0.5, so a query scaled by this block's ranges scores them (faiss_lists.py)
        self._sq8_il = faiss.ArrayInvertedLists(len(per_list), dim)
        at = 0
        for j, p in enumerate(per_list):
            if p is None:
                self._chunks.append([])
                continue
            n = p[1].size
            c_all = np.ascontiguousarray(codes[at : at + n])
            i_all = np.ascontiguousarray(p[1])
            self._sq8_il.add_entries(j, n, faiss.swig_ptr(i_all), faiss.swig_ptr(c_all))
            c_view = np.frombuffer(faiss.rev_swig_ptr(self._sq8_il.get_codes(j), n * dim),
                                   dtype=np.uint8).reshape(n, dim)
            i_view = faiss.rev_swig_ptr(self._sq8_il.get_ids(j), n)
            self._chunks.append([Chunk(c_view, i_view, None, self.sq8,
                                       None if norms is None else norms[at : at + n])])
            at += n

    def chunks(self, local_list: int) -> list[Chunk]:
        """The one run of ``local_list`` (dead rows were dropped when the block was loaded)."""
        return self._chunks[local_list]

    @property
    def invlists(self) -> faiss.InvertedLists | None:
        """The block's FAISS inverted lists (read-only once built); None for SQ8 codes."""
        return self._il

    @property
    def sq8_invlists(self) -> faiss.InvertedLists | None:
        """SQ8 codes as FAISS lists (one byte a component, ranges in ``sq8``), or None."""
        return self._sq8_il


class ColdSource:
    """Cold tier: block files memory-mapped on demand; the page cache decides what stays."""

    tier = Tier.COLD
    codec = Codec.NONE

    def load(
        self,
        block_id: int,
        nlists: int,
        segments: Sequence[SegmentFiles],
        live: Sequence[np.ndarray | None],
    ) -> BlockView:
        """A view that opens the memory maps on first scan."""
        return ColdBlock(block_id, nlists, segments, live)


class WarmSource:
    """Warm tier: block read fully into RAM (dead rows dropped), stored under ``codec``."""

    tier = Tier.WARM

    def __init__(self, codec: Codec = Codec.NONE, metric: str = "ip") -> None:
        self.codec = codec
        self.metric = metric

    def load(
        self,
        block_id: int,
        nlists: int,
        segments: Sequence[SegmentFiles],
        live: Sequence[np.ndarray | None],
    ) -> BlockView:
        """Read the block into RAM now (the caller swaps it in once this returns)."""
        return WarmBlock(block_id, nlists, segments, live, codec=self.codec, metric=self.metric)


class ReadCounters:
    """Per-block read counts by tier, which the worker publishes as access statistics."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[tuple[int, Tier], int] = {}

    def add(self, reads: dict[tuple[int, Tier], int]) -> None:
        """Add the reads of one search (block, tier) -> number of list scans."""
        with self._lock:
            for key, n in reads.items():
                self._counts[key] = self._counts.get(key, 0) + n

    def snapshot(self) -> dict[int, dict[str, int]]:
        """Counts so far: block -> tier -> reads."""
        with self._lock:
            items = list(self._counts.items())
        out: dict[int, dict[str, int]] = {}
        for (block, tier), n in items:
            out.setdefault(block, {})[tier.value] = n
        return out

    def drain(self) -> dict[int, dict[str, int]]:
        """Counts since the last drain (and reset), for publishing deltas."""
        with self._lock:
            items = list(self._counts.items())
            self._counts.clear()
        out: dict[int, dict[str, int]] = {}
        for (block, tier), n in items:
            out.setdefault(block, {})[tier.value] = n
        return out
