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
  IVF index whose inverted lists are the warm blocks themselves (no copy). Lists of blocks
  FAISS cannot read (cold, memory-mapped) are scanned by the grouped scanner and merged.

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
from shared.topk import merge_topk

__all__ = ["DEFAULT_CROSSOVER", "Searcher", "check_queries", "merge_topk"]

Metric = Literal["ip", "l2"]

# Mean queries per probed list below which the FAISS path wins; measured with
# bench/retrieval_engine.py (see the report in that module's docstring).
DEFAULT_CROSSOVER = 6.0


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
        fp16: bool,
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
        nblocks = -(-nlist // lists_per_block)
        # per list: is its block present, and can FAISS read it (RAM-resident)
        self._present = np.zeros(nlist, dtype=bool)
        self._faiss_readable = np.zeros(nlist, dtype=bool)
        self._hot = np.zeros(nlist, dtype=bool)  # lists whose block scans itself (GPU)
        self._centroid_array: np.ndarray | None = None
        self._device_cache: dict[str, Any] = {}  # device copy of the centroids (hot tier)
        for b, view in self.blocks.items():
            lo, hi = b * lists_per_block, min((b + 1) * lists_per_block, nlist)
            self._present[lo:hi] = True
            self._faiss_readable[lo:hi] = view.invlists is not None
            self._hot[lo:hi] = isinstance(view, ScansItself)
        self._index: faiss.IndexIVF | None = None
        if self._faiss_readable.any():
            code_size = dim * (2 if fp16 else 4)
            self._keep: list[faiss.InvertedLists] = []
            vec = faiss.InvertedListsPtrVector()  # type: ignore[attr-defined]  # not in faiss stubs
            for b in range(nblocks):
                nl = min((b + 1) * lists_per_block, nlist) - b * lists_per_block
                found = self.blocks.get(b)
                il = found.invlists if found is not None else None
                if il is None:
                    il = faiss.ArrayInvertedLists(nl, code_size)  # empty stand-in
                self._keep.append(il)
                vec.push_back(il)
            self._stack = faiss.VStackInvertedLists(  # type: ignore[attr-defined]  # not in stubs
                vec.size(), vec.data()
            )
            fm = faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2
            index: faiss.IndexIVF
            if fp16:
                index = faiss.IndexIVFScalarQuantizer(
                    quantizer, dim, nlist, faiss.ScalarQuantizer.QT_fp16, fm, False
                )
            else:
                index = faiss.IndexIVFFlat(quantizer, dim, nlist, fm)
            index.replace_invlists(self._stack, False)
            # search_preassigned (unlike search) runs single-threaded in the default mode 0;
            # mode 3 spreads its queries over the OpenMP threads
            index.parallel_mode = 3
            index.is_trained = True
            index.ntotal = int(sum(v.count for v in self.blocks.values()))
            self._index = index

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
            allowed = allowed.copy()
            mask = np.zeros(self.nlist, dtype=bool)
            for b in block_filter:
                lo = b * self.lists_per_block
                mask[lo : lo + self.lists_per_block] = True
            allowed &= mask
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
            if use_faiss and self._index is not None:
                s, i = self._search_faiss(q, k, int(nprobe), assign, reads)
            else:
                s, i = self._search_grouped(q, k, assign, reads)
        if hot is not None:
            s, i = _merge_best(s, i, *hot, k)
        return (*self._external(q, s, i), reads)

    def _device_assigner(self) -> Any:
        """A hot block whose device can rank the centroids (when a GPU holds hot blocks)."""
        if not self._hot.any():
            return None
        for view in self.blocks.values():
            if isinstance(view, ScansItself) and hasattr(view, "assign"):
                return view
        return None

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
        first = jobs[0][0]
        assert isinstance(first, ScansItself)
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
        assert self._index is not None
        n = q.shape[0]
        readable = (assign >= 0) & self._faiss_readable[np.maximum(assign, 0)]
        fa = np.ascontiguousarray(np.where(readable, assign, -1), dtype=np.int64)
        dist = np.empty((n, k), dtype=np.float32)
        labels = np.empty((n, k), dtype=np.int64)
        coarse = np.zeros(fa.shape, dtype=np.float32)
        params = faiss.SearchParametersIVF()
        params.nprobe = nprobe
        # the _c entry point takes per-call params, so concurrent searches with different
        # nprobe never race on index.nprobe (the Python wrapper rejects params)
        self._index.search_preassigned_c(  # type: ignore[attr-defined]  # not in stubs
            n, faiss.swig_ptr(q), k, faiss.swig_ptr(fa), faiss.swig_ptr(coarse),
            faiss.swig_ptr(dist), faiss.swig_ptr(labels), False, params,
        )
        blocks, counts = np.unique(fa[fa >= 0] // self.lists_per_block, return_counts=True)
        for b, c in zip(blocks.tolist(), counts.tolist(), strict=True):
            reads[(b, Tier.WARM)] = reads.get((b, Tier.WARM), 0) + c
        if self.metric == "l2":
            sims = np.einsum("ij,ij->i", q, q)[:, None] - dist
        else:
            sims = dist
        sims = np.where(labels >= 0, sims, -np.inf).astype(np.float32)
        other = (assign >= 0) & ~readable
        if not other.any():
            return sims, labels
        # lists FAISS cannot read: scan them here, above FAISS's k-th best as threshold
        cands = _Candidates()
        ok = labels >= 0
        rows = np.broadcast_to(np.arange(n)[:, None], labels.shape)
        cands.add(rows[ok], sims[ok], labels[ok])
        thresh = sims[:, -1].copy()
        qq, cc = np.nonzero(other)
        self._scan_pairs(q, qq, assign[qq, cc], thresh, cands, reads)
        return cands.topk(n, k)
