"""A durable IVF collection: ingest (upsert/delete by JetStream sequence), flush, search.

Layout under the collection root::

    manifest.json          spec, trained?, last_applied_seq, next_gen, block -> segment gens
    centroids.npy          coarse centroids (nlist, dim) float32, always resident
    payloads.sqlite        payloads by id (WAL)
    blocks/b000007/g00000042.{vec,ids,off,del}.npy   segments of block 7 (see blocks.py)

Ingest is buffered: ``upsert``/``delete`` record the operation (each tagged with the stream
``seq`` of its message) and ``flush`` applies everything pending at once, so many small
messages cost one segment per *touched* block per flush, never a rewrite of every block.
Searches see flushed state. A flush also runs on its own once ``flush_rows`` are pending.

Until the collection is trained (``train(sample)``), operations stay pending; the first flush
with at least ``max(39 * nlist, 1000)`` pending vectors trains k-means on them first. A flush
that cannot train yet persists nothing and leaves ``last_applied_seq`` where it was, so a
crash loses nothing that the stream does not still hold.

Crash consistency. A flush writes, in this order: (1) payloads, one SQLite transaction;
(2) one new segment per touched block, each file under a temp name, fsynced, renamed, and the
block directory fsynced -- new segments get generations never used before, so no committed
file is overwritten; (3) the manifest, the same way, naming the new segments and
``last_applied_seq = seq``. The manifest rename is the commit point. On open only segments
named by the manifest are read (newer files are orphans of a crashed flush and are deleted),
so the vector state is exactly the one after the messages up to ``last_applied_seq``. Payloads
may be ahead (step 1 done, step 3 not); replaying from ``last_applied_seq + 1`` re-applies the
same last-writer-wins operations, which brings both back in line. Each message applied is an
idempotent set or delete by id, and the id index keeps every id in at most one live row
(a replacement writes a tombstone for the old row's block in the same flush), so after the
replay every id is present exactly once. Operations with ``seq <= `` the highest one seen
are ignored, so replaying too much is harmless too.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import msgspec
import numpy as np

from services.retrieval_worker.blocks import (
    SUFFIXES,
    BlockSource,
    BlockView,
    Codec,
    ColdSource,
    ReadCounters,
    SegmentFiles,
    Tier,
    WarmSource,
    block_bytes,
    block_dir,
    live_masks,
    write_segment,
)
from services.retrieval_worker.errors import FailedPrecondition, InvalidArgument, NotFound
from services.retrieval_worker.manifest import (
    CENTROIDS_NAME,
    CollectionSpec,
    Manifest,
    load_manifest,
    save_manifest,
    save_npy_atomic,
)
from services.retrieval_worker.payloads import PAYLOADS_NAME, PayloadStore, encode_payload
from services.retrieval_worker.search import DEFAULT_CROSSOVER, Searcher, check_queries
from shared.validation import MAX_VECTOR_ABS


class CollectionInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What ``describe()`` reports about a collection."""

    name: str
    dim: int
    metric: str
    nlist: int
    dtype: str
    trained: bool
    count: int
    """Live vectors in flushed state."""
    pending_ops: int
    """Buffered upsert/delete calls not yet flushed."""
    last_applied_seq: int
    blocks: int
    """Blocks holding at least one segment."""
    segments: int
    blocks_by_tier: dict[str, int]
    bytes_by_tier: dict[str, int]


#: The tier of a block nobody placed yet: fixed, or chosen from the bytes it will take in
#: the warm tier (the worker's warm allowance: warm until its budget fills, then cold).
DefaultTier = Tier | Callable[[int], Tier]


@dataclass(frozen=True)
class _Op:
    """One buffered ingest call."""

    seq: int
    ids: np.ndarray
    vectors: np.ndarray | None  # None = delete
    payloads: list[bytes | None] | None


def _check_ids(ids: np.ndarray) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise InvalidArgument(f"ids must be a 1-d integer array, got {arr.dtype} {arr.shape}")
    arr = arr.astype(np.int64, copy=False)
    if arr.size and arr.min() < 0:
        raise InvalidArgument("ids must be non-negative (-1 marks a missing result)")
    if np.unique(arr).size != arr.size:
        raise InvalidArgument("ids must be unique within one call")
    return arr


def _check_seq(seq: int) -> int:
    if not isinstance(seq, int | np.integer) or seq < 1:
        raise InvalidArgument(f"seq must be a positive integer, got {seq!r}")
    return int(seq)


class Collection:
    """One IVF collection on disk: durable ingest, tiered blocks, batched search."""

    def __init__(
        self,
        root: Path,
        manifest: Manifest,
        *,
        default_tier: DefaultTier,
        sources: Mapping[Tier, BlockSource] | None,
        flush_rows: int,
        crossover: float,
        warm_codec: Codec = Codec.NONE,
    ) -> None:
        self.root = root
        self.spec = manifest.spec
        self._manifest = manifest
        self._sources: dict[Tier, BlockSource] = {
            Tier.WARM: WarmSource(warm_codec, manifest.spec.metric), Tier.COLD: ColdSource(),
        }
        self._sources.update(sources or {})
        if isinstance(default_tier, Tier) and default_tier not in self._sources:
            raise InvalidArgument(f"no block source for tier {default_tier}")
        self._default_tier = default_tier
        self._flush_rows = flush_rows
        self._crossover = crossover
        self._lock = threading.RLock()  # writers: flush, place, compact, train
        self._closed = False
        self._pending: list[_Op] = []
        self._pending_rows = 0
        self._overlay: dict[int, bool] = {}  # pending existence: id -> present after pending ops
        self._seen_seq = manifest.last_applied_seq
        self._placement: dict[int, Tier] = {}
        self._views: dict[int, BlockView] = {}
        self._live: dict[int, list[np.ndarray | None]] = {}
        self._id_keys = np.empty(0, dtype=np.int64)
        self._id_block = np.empty(0, dtype=np.int32)
        self.reads = ReadCounters()
        self.payloads = PayloadStore(root / PAYLOADS_NAME)
        self._quantizer: faiss.IndexFlat | None = None
        self._searcher: Searcher | None = None
        if manifest.trained:
            self._set_quantizer(np.load(root / CENTROIDS_NAME, allow_pickle=False))
        self._remove_orphans()
        self._load_blocks(list(manifest.blocks))
        self._rebuild_id_index()
        self._publish()

    # -- lifecycle ---------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        root: Path,
        spec: CollectionSpec,
        *,
        default_tier: DefaultTier = Tier.WARM,
        sources: Mapping[Tier, BlockSource] | None = None,
        flush_rows: int = 200_000,
        crossover: float = DEFAULT_CROSSOVER,
        warm_codec: Codec = Codec.NONE,
    ) -> Collection:
        """Create an empty collection at ``root`` (which must not hold one already).

        ``warm_codec`` is how warm blocks are held in RAM (the files keep ``spec.dtype``).
        """
        root = Path(root)
        if (root / "manifest.json").exists():
            raise FailedPrecondition(f"a collection already exists at {root}")
        root.mkdir(parents=True, exist_ok=True)
        (root / "blocks").mkdir(exist_ok=True)
        save_manifest(root, Manifest(spec=spec))
        return cls(root, load_manifest(root), default_tier=default_tier, sources=sources,
                   flush_rows=flush_rows, crossover=crossover, warm_codec=warm_codec)

    @classmethod
    def open(
        cls,
        root: Path,
        *,
        default_tier: DefaultTier = Tier.WARM,
        sources: Mapping[Tier, BlockSource] | None = None,
        flush_rows: int = 200_000,
        crossover: float = DEFAULT_CROSSOVER,
        warm_codec: Codec = Codec.NONE,
    ) -> Collection:
        """Open the committed state of the collection at ``root`` (after a crash too)."""
        root = Path(root)
        return cls(root, load_manifest(root), default_tier=default_tier, sources=sources,
                   flush_rows=flush_rows, crossover=crossover, warm_codec=warm_codec)

    def close(self) -> None:
        """Release files and connections; pending (unflushed) operations are dropped."""
        with self._lock:
            self._closed = True
            self._searcher = None
            self._views.clear()
            self.payloads.close()

    def drop(self) -> None:
        """Close the collection and delete all its files."""
        with self._lock:
            self.close()
            shutil.rmtree(self.root)

    def _check_open(self) -> None:
        if self._closed:
            raise FailedPrecondition(f"collection {self.spec.name} is closed")

    # -- state -------------------------------------------------------------------------

    @property
    def last_applied_seq(self) -> int:
        """Sequence of the last ingest message reflected in the committed (flushed) state."""
        return self._manifest.last_applied_seq

    @property
    def trained(self) -> bool:
        """Whether the coarse centroids exist."""
        return self._manifest.trained

    def describe(self) -> CollectionInfo:
        """Counts, blocks and bytes per tier, training state."""
        views = dict(self._views)
        by_tier_b = {t.value: 0 for t in Tier}
        by_tier_n = {t.value: 0 for t in Tier}
        for v in views.values():
            by_tier_b[v.tier.value] += v.nbytes
            by_tier_n[v.tier.value] += 1
        m = self._manifest
        return CollectionInfo(
            name=self.spec.name, dim=self.spec.dim, metric=self.spec.metric,
            nlist=self.spec.nlist, dtype=self.spec.dtype, trained=m.trained,
            count=int(self._id_keys.size), pending_ops=len(self._pending),
            last_applied_seq=m.last_applied_seq, blocks=len(m.blocks),
            segments=sum(len(g) for g in m.blocks.values()),
            blocks_by_tier=by_tier_n, bytes_by_tier=by_tier_b,
        )

    def placement(self) -> dict[int, Tier]:
        """Tier of each block that holds data."""
        return {b: v.tier for b, v in self._views.items()}

    def block_bytes(self) -> dict[int, int]:
        """Bytes each block that holds data takes in its current tier."""
        return {b: v.nbytes for b, v in self._views.items()}

    def tier_codecs(self) -> dict[Tier, Codec]:
        """How each tier of this worker holds vectors."""
        return {t: src.codec for t, src in self._sources.items()}

    def bytes_in(self, tier: Tier) -> dict[int, int]:
        """Bytes each block that holds data takes (or would take) in ``tier``.

        Where a tier compresses (warm or hot SQ8/float16), a block's size depends on its
        tier: tiering fills a budget with what blocks take *there*. Cold is the files.
        """
        src = self._sources.get(tier)
        if src is None:
            return {}
        spec = self.spec
        out = {}
        for b, v in list(self._views.items()):
            if v.tier is tier:
                out[b] = v.nbytes
            elif tier is Tier.COLD:
                out[b] = v.count * (spec.dim * spec.itemsize + 8)
            else:
                out[b] = block_bytes(src.codec, spec.dim, spec.itemsize, spec.metric, v.count)
        return out

    def read_counts(self, *, drain: bool = False) -> dict[int, dict[str, int]]:
        """Per-block list scans by tier since open (or since the last drain)."""
        return self.reads.drain() if drain else self.reads.snapshot()

    # -- training ----------------------------------------------------------------------

    def train(self, sample: np.ndarray) -> None:
        """Train the coarse centroids with FAISS k-means (seeded) on ``sample``."""
        with self._lock:
            self._check_open()
            if self._manifest.trained:
                raise FailedPrecondition(f"collection {self.spec.name} is already trained")
            x = check_queries(sample, self.spec.dim)
            if x.shape[0] < self.spec.nlist:
                raise InvalidArgument(
                    f"training needs at least nlist={self.spec.nlist} vectors, got {x.shape[0]}"
                )
            km = faiss.Kmeans(self.spec.dim, self.spec.nlist, niter=20, seed=self.spec.seed,
                              spherical=self.spec.metric == "ip", verbose=False)
            km.train(x)
            centroids = np.ascontiguousarray(km.centroids, dtype=np.float32)
            save_npy_atomic(self.root / CENTROIDS_NAME, centroids)
            self._manifest.trained = True
            save_manifest(self.root, self._manifest)
            self._set_quantizer(centroids)
            self._publish()

    def _set_quantizer(self, centroids: np.ndarray) -> None:
        q = faiss.IndexFlatIP(self.spec.dim) if self.spec.metric == "ip" else faiss.IndexFlatL2(
            self.spec.dim
        )
        q.add(np.ascontiguousarray(centroids, dtype=np.float32))
        self._quantizer = q

    @property
    def centroids(self) -> np.ndarray:
        """The coarse centroids (nlist, dim); FailedPrecondition before training."""
        if self._quantizer is None:
            raise FailedPrecondition(f"collection {self.spec.name} is not trained")
        return self._quantizer.reconstruct_n(0, self.spec.nlist)

    # -- ingest ------------------------------------------------------------------------

    def upsert(
        self,
        ids: np.ndarray,
        vectors: np.ndarray,
        payloads: Sequence[dict[str, Any] | None] | None = None,
        *,
        seq: int,
    ) -> bool:
        """Insert or replace ``ids`` (message ``seq``); visible after the next flush.

        Returns False (and does nothing) if ``seq`` was already applied.
        """
        ids = _check_ids(ids)
        vec = check_queries(vectors, self.spec.dim) if ids.size else np.empty(
            (0, self.spec.dim), np.float32)
        if vec.shape[0] != ids.size:
            raise InvalidArgument(f"{ids.size} ids but {vec.shape[0]} vectors")
        if vec.size and float(np.abs(vec).max()) > MAX_VECTOR_ABS:
            # Checked here too, not only at the router: FAISS aborts the whole process on the
            # overflow, and the stream may hold messages from another writer.
            raise InvalidArgument(
                f"vector values must be within +-{MAX_VECTOR_ABS:.0e} (distances overflow float32)"
            )
        enc: list[bytes | None] | None = None
        if payloads is not None:
            if len(payloads) != ids.size:
                raise InvalidArgument(f"{ids.size} ids but {len(payloads)} payloads")
            enc = [None if p is None else encode_payload(p) for p in payloads]
        seq = _check_seq(seq)
        with self._lock:
            self._check_open()
            if seq <= self._seen_seq:
                return False
            self._pending.append(_Op(seq, ids.copy(), vec.copy(), enc))
            self._pending_rows += ids.size
            self._overlay.update(dict.fromkeys(ids.tolist(), True))
            self._seen_seq = seq
            if self._pending_rows >= self._flush_rows:
                self.flush()
            return True

    def delete(self, ids: np.ndarray, *, seq: int, missing_ok: bool = False) -> bool:
        """Delete ``ids`` (message ``seq``); NotFound if one is unknown unless ``missing_ok``.

        Returns False (and does nothing) if ``seq`` was already applied.
        """
        ids = _check_ids(ids)
        seq = _check_seq(seq)
        with self._lock:
            self._check_open()
            if seq <= self._seen_seq:
                return False
            if not missing_ok:
                missing = ids[~self._exists(ids)]
                if missing.size:
                    raise NotFound(f"unknown ids {missing[:10].tolist()} in {self.spec.name}")
            self._pending.append(_Op(seq, ids.copy(), None, None))
            self._overlay.update(dict.fromkeys(ids.tolist(), False))
            self._seen_seq = seq
            return True

    def _exists(self, ids: np.ndarray) -> np.ndarray:
        """Whether each id is present once pending operations apply."""
        pos = np.searchsorted(self._id_keys, ids)
        pos = np.minimum(pos, max(self._id_keys.size - 1, 0))
        out = (self._id_keys[pos] == ids) if self._id_keys.size else np.zeros(ids.size, bool)
        for j, i in enumerate(ids.tolist()):
            if i in self._overlay:
                out[j] = self._overlay[i]
        return np.asarray(out, dtype=bool)

    def flush(self, seq: int | None = None) -> bool:
        """Apply and persist all pending operations; record ``last_applied_seq``.

        ``seq`` (optional) may advance ``last_applied_seq`` past messages that held nothing for
        this collection. Returns False if nothing could be committed (no change, or not trained
        and too few vectors pending to train).
        """
        with self._lock:
            self._check_open()
            target = max(self._seen_seq, _check_seq(seq) if seq is not None else 0)
            if not self._pending and target <= self._manifest.last_applied_seq:
                return False
            if not self._manifest.trained:
                if not self._pending:
                    self._manifest.last_applied_seq = target
                    save_manifest(self.root, self._manifest)
                    self._seen_seq = target
                    return True
                _, up_vec, _, _ = self._resolve()
                if up_vec.shape[0] < max(39 * self.spec.nlist, 1000):
                    return False
                self.train(up_vec)
            self._apply_pending(target)
            return True

    def _resolve(
        self,
    ) -> tuple[np.ndarray, np.ndarray, list[bytes | None], np.ndarray]:
        """Pending ops folded to the final state per id: upserts (ids, vecs, payloads), deletes."""
        all_ids = [op.ids for op in self._pending]
        is_up = [np.full(op.ids.size, op.vectors is not None) for op in self._pending]
        vecs = [op.vectors for op in self._pending if op.vectors is not None]
        pays: list[bytes | None] = []
        for op in self._pending:
            if op.vectors is not None:
                pays.extend(op.payloads if op.payloads is not None else [None] * op.ids.size)
        ids = np.concatenate(all_ids) if all_ids else np.empty(0, np.int64)
        up = np.concatenate(is_up) if is_up else np.empty(0, bool)
        vec_row = np.full(ids.size, -1, dtype=np.int64)
        vec_row[up] = np.arange(int(up.sum()))
        allv = np.concatenate(vecs) if vecs else np.empty((0, self.spec.dim), np.float32)
        # last occurrence of each id wins: first occurrence in the reversed order
        rev_ids = ids[::-1]
        _, first = np.unique(rev_ids, return_index=True)
        last = ids.size - 1 - first
        last_up = last[up[last]]
        last_del = last[~up[last]]
        rows = vec_row[last_up]
        return ids[last_up], allv[rows], [pays[r] for r in rows.tolist()], ids[last_del]

    def _apply_pending(self, seq: int) -> None:
        spec = self.spec
        assert self._quantizer is not None
        up_ids, up_vec, up_pay, del_ids = self._resolve()
        # (1) payloads first: being ahead of the manifest is repaired by replay
        if up_ids.size or del_ids.size:
            self.payloads.apply(zip(up_ids.tolist(), up_pay, strict=True), del_ids.tolist(), seq)
        # (2) one new segment per touched block
        if up_ids.size:
            _, assign = self._quantizer.search(up_vec, 1)
            lists = assign[:, 0].astype(np.int64)
        else:
            lists = np.empty(0, np.int64)
        touched = np.concatenate([up_ids, del_ids])
        old_block = self._block_of(touched)
        new_block = lists // spec.lists_per_block
        blocks = sorted(set(new_block.tolist()) | set(old_block[old_block >= 0].tolist()))
        stored = up_vec.astype(spec.dtype, copy=False)
        m = self._manifest
        obsolete: list[SegmentFiles] = []
        for b in blocks:
            sel = np.flatnonzero(new_block == b)
            local = lists[sel] - b * spec.lists_per_block
            order = np.argsort(local, kind="stable")
            sel, local = sel[order], local[order]
            nl = len(spec.lists_of_block(b))
            offsets = np.zeros(nl + 1, dtype=np.int64)
            np.cumsum(np.bincount(local, minlength=nl), out=offsets[1:])
            gen = m.next_gen
            m.next_gen += 1
            seg = SegmentFiles(block_dir(self.root, b), gen)
            write_segment(seg, stored[sel], up_ids[sel], offsets, touched[old_block == b])
            m.blocks.setdefault(b, []).append(gen)
        # (3) commit
        m.last_applied_seq = seq
        save_manifest(self.root, m)
        self._pending.clear()
        self._pending_rows = 0
        self._overlay.clear()
        self._seen_seq = max(self._seen_seq, seq)
        self._load_blocks(blocks)
        self._update_id_index(touched, up_ids, new_block)
        for b in blocks:
            if len(m.blocks[b]) > 8:
                obsolete += self._compact_block(b)
        self._publish()
        for seg in obsolete:
            for p in seg.paths():
                p.unlink(missing_ok=True)

    # -- compaction --------------------------------------------------------------------

    def compact(self, blocks: Sequence[int] | None = None) -> int:
        """Fold each block's segments into one without dead rows; returns blocks compacted."""
        with self._lock:
            self._check_open()
            todo = [b for b in (blocks if blocks is not None else list(self._manifest.blocks))
                    if len(self._manifest.blocks.get(b, [])) > 1]
            obsolete: list[SegmentFiles] = []
            for b in todo:
                obsolete += self._compact_block(b)
            self._publish()
            for seg in obsolete:
                for p in seg.paths():
                    p.unlink(missing_ok=True)
            return len(todo)

    def _compact_block(self, b: int) -> list[SegmentFiles]:
        """Rewrite block ``b`` as one segment and commit; returns the now-unused segments."""
        m = self._manifest
        old = [SegmentFiles(block_dir(self.root, b), g) for g in m.blocks[b]]
        nl = len(self.spec.lists_of_block(b))
        vecs, ids, counts = [], [], np.zeros(nl, dtype=np.int64)
        segs = [(np.load(s.path("vec"), mmap_mode="r"), np.load(s.path("ids")),
                 np.load(s.path("off"))) for s in old]
        for j in range(nl):
            for (v, i, off), mask in zip(segs, self._live[b], strict=True):
                a, e = int(off[j]), int(off[j + 1])
                keep = slice(a, e) if mask is None else np.flatnonzero(mask[a:e]) + a
                vecs.append(np.asarray(v[keep]))
                ids.append(i[keep])
                counts[j] += ids[-1].size
        offsets = np.zeros(nl + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        gen = m.next_gen
        m.next_gen += 1
        seg = SegmentFiles(block_dir(self.root, b), gen)
        write_segment(seg, np.concatenate(vecs), np.concatenate(ids), offsets,
                      np.empty(0, np.int64))
        m.blocks[b] = [gen]
        save_manifest(self.root, m)
        self._load_blocks([b])
        return old

    # -- tiers -------------------------------------------------------------------------

    def place(self, block_id: int, tier: Tier) -> None:
        """Move a block to ``tier``; searches keep reading the old copy until the new is ready."""
        with self._lock:
            self._check_open()
            if not 0 <= block_id < self.spec.nblocks:
                raise NotFound(f"no block {block_id} in {self.spec.name}")
            if tier not in self._sources:
                if tier is Tier.HOT:
                    raise FailedPrecondition(
                        "no hot (GPU) tier on this worker: torch with CUDA is not available, "
                        "so it has two tiers (warm, cold)"
                    )
                raise FailedPrecondition(f"no block source for tier {tier.value} on this worker")
            before = self._placement.get(block_id)
            self._placement[block_id] = tier
            if block_id in self._views and self._views[block_id].tier != tier:
                try:
                    self._load_blocks([block_id])
                except BaseException:
                    # e.g. out of GPU memory: the block stays where it was, and says so
                    if before is None:
                        self._placement.pop(block_id, None)
                    else:
                        self._placement[block_id] = before
                    raise
                self._publish()

    def _tier_of(self, b: int, segs: Sequence[SegmentFiles]) -> Tier:
        tier = self._placement.get(b)
        if tier is None:
            if isinstance(self._default_tier, Tier):
                return self._default_tier
            count = 0
            for s, mask in zip(segs, self._live[b], strict=True):
                off = np.load(s.path("off"), allow_pickle=False)
                count += int(off[-1]) if mask is None else int(mask.sum())
            spec = self.spec
            nbytes = block_bytes(self._sources[Tier.WARM].codec, spec.dim, spec.itemsize,
                                 spec.metric, count)
            # decided once: a block must not bounce between tiers as flushes grow it
            tier = self._placement[b] = self._default_tier(nbytes)
        return tier

    def _segments(self, b: int) -> list[SegmentFiles]:
        return [SegmentFiles(block_dir(self.root, b), g) for g in self._manifest.blocks.get(b, [])]

    def _load_blocks(self, blocks: Sequence[int]) -> None:
        """(Re)build views of ``blocks`` from committed files; not yet visible to searches."""
        for b in blocks:
            segs = self._segments(b)
            if not segs:
                self._views.pop(b, None)
                self._live.pop(b, None)
                continue
            ids = [np.load(s.path("ids"), mmap_mode="r") for s in segs]
            dels = [np.load(s.path("del")) for s in segs]
            self._live[b] = live_masks(ids, dels)
            nl = len(self.spec.lists_of_block(b))
            self._views[b] = self._sources[self._tier_of(b, segs)].load(
                b, nl, segs, self._live[b])

    def _publish(self) -> None:
        """Swap in a searcher over the current views (searches in flight keep theirs)."""
        if self._quantizer is None:
            self._searcher = None
            return
        self._searcher = Searcher(
            dim=self.spec.dim, metric=self.spec.metric, nlist=self.spec.nlist,
            lists_per_block=self.spec.lists_per_block, quantizer=self._quantizer,
            blocks=self._views, crossover=self._crossover,
        )

    def _remove_orphans(self) -> None:
        """Delete files a crashed flush left behind (temp files, uncommitted segments)."""
        bdir = self.root / "blocks"
        if not bdir.exists():
            return
        for p in bdir.glob("b*/*"):
            name = p.name
            if name.endswith(".tmp"):
                p.unlink()
                continue
            try:
                b = int(p.parent.name[1:])
                g = int(name.split(".")[0][1:])
            except ValueError:
                continue  # not ours: leave it
            if g not in self._manifest.blocks.get(b, []) and name.split(".")[1] in SUFFIXES:
                p.unlink()

    # -- id index ----------------------------------------------------------------------

    def _rebuild_id_index(self) -> None:
        keys, blocks = [], []
        for b in self._manifest.blocks:
            for s, mask in zip(self._segments(b), self._live[b], strict=True):
                ids = np.load(s.path("ids"))
                if mask is not None:
                    ids = ids[mask]
                keys.append(ids)
                blocks.append(np.full(ids.size, b, dtype=np.int32))
        k = np.concatenate(keys) if keys else np.empty(0, np.int64)
        bl = np.concatenate(blocks) if blocks else np.empty(0, np.int32)
        order = np.argsort(k, kind="stable")
        self._id_keys, self._id_block = k[order], bl[order]

    def _block_of(self, ids: np.ndarray) -> np.ndarray:
        """Block holding each id in committed state, -1 if absent."""
        if self._id_keys.size == 0:
            return np.full(ids.size, -1, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self._id_keys, ids), self._id_keys.size - 1)
        hit = self._id_keys[pos] == ids
        return np.where(hit, self._id_block[pos], -1).astype(np.int64)

    def _update_id_index(self, touched: np.ndarray, up_ids: np.ndarray, up_blocks: np.ndarray
                         ) -> None:
        keep = ~np.isin(self._id_keys, touched)
        k = np.concatenate([self._id_keys[keep], up_ids])
        bl = np.concatenate([self._id_block[keep], up_blocks.astype(np.int32)])
        order = np.argsort(k, kind="stable")
        self._id_keys, self._id_block = k[order], bl[order]

    # -- search ------------------------------------------------------------------------

    def search(
        self,
        queries: np.ndarray,
        k: int,
        nprobe: int,
        block_filter: set[int] | frozenset[int] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (scores, ids) per query over ``nprobe`` lists, restricted to ``block_filter``.

        Scores are inner products (ip, descending) or squared distances (l2, ascending).
        """
        searcher = self._searcher  # one snapshot for the whole search
        if searcher is None:
            self._check_open()
            raise FailedPrecondition(f"collection {self.spec.name} is not trained")
        scores, ids, reads = searcher.search(queries, k, nprobe, block_filter)
        self.reads.add(reads)
        return scores, ids

    def fetch_payloads(self, ids: Sequence[int] | np.ndarray) -> list[dict[str, Any] | None]:
        """Payloads of hit ids (None for -1 padding or ids without payload)."""
        self._check_open()
        return self.payloads.get([int(i) for i in np.asarray(ids).ravel()])
