"""The IVF search engine: coarse assignment, then one of two scan paths, and top-k merging.

Both paths probe the same lists (the FAISS flat quantizer picks them) and score every live
vector in them exactly, so they return the same results as a FAISS ``IndexIVFFlat`` with the
same centroids and ``nprobe`` (up to ties and float rounding):

- **grouped** (large batches): the (query, list) pairs of the batch are grouped by list and
  each probed list is scanned once with one BLAS matrix product for all queries probing it.
  Lists are dealt over ``threads`` Python threads (numpy releases the GIL in the product);
  numpy's BLAS should run single-threaded in the worker process (``OPENBLAS_NUM_THREADS=1``
  or ``threadpoolctl.threadpool_limits(1, "blas")`` in ``main()``): its spinning threads
  fight FAISS's OpenMP threads and any neighbour process for the cores (measured: 2-30x
  slower on 2 cores), and the small per-list products gain nothing from them.
  Each query first scans its nearest list; the k-th best score there seeds its threshold, so
  later lists only emit candidates above it and the per-query merge stays small.
- **faiss** (small batches, where each list serves few queries and a matrix product per list
  would be a matrix-vector product plus Python overhead): FAISS ``search_preassigned`` on an
  IVF index whose inverted lists are the warm blocks themselves (no copy); warm SQ8 blocks
  through a second one (faiss_lists.py: one query row per pair, scaled by the block's ranges;
  inner product only). Lists of blocks FAISS cannot read (cold, memory-mapped) are
  scanned by the grouped scanner and merged.

Warm blocks may be held as float16 or SQ8 codes (blocks.py, the worker's
``INFERMESH_WARM_CODEC``): float16 is scored exactly as stored (FAISS ``QT_fp16``, or numpy
after an upcast), SQ8 as ``q . base + (q * scale) . codes`` without decoding (tiers.SQ8).
Their scores are those of the compressed vectors: ranks may differ from float32 where two
candidates are closer than the compression error.

Hot blocks (GPU, services/retrieval_worker/gpu_tier.py) are scanned by themselves in both
paths: the (query, list) pairs whose block scans itself go to the device in one call (each
block scanned once for all queries probing it), and the top-k merges with the other path's.

Scores: inner product for ``ip`` (higher is better); squared L2 distance for ``l2`` (lower is
better), as FAISS reports them. A missing result (fewer than k candidates) has id -1 and score
-inf (ip) / +inf (l2). Internally everything is "higher is better": for l2 the scanner works
with ``2 q.x - |x|^2``, which orders like ``-|q - x|^2``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, Protocol, runtime_checkable

import faiss
import numpy as np

from services.retrieval_worker.blocks import BlockView, Tier
from services.retrieval_worker.errors import InvalidArgument
from services.retrieval_worker.faiss_lists import FloatLists, SQ8Lists
from shared.topk import merge_topk

__all__ = ["DEFAULT_CROSSOVER", "Searcher", "check_queries", "merge_topk"]

Metric = Literal["ip", "l2"]

# Mean queries per probed list below which the FAISS path wins; measured with
# bench/retrieval_engine.py (see the report in that module's docstring).
DEFAULT_CROSSOVER = 6.0
# The same where FAISS reads float16 blocks: the grouped scan upcasts every list it reads
# (numpy has no fast float16 product), so FAISS's QT_fp16 scan stays ahead much longer.
# 1 M x 384, 1 024 lists, 2 cores: FAISS 11x faster at 1.6 queries a list, 2.3x at 16,
# 1.2x at 32 (the default crossover made nprobe 8 x 1 024 queries 4.7x slower).
FLOAT16_CROSSOVER = 40.0
# And where FAISS reads SQ8 blocks (the grouped scan converts their codes list by list):
# FAISS 1.4-1.8x faster at 8 queries a list, grouped 1.9x faster at 32.
SQ8_CROSSOVER = 16.0


_pool_lock = threading.Lock()
_pools: dict[int, ThreadPoolExecutor] = {}


def _pool(threads: int) -> ThreadPoolExecutor:
    """Shared executor for list scans (one per thread count, created on first use)."""
    with _pool_lock:
        if threads not in _pools:
            _pools[threads] = ThreadPoolExecutor(threads, thread_name_prefix="ivf-scan")
        return _pools[threads]


def check_queries(queries: np.ndarray, dim: int) -> np.ndarray:
    """Validate a query batch and return it as C-contiguous float32 (n, dim)."""
    if not isinstance(queries, np.ndarray):
        raise InvalidArgument(f"queries must be a numpy array, got {type(queries).__name__}")
    if queries.ndim != 2 or queries.shape[1] != dim:
        raise InvalidArgument(f"queries must have shape (n, {dim}), got {queries.shape}")
    if queries.dtype not in (np.float32, np.float16, np.float64):
        raise InvalidArgument(f"queries must be float32, got {queries.dtype}")
    if queries.shape[0] == 0:
        raise InvalidArgument("queries must hold at least one vector")
    q = np.ascontiguousarray(queries, dtype=np.float32)
    if not np.isfinite(q).all():
        raise InvalidArgument("queries contain NaN or infinity")
    return q


@runtime_checkable
class ScansItself(Protocol):
    """A block view that scores its own lists (the GPU tier), instead of handing out chunks."""

    def scan_blocks(
        self, queries: np.ndarray, jobs: Sequence[tuple[Any, np.ndarray, np.ndarray]], k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """(n, k) higher-is-better top-k over jobs (block, query rows, rows x lists mask)."""
        ...


def _merge_best(
    s1: np.ndarray, i1: np.ndarray, s2: np.ndarray, i2: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Best k per row of two (n, k) higher-is-better results over disjoint lists."""
    s = np.concatenate([s1, s2], axis=1)
    i = np.concatenate([i1, i2], axis=1)
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, axis=1), np.take_along_axis(i, order, axis=1)


class _Candidates:
    """Candidate (query, score, id) triples collected while scanning lists."""

    def __init__(self) -> None:
        self.q: list[np.ndarray] = []
        self.s: list[np.ndarray] = []
        self.i: list[np.ndarray] = []

    def add(self, q: np.ndarray, s: np.ndarray, i: np.ndarray) -> None:
        self.q.append(q)
        self.s.append(s)
        self.i.append(i)

    def extend(self, other: _Candidates) -> None:
        self.q += other.q
        self.s += other.s
        self.i += other.i

    def topk(self, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Best k per query, higher is better; missing = (-inf, -1)."""
        out_s = np.full((n, k), -np.inf, dtype=np.float32)
        out_i = np.full((n, k), -1, dtype=np.int64)
        if not self.q:
            return out_s, out_i
        q = np.concatenate(self.q)
        s = np.concatenate(self.s)
        i = np.concatenate(self.i)
        order = np.lexsort((-s, q))
        q, s, i = q[order], s[order], i[order]
        starts = np.searchsorted(q, np.arange(n))
        rank = np.arange(q.size) - starts[q]
        keep = rank < k
        out_s[q[keep], rank[keep]] = s[keep]
        out_i[q[keep], rank[keep]] = i[keep]
        return out_s, out_i


class Searcher:
    """Searches one immutable snapshot of a collection's blocks.

    Built by the collection each time its blocks change (flush, placement move); a search
    uses the searcher it started with, so a concurrent swap never changes what it reads.
    """

    def __init__(
        self,
        *,
        dim: int,
        metric: Metric,
        nlist: int,
        lists_per_block: int,
        quantizer: faiss.IndexFlat,
        blocks: Mapping[int, BlockView],
        crossover: float = DEFAULT_CROSSOVER,
        threads: int = 0,
    ) -> None:
        self.dim = dim
        self.threads = threads  # 0: follow faiss.omp_get_max_threads()
        self.metric: Metric = metric
        self.nlist = nlist
        self.lists_per_block = lists_per_block
        self.quantizer = quantizer
        self.blocks = dict(blocks)
        self.crossover = crossover
        self.nblocks = -(-nlist // lists_per_block)
        # A searcher is rebuilt on every tier move, so this runs for each move: per block only
        # attribute reads (a runtime-checkable Protocol isinstance per block was 2/3 of a
        # 50-100 ms move over 1024 blocks).
        self._float = FloatLists(self.blocks, dim=dim, metric=metric, nlist=nlist,
                                 lists_per_block=lists_per_block, quantizer=quantizer)
        if self._float.float16:
            self.crossover = max(crossover, FLOAT16_CROSSOVER)
        self._sq8: SQ8Lists | None = None
        if metric == "ip":
            self._sq8 = SQ8Lists(self.blocks, dim=dim, nlist=nlist,
                                 lists_per_block=lists_per_block, quantizer=quantizer)
            if self._sq8.stack is not None:
                self.crossover = max(self.crossover, SQ8_CROSSOVER)
        # per block: 1 present, 2 FAISS reads it as floats, 4 scans itself, 8 FAISS SQ8
        flags = np.zeros(self.nblocks, dtype=np.int8)
        for b, v in self.blocks.items():
            flags[b] = 1 | (4 if getattr(v, "scan_blocks", None) is not None else 0)
        flags[list(self._float.blocks)] |= 2
        if self._sq8 is not None:
            flags[list(self._sq8.blocks)] |= 8
        per_list = self._per_list(flags)
        self._present = (per_list & 1) > 0
        self._faiss_readable = (per_list & 2) > 0
        self._hot = (per_list & 4) > 0  # lists whose block scans itself (GPU)
        self._sq8_lists = (per_list & 8) > 0
        self._centroid_array: np.ndarray | None = None
        self._device_cache: dict[str, Any] = {}  # device copy of the centroids (hot tier)

    # -- public ------------------------------------------------------------------------

    def search(
        self,
        queries: np.ndarray,
        k: int,
        nprobe: int,
        block_filter: set[int] | frozenset[int] | None = None,
        path: Literal["auto", "grouped", "faiss"] = "auto",
    ) -> tuple[np.ndarray, np.ndarray, dict[tuple[int, Tier], int]]:
        """Top-k of each query over the probed lists of the blocks in ``block_filter``.

        Returns scores, ids and the reads per (block, tier) for the access counters.
        """
        q = check_queries(queries, self.dim)
        if not isinstance(k, int | np.integer) or k <= 0:
            raise InvalidArgument(f"k must be a positive integer, got {k!r}")
        if not isinstance(nprobe, int | np.integer) or not 1 <= nprobe <= self.nlist:
            raise InvalidArgument(f"nprobe must be in [1, nlist={self.nlist}], got {nprobe!r}")
        n = q.shape[0]
        device_assign = self._device_assigner()
        if device_assign is not None:
            assign = device_assign.assign(q, self._centroids(), int(nprobe), self._device_cache)
        else:
            _, assign = self.quantizer.search(q, int(nprobe))
        allowed = self._present
        if block_filter is not None:
            wanted = np.zeros(self.nblocks, dtype=bool)
            ids = np.fromiter(block_filter, dtype=np.int64, count=len(block_filter))
            wanted[ids[(ids >= 0) & (ids < self.nblocks)]] = True  # blocks beyond: none held
            allowed = allowed & self._per_list(wanted)
        assign = np.where((assign >= 0) & allowed[np.maximum(assign, 0)], assign, -1)
        reads: dict[tuple[int, Tier], int] = {}
        hot: tuple[np.ndarray, np.ndarray] | None = None
        if self._hot.any():
            is_hot = (assign >= 0) & self._hot[np.maximum(assign, 0)]
            if is_hot.any():
                hot = self._search_hot(q, k, assign, is_hot, reads)
                assign = np.where(is_hot, -1, assign)
        probed = assign[assign >= 0]
        if probed.size == 0:
            s = np.full((n, k), -np.inf, dtype=np.float32)
            i = np.full((n, k), -1, dtype=np.int64)
        else:
            per_list = probed.size / np.unique(probed).size
            use_faiss = path == "faiss" or (path == "auto" and per_list < self.crossover)
            if use_faiss and (self._faiss_readable.any() or self._sq8_lists.any()):
                s, i = self._search_faiss(q, k, int(nprobe), assign, reads)
            else:
                s, i = self._search_grouped(q, k, assign, reads)
        if hot is not None:
            s, i = _merge_best(s, i, *hot, k)
        return (*self._external(q, s, i), reads)

    def _per_list(self, per_block: np.ndarray) -> np.ndarray:
        """A value per block spread over the block's lists (block b holds lists b·lpb...)."""
        return np.repeat(per_block, self.lists_per_block)[: self.nlist]

    def _device_assigner(self) -> Any:
        """A hot block whose device can rank the centroids (when a GPU holds hot blocks)."""
        if not self._hot.any():
            return None
        if "assigner" not in self._device_cache:  # once per snapshot
            self._device_cache["assigner"] = next(
                (v for v in self.blocks.values()
                 if getattr(v, "scan_blocks", None) is not None and hasattr(v, "assign")),
                None,
            )
        return self._device_cache["assigner"]

    def _centroids(self) -> np.ndarray:
        """The coarse centroids as an array (read from the quantizer once per snapshot)."""
        if self._centroid_array is None:
            self._centroid_array = self.quantizer.reconstruct_n(0, self.quantizer.ntotal)
        return self._centroid_array

    def _search_hot(
        self,
        q: np.ndarray,
        k: int,
        assign: np.ndarray,
        is_hot: np.ndarray,
        reads: dict[tuple[int, Tier], int],
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k over the hot (query, list) pairs: every hot block probed, in one device call."""
        qq, cc = np.nonzero(is_hot)
        lists = assign[qq, cc]
        blocks = lists // self.lists_per_block
        jobs = []
        for b in np.unique(blocks).tolist():
            sel = blocks == b
            rows, inv = np.unique(qq[sel], return_inverse=True)
            nl = min((b + 1) * self.lists_per_block, self.nlist) - b * self.lists_per_block
            mask = np.zeros((rows.size, nl), dtype=bool)
            mask[inv, lists[sel] - b * self.lists_per_block] = True
            jobs.append((self.blocks[b], rows, mask))
            reads[(b, Tier.HOT)] = reads.get((b, Tier.HOT), 0) + int(sel.sum())
        first: ScansItself = jobs[0][0]  # type: ignore[assignment]  # _hot: it scans itself
        return first.scan_blocks(q, jobs, k)  # all hot blocks live on the one device

    # -- paths -------------------------------------------------------------------------

    def _external(
        self, q: np.ndarray, s: np.ndarray, i: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Internal higher-is-better scores to the metric's scores (l2: squared distance)."""
        if self.metric == "l2":
            qn = np.einsum("ij,ij->i", q, q)
            s = qn[:, None] - s
            s[i < 0] = np.inf
        else:
            s[i < 0] = -np.inf
        return s.astype(np.float32, copy=False), i

    def _scan(
        self, lst: int, qs: np.ndarray, reads: dict[tuple[int, Tier], int]
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Score list ``lst`` against queries ``qs`` (m, dim): (m, rows) scores and ids."""
        b = lst // self.lists_per_block
        view = self.blocks[b]
        key = (b, view.tier)
        reads[key] = reads.get(key, 0) + 1
        out = []
        for chunk in view.chunks(lst - b * self.lists_per_block):
            x = chunk.vectors
            if chunk.sq8 is not None:  # SQ8 codes: scored without decoding
                sims = chunk.sq8.scores(qs, x)
                if self.metric == "l2":
                    norms = chunk.sq_norms
                    if norms is None:
                        d = chunk.sq8.decode(x)
                        norms = np.einsum("ij,ij->i", d, d)
                    sims *= 2.0
                    sims -= norms[None, :]
                if chunk.live is not None:
                    sims[:, ~chunk.live] = -np.inf
                out.append((sims, np.asarray(chunk.ids)))
                continue
            if x.dtype != np.float32:
                x = x.astype(np.float32)  # float16 storage: upcast this run only
            sims = qs @ x.T
            if self.metric == "l2":
                sims *= 2.0
                sims -= np.einsum("ij,ij->i", x, x)[None, :]
            if chunk.live is not None:
                sims[:, ~chunk.live] = -np.inf
            out.append((sims, np.asarray(chunk.ids)))
        return out

    @staticmethod
    def _groups(qidx: np.ndarray, lists: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """(query, list) pairs grouped by list: [(list, query indices)]."""
        if qidx.size == 0:
            return []
        order = np.argsort(lists, kind="stable")
        qidx, lists = qidx[order], lists[order]
        bounds = np.flatnonzero(np.diff(lists)) + 1
        return [(int(g[0]), qs) for g, qs in
                zip(np.split(lists, bounds), np.split(qidx, bounds), strict=True)]

    def _run(
        self,
        groups: list[tuple[int, np.ndarray]],
        scan: Callable[[int, np.ndarray, _Candidates, dict[tuple[int, Tier], int]], None],
        cands: _Candidates,
        reads: dict[tuple[int, Tier], int],
    ) -> None:
        """Scan groups, split over the engine's threads (BLAS releases the GIL)."""
        threads = self.threads or faiss.omp_get_max_threads()
        if threads <= 1 or len(groups) < 2 * threads:
            for lst, qs in groups:
                scan(lst, qs, cands, reads)
            return
        # largest groups first, dealt round-robin, so the buckets take about the same time
        groups = sorted(groups, key=lambda g: -g[1].size)
        buckets = [groups[t::threads] for t in range(threads)]

        def work(bucket: list[tuple[int, np.ndarray]]
                 ) -> tuple[_Candidates, dict[tuple[int, Tier], int]]:
            c, r = _Candidates(), {}  # type: _Candidates, dict[tuple[int, Tier], int]
            for lst, qs in bucket:
                scan(lst, qs, c, r)
            return c, r

        futures = [_pool(threads).submit(work, b) for b in buckets[1:]]
        results = [work(buckets[0])] + [f.result() for f in futures]
        for c, r in results:
            cands.extend(c)
            for key, v in r.items():
                reads[key] = reads.get(key, 0) + v

    def _scan_pairs(
        self,
        q: np.ndarray,
        qidx: np.ndarray,
        lists: np.ndarray,
        thresh: np.ndarray,
        cands: _Candidates,
        reads: dict[tuple[int, Tier], int],
    ) -> None:
        """Scan (query, list) pairs grouped by list; keep scores >= each query's threshold."""

        def scan(lst: int, qs: np.ndarray, c: _Candidates, r: dict[tuple[int, Tier], int]
                 ) -> None:
            th = thresh[qs][:, None]
            for sims, ids in self._scan(lst, q[qs], r):
                rows, cols = np.nonzero(sims >= th)
                if rows.size:
                    c.add(qs[rows], sims[rows, cols], ids[cols])

        self._run(self._groups(qidx, lists), scan, cands, reads)

    def _search_grouped(
        self, q: np.ndarray, k: int, assign: np.ndarray, reads: dict[tuple[int, Tier], int]
    ) -> tuple[np.ndarray, np.ndarray]:
        n = q.shape[0]
        cands = _Candidates()
        thresh = np.full(n, -np.inf, dtype=np.float32)
        # seed: each query's nearest allowed list (assign is sorted nearest first)
        valid = assign >= 0
        has = valid.any(axis=1)
        first_col = np.argmax(valid, axis=1)
        seed_q = np.flatnonzero(has)

        def seed(lst: int, qs: np.ndarray, c: _Candidates, r: dict[tuple[int, Tier], int]
                 ) -> None:
            parts = self._scan(lst, q[qs], r)
            if not parts:
                return
            sims = np.concatenate([p[0] for p in parts], axis=1)
            ids = np.concatenate([p[1] for p in parts])
            if sims.shape[1] > k:
                top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
                ts = np.take_along_axis(sims, top, axis=1)
                thresh[qs] = ts.min(axis=1)  # groups hold disjoint queries: no race
            else:
                top = np.broadcast_to(np.arange(sims.shape[1]), sims.shape)
                ts = sims
            ok = np.isfinite(ts)
            rows = np.broadcast_to(qs[:, None], ts.shape)
            c.add(rows[ok], ts[ok], ids[top][ok])

        self._run(self._groups(seed_q, assign[seed_q, first_col[seed_q]]), seed, cands, reads)
        # the other probed lists, each scanned once for all its queries
        rest = valid.copy()
        rest[np.arange(n), first_col] = False
        qq, cc = np.nonzero(rest)
        self._scan_pairs(q, qq, assign[qq, cc], thresh, cands, reads)
        return cands.topk(n, k)

    def _search_faiss(
        self,
        q: np.ndarray,
        k: int,
        nprobe: int,
        assign: np.ndarray,
        reads: dict[tuple[int, Tier], int],
    ) -> tuple[np.ndarray, np.ndarray]:
        n = q.shape[0]
        readable = (assign >= 0) & self._faiss_readable[np.maximum(assign, 0)]
        sims = np.full((n, k), -np.inf, dtype=np.float32)
        labels = np.full((n, k), -1, dtype=np.int64)
        if self._float.stack is not None and readable.any():
            fa = np.where(readable, assign, -1)
            dist, labels = self._float.stack.search(q, k, fa)
            self._count(fa[fa >= 0], reads)
            if self.metric == "l2":
                dist = np.einsum("ij,ij->i", q, q)[:, None] - dist
            sims = np.where(labels >= 0, dist, -np.inf).astype(np.float32)
        other = (assign >= 0) & ~readable
        if not other.any():
            return sims, labels
        cands = _Candidates()
        ok = labels >= 0
        rows = np.broadcast_to(np.arange(n)[:, None], labels.shape)
        cands.add(rows[ok], sims[ok], labels[ok])
        sq8 = other & self._sq8_lists[np.maximum(assign, 0)]
        if self._sq8 is not None and sq8.any():
            qq, cc = np.nonzero(sq8)
            lists = assign[qq, cc].astype(np.int64)
            cands.add(*self._sq8.search(q, k, qq, lists))
            self._count(lists, reads)
            other &= ~sq8
            if not other.any():
                return cands.topk(n, k)
        # lists FAISS cannot read: scan them here, above FAISS's k-th best as threshold
        thresh = sims[:, -1].copy()
        qq, cc = np.nonzero(other)
        self._scan_pairs(q, qq, assign[qq, cc], thresh, cands, reads)
        return cands.topk(n, k)

    def _count(self, lists: np.ndarray, reads: dict[tuple[int, Tier], int]) -> None:
        """Add one warm read per (query, list) pair in ``lists``."""
        blocks, counts = np.unique(lists // self.lists_per_block, return_counts=True)
        for b, c in zip(blocks.tolist(), counts.tolist(), strict=True):
            reads[(b, Tier.WARM)] = reads.get((b, Tier.WARM), 0) + c
