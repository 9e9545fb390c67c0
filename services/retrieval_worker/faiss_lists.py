"""The warm blocks FAISS scans in place: one IVF index per code format over all blocks' lists.

A searcher snapshot stacks the blocks' own FAISS inverted lists (no copy) under an IVF index
whose coarse quantizer is the collection's, and runs ``search_preassigned`` with the lists the
engine already chose. Blocks FAISS does not read get a shared empty stand-in.

- :class:`FloatLists`: float32 blocks (``IndexIVFFlat``) or float16 ones (``QT_fp16``); the
  codes of both are the raw little-endian vectors.
- :class:`SQ8Lists`: SQ8 blocks. FAISS has no per-list ranges, but ``q . decoded = q . vmin
  + (q * scale) . (codes + 0.5)``: with ``QT_8bit`` ranges fixed to [0, 255] (a code ``c``
  reads as ``c + 0.5``) and one query row per (query, list) pair, scaled by that list's
  block, one call scores every pair. (``QT_8bit_direct`` would read ``c`` itself, but FAISS
  1.15.1 scores it wrong where the dimension is a multiple of 16: tests/unit/
  test_tier_codecs.py.) Inner product only: l2 would need each row's norm inside FAISS's
  top-k (numpy scans those).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

import faiss
import numpy as np

from services.retrieval_worker.blocks import BlockView

_empty_lock = threading.Lock()
_empty: dict[tuple[int, int], faiss.InvertedLists] = {}


def _empty_lists(nlists: int, code_size: int) -> faiss.InvertedLists:
    """Shared empty FAISS lists: the stand-in of a block FAISS does not read (never written)."""
    with _empty_lock:
        key = (nlists, code_size)
        if key not in _empty:
            _empty[key] = faiss.ArrayInvertedLists(nlists, code_size)
        return _empty[key]


class _Stack:
    """An IVF index over per-block FAISS lists (stand-ins where a block has none)."""

    def __init__(
        self,
        lists: Mapping[int, faiss.InvertedLists],
        *,
        code_size: int,
        nlist: int,
        lists_per_block: int,
        ntotal: int,
        make: Callable[[], faiss.IndexIVF],
    ) -> None:
        nblocks = -(-nlist // lists_per_block)
        self._keep: list[faiss.InvertedLists] = []  # the stack holds raw pointers to these
        vec = faiss.InvertedListsPtrVector()  # type: ignore[attr-defined]  # not in faiss stubs
        for b in range(nblocks):
            il = lists.get(b)
            if il is None:
                nl = min((b + 1) * lists_per_block, nlist) - b * lists_per_block
                il = _empty_lists(nl, code_size)
            self._keep.append(il)
            vec.push_back(il)
        self._stack = faiss.VStackInvertedLists(  # type: ignore[attr-defined]  # not in stubs
            vec.size(), vec.data()
        )
        index = make()
        index.replace_invlists(self._stack, False)
        # search_preassigned (unlike search) runs single-threaded in the default mode 0;
        # mode 3 spreads its queries over the OpenMP threads
        index.parallel_mode = 3
        index.is_trained = True
        index.ntotal = ntotal
        self.index = index

    def search(
        self, q: np.ndarray, k: int, assign: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """(n, k) FAISS distances and ids of each row of ``q`` over its lists in ``assign``."""
        n = q.shape[0]
        # Rows in order of their nearest list: FAISS scans its rows in order (in runs over
        # its threads), so rows probing the same list follow each other and the later ones
        # read it from cache, not memory: the grouped scan's idea at the cost of an argsort.
        # 1 M x 384, 1 024 lists, 2 cores, alternating: 1 024 rows 1.18-1.30x faster at
        # nprobe 1 (float16 / float32), 1.06-1.17x at nprobe 2-4; 256 rows 1.05x; 64 even.
        order = np.argsort(assign[:, 0], kind="stable") if n > 1 else None
        if order is not None:
            q, assign = q[order], assign[order]
        fa = np.ascontiguousarray(assign, dtype=np.int64)
        dist = np.empty((n, k), dtype=np.float32)
        labels = np.empty((n, k), dtype=np.int64)
        coarse = np.zeros(fa.shape, dtype=np.float32)
        params = faiss.SearchParametersIVF()
        params.nprobe = fa.shape[1]
        # the _c entry point takes per-call params, so concurrent searches with different
        # nprobe never race on index.nprobe (the Python wrapper rejects params)
        self.index.search_preassigned_c(  # type: ignore[attr-defined]  # not in stubs
            n, faiss.swig_ptr(np.ascontiguousarray(q, dtype=np.float32)), k,
            faiss.swig_ptr(fa), faiss.swig_ptr(coarse), faiss.swig_ptr(dist),
            faiss.swig_ptr(labels), False, params,
        )
        if order is not None:
            back = np.empty_like(order)
            back[order] = np.arange(n)
            dist, labels = dist[back], labels[back]
        return dist, labels


class FloatLists:
    """Float32 or float16 warm blocks under one FAISS IVF index (None if there are none)."""

    def __init__(
        self,
        blocks: Mapping[int, BlockView],
        *,
        dim: int,
        metric: str,
        nlist: int,
        lists_per_block: int,
        quantizer: faiss.IndexFlat,
    ) -> None:
        lists: dict[int, faiss.InvertedLists] = {}
        code_size = 0
        for b, v in blocks.items():
            il = v.invlists
            if il is None:
                continue
            size = int(il.code_size)
            if size not in (4 * dim, 2 * dim):
                raise ValueError(f"no FAISS index reads codes of {size} bytes (dim {dim})")
            code_size = code_size or size
            if size == code_size:  # one format per index; another is scanned by numpy
                lists[b] = il
        self.blocks = frozenset(lists)
        """Blocks this index reads."""
        self.float16 = code_size == 2 * dim
        """Whether the blocks it reads are float16 (else float32, or none)."""
        self.stack: _Stack | None = None
        if not lists:
            return
        fm = faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2

        def make() -> faiss.IndexIVF:
            if self.float16:
                return faiss.IndexIVFScalarQuantizer(
                    quantizer, dim, nlist, faiss.ScalarQuantizer.QT_fp16, fm, False
                )
            return faiss.IndexIVFFlat(quantizer, dim, nlist, fm)

        self.stack = _Stack(lists, code_size=code_size, nlist=nlist,
                            lists_per_block=lists_per_block,
                            ntotal=int(sum(blocks[b].count for b in lists)), make=make)


class SQ8Lists:
    """Warm SQ8 blocks under one FAISS ``QT_8bit`` index of fixed ranges (inner product only)."""

    def __init__(
        self,
        blocks: Mapping[int, BlockView],
        *,
        dim: int,
        nlist: int,
        lists_per_block: int,
        quantizer: faiss.IndexFlat,
    ) -> None:
        views: dict[int, Any] = {b: v for b, v in blocks.items()
                                 if getattr(v, "sq8_invlists", None) is not None}
        self.blocks = frozenset(views)
        """Blocks this index reads."""
        self.lists_per_block = lists_per_block
        self.stack: _Stack | None = None
        if not views:
            return
        nblocks = -(-nlist // lists_per_block)
        self.scale = np.zeros((nblocks, dim), dtype=np.float32)
        self.vmin = np.zeros((nblocks, dim), dtype=np.float32)
        for b, v in views.items():
            self.scale[b] = v.sq8.scale
            self.vmin[b] = v.sq8.vmin

        def make() -> faiss.IndexIVF:
            index = faiss.IndexIVFScalarQuantizer(
                quantizer, dim, nlist, faiss.ScalarQuantizer.QT_8bit,
                faiss.METRIC_INNER_PRODUCT, False,
            )
            # ranges [0, 255] in every dimension: code c decodes to c + 0.5
            faiss.copy_array_to_vector(
                np.concatenate([np.zeros(dim, np.float32), np.full(dim, 255.0, np.float32)]),
                index.sq.trained,
            )
            return index

        self.stack = _Stack(
            {b: v.sq8_invlists for b, v in views.items()}, code_size=dim, nlist=nlist,
            lists_per_block=lists_per_block, ntotal=int(sum(v.count for v in views.values())),
            make=make,
        )

    def search(
        self, q: np.ndarray, k: int, qq: np.ndarray, lists: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Top-k of query ``qq[j]`` in list ``lists[j]`` for every pair j: (rows, scores, ids).

        ``scores`` are inner products with the decoded rows, flattened with their query rows.
        """
        assert self.stack is not None
        blocks = lists // self.lists_per_block
        scaled = q[qq] * self.scale[blocks]
        offset = np.einsum("ij,ij->i", q[qq], self.vmin[blocks]).astype(np.float32)
        dist, labels = self.stack.search(scaled, k, lists[:, None])
        ok = labels >= 0
        rows = np.broadcast_to(qq[:, None], labels.shape)
        return rows[ok], (dist + offset[:, None])[ok], labels[ok]
