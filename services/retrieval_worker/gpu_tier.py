"""The hot tier: a block's live vectors in GPU memory, scanned exactly with one GEMM per block.

A :class:`HotBlock` holds every live row of a block as one torch tensor, rows sorted by local
IVF list (``offsets[j]:offsets[j+1]`` is list ``j``), plus the list of each row and the ids
(on the CPU: only the k winners per query are looked up). ``scan_block(queries,
probe_mask, k)`` scores the queries that probe any list of the block against all its rows in
one matrix product, masks the rows of lists a query does not probe, and keeps the top k on
the device; only (m, k) scores and ids travel back to the CPU merge.

This is the only module that imports torch, and only when a hot source is built, so a
worker without torch never pays for it. Without CUDA there is no hot tier (two tiers,
reported as such): :func:`hot_source` returns None and ``Collection.place(b, Tier.HOT)``
raises FailedPrecondition. ``allow_cpu`` builds a "hot" tier on the CPU for tests only.

Precision: float32 collections are scanned in float32 with TF32 off, so hot results equal the
CPU scan up to float rounding; float16 collections are held and multiplied in float16
(half the memory and bandwidth; ranks may differ from the CPU's float32 scan at near-ties).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from services.retrieval_worker.blocks import Chunk, SegmentFiles, Tier
from services.retrieval_worker.errors import FailedPrecondition

if TYPE_CHECKING:
    import faiss

#: Most score-matrix elements one scan materialises at once (queries are split above it).
MAX_SCORES = 1 << 26


def _torch() -> Any:
    """torch, imported on first use (a worker without torch never imports it)."""
    import torch

    return torch


def cuda_available() -> bool:
    """Whether torch is installed and sees a CUDA device."""
    try:
        torch = _torch()
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def free_device_bytes(device: str = "cuda") -> int:
    """Free memory of the GPU now (0 without CUDA)."""
    if not cuda_available():
        return 0
    free, _total = _torch().cuda.mem_get_info(device)
    return int(free)


def read_live(
    nlists: int, segments: Sequence[SegmentFiles], live: Sequence[np.ndarray | None]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A block's live rows sorted by local list: vectors, ids and ``nlists + 1`` offsets."""
    opened = []
    for seg in segments:
        vec = np.load(seg.path("vec"), mmap_mode="r", allow_pickle=False)
        ids = np.load(seg.path("ids"), mmap_mode="r", allow_pickle=False)
        off = np.load(seg.path("off"), allow_pickle=False)
        opened.append((vec, ids, off))
    vs: list[np.ndarray] = []
    idl: list[np.ndarray] = []
    counts = np.zeros(nlists, dtype=np.int64)
    for j in range(nlists):
        for (vec, ids, off), mask in zip(opened, live, strict=True):
            a, b = int(off[j]), int(off[j + 1])
            if b > a:
                v, i = np.asarray(vec[a:b]), np.asarray(ids[a:b])
                if mask is not None:
                    v, i = v[mask[a:b]], i[mask[a:b]]
                vs.append(v)
                idl.append(i)
                counts[j] += i.size
    offsets = np.zeros(nlists + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    dim = opened[0][0].shape[1] if opened else 1
    dtype = opened[0][0].dtype if opened else np.dtype(np.float32)
    vectors = np.concatenate(vs) if vs else np.empty((0, dim), dtype)
    ids_all = np.concatenate(idl).astype(np.int64) if idl else np.empty(0, np.int64)
    return vectors, ids_all, offsets


class HotBlock:
    """A block held on the device as one tensor; ``scan_block`` scores it there."""

    tier = Tier.HOT

    def __init__(
        self,
        block_id: int,
        vectors: np.ndarray,
        ids: np.ndarray,
        offsets: np.ndarray,
        *,
        metric: str,
        device: str,
    ) -> None:
        torch = _torch()
        self.block_id = block_id
        self.metric = metric
        self.device = torch.device(device)
        nlists = offsets.size - 1
        # float16 storage stays float16 on a GPU (half the memory); the CPU test device
        # multiplies in float32 (CPU half GEMM is slow and imprecise)
        dtype = (torch.float16 if vectors.dtype == np.float16 and self.device.type == "cuda"
                 else torch.float32)
        self._dtype = dtype
        host = np.ascontiguousarray(vectors, dtype=np.float32 if dtype == torch.float32
                                    else np.float16)
        self.vectors = torch.from_numpy(host).to(self.device)
        self.ids = np.ascontiguousarray(ids, dtype=np.int64)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        lists = np.repeat(np.arange(nlists, dtype=np.int64), np.diff(self.offsets))
        self.row_list = torch.from_numpy(lists).to(self.device)
        # l2 ranks by 2 q.x - |x|^2 (as the CPU scanner); the norms are computed once here
        self.sq_norms = (
            (self.vectors.float() ** 2).sum(dim=1) if metric == "l2" else None
        )
        self.count = int(self.ids.size)
        self.nbytes = self.count * (host.shape[1] * host.itemsize + 8) if host.ndim == 2 else 0

    def chunks(self, local_list: int) -> list[Chunk]:
        """List ``local_list`` copied back to the CPU (only for scanners without scan_block)."""
        a, b = int(self.offsets[local_list]), int(self.offsets[local_list + 1])
        if b <= a:
            return []
        return [Chunk(self.vectors[a:b].float().cpu().numpy(), self.ids[a:b], None)]

    @property
    def invlists(self) -> faiss.InvertedLists | None:
        """FAISS (CPU) cannot read device memory."""
        return None

    def scan_block(
        self, queries: np.ndarray, probe_mask: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k of each query over the block's lists it probes (higher is better).

        ``queries`` (m, dim) float32; ``probe_mask`` (m, lists in block) bool. Returns (m, k)
        float32 scores (``q.x`` for ip, ``2 q.x - |x|^2`` for l2) and int64 ids; a missing
        result is (-inf, -1).
        """
        torch = _torch()
        m = queries.shape[0]
        out_s = np.full((m, k), -np.inf, dtype=np.float32)
        out_i = np.full((m, k), -1, dtype=np.int64)
        rows = self.count
        if rows == 0 or m == 0:
            return out_s, out_i
        kk = min(k, rows)
        step = max(1, MAX_SCORES // rows)
        with torch.inference_mode():
            mask_all = torch.from_numpy(np.ascontiguousarray(probe_mask)).to(self.device)
            q_all = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)).to(
                self.device
            )
            for lo in range(0, m, step):
                hi = min(m, lo + step)
                scores = (q_all[lo:hi].to(self._dtype) @ self.vectors.T).float()
                if self.sq_norms is not None:
                    scores.mul_(2.0).sub_(self.sq_norms)
                # rows of lists this query does not probe drop out of its top-k
                probed = mask_all[lo:hi].index_select(1, self.row_list)
                scores.masked_fill_(~probed, -math.inf)
                top_s, top_j = torch.topk(scores, kk, dim=1)
                s = top_s.cpu().numpy()
                j = top_j.cpu().numpy()
                ids = self.ids[j]
                ids[~np.isfinite(s)] = -1
                out_s[lo:hi, :kk] = s
                out_i[lo:hi, :kk] = ids
        return out_s, out_i


class HotSource:
    """Hot tier: uploads a block's live rows to the device as one tensor."""

    tier = Tier.HOT

    def __init__(self, metric: str, device: str) -> None:
        self.metric = metric
        self.device = device

    def load(
        self,
        block_id: int,
        nlists: int,
        segments: Sequence[SegmentFiles],
        live: Sequence[np.ndarray | None],
    ) -> HotBlock:
        """Read the block's live rows and copy them to the device (swapped in by the caller)."""
        vectors, ids, offsets = read_live(nlists, segments, live)
        return HotBlock(block_id, vectors, ids, offsets, metric=self.metric, device=self.device)


def hot_source(metric: str, *, allow_cpu: bool = False, device: str = "cuda") -> HotSource | None:
    """The hot tier of this machine: on CUDA; on the CPU only if ``allow_cpu`` (tests)."""
    if device.startswith("cuda") and cuda_available():
        return HotSource(metric, device)
    if allow_cpu:
        try:
            _torch()
        except ImportError as exc:
            raise FailedPrecondition("a CPU hot tier was asked for but torch is missing") from exc
        return HotSource(metric, "cpu")
    return None
