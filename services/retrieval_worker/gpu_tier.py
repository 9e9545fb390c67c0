"""The hot tier: a block's live vectors in GPU memory, scanned exactly with one GEMM per block.

A :class:`HotBlock` holds every live row of a block as one torch tensor, rows sorted by local
IVF list (``offsets[j]:offsets[j+1]`` is list ``j``), plus the list of each row and the ids
(on the CPU: only the k winners per query are looked up). ``scan_block(queries,
probe_mask, k)`` scores the queries that probe any list of the block against all its rows in
one matrix product, masks the rows of lists a query does not probe, and keeps the top k on
the device. ``scan_blocks`` does that for every hot block a batch probes with one upload,
the per-query merge on the device and one download (only (n, k) scores and ids travel).

This is the only module that imports torch, and only when a hot source is built, so a
worker without torch never pays for it. Without CUDA there is no hot tier (two tiers,
reported as such): :func:`hot_source` returns None and ``Collection.place(b, Tier.HOT)``
raises FailedPrecondition. ``allow_cpu`` builds a "hot" tier on the CPU for tests only.

Precision: float32 collections are scanned in float32 with TF32 off, so hot results equal the
CPU scan up to float rounding; float16 collections are held and multiplied in float16
(half the memory and bandwidth; ranks may differ from the CPU's float32 scan at near-ties).
A hot codec (``INFERMESH_HOT_CODEC``) holds any collection's hot blocks as float16, or as SQ8
codes (uint8 on the device, ranges per block as in the warm tier): a quarter of float32's
memory, scored as ``q . base + (q * scale) . codes`` with the codes widened per scan (to
float16 on a GPU). The CPU test device always multiplies in float32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

# Only tiers.py at import time: the bench host (bench/gpu_tier.py) has torch and numpy but
# neither faiss nor grpc, which blocks.py and errors.py import.
from services.retrieval_worker.tiers import SQ8, Chunk, Codec, Tier, block_bytes

if TYPE_CHECKING:
    import faiss

    from services.retrieval_worker.blocks import SegmentFiles

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
        codec: Codec = Codec.NONE,
    ) -> None:
        torch = _torch()
        self.block_id = block_id
        self.metric = metric
        self.device = torch.device(device)
        self.codec = codec
        nlists = offsets.size - 1
        dim = vectors.shape[1] if vectors.ndim == 2 else 1
        cuda = self.device.type == "cuda"
        self.sq8: SQ8 | None = None
        decoded: np.ndarray
        if codec is Codec.SQ8:
            self.sq8 = SQ8.train(vectors)
            host = self.sq8.encode(vectors)
            decoded = self.sq8.decode(host)
        else:
            half = codec is Codec.FLOAT16 or vectors.dtype == np.float16
            host = np.ascontiguousarray(vectors, dtype=np.float16 if half else np.float32)
            decoded = host
        # float16 and SQ8 are multiplied in float16 on a GPU (half the bandwidth); the CPU
        # test device multiplies in float32 (CPU half GEMM is slow and imprecise)
        self._dtype = torch.float16 if cuda and host.dtype != np.float32 else torch.float32
        self.vectors = torch.from_numpy(np.ascontiguousarray(host)).to(self.device)
        if self.sq8 is not None:
            self._scale = torch.from_numpy(self.sq8.scale).to(self.device)
            self._base = torch.from_numpy(self.sq8.base).to(self.device)
        self.ids = np.ascontiguousarray(ids, dtype=np.int64)
        self.ids_dev = torch.from_numpy(self.ids).to(self.device)  # results map on the device
        self.offsets = np.asarray(offsets, dtype=np.int64)
        lists = np.repeat(np.arange(nlists, dtype=np.int64), np.diff(self.offsets))
        self.row_list = torch.from_numpy(lists).to(self.device)
        # l2 ranks by 2 q.x - |x|^2 (as the CPU scanner); the norms are computed once here
        self.sq_norms = None
        if metric == "l2":
            d32 = np.asarray(decoded, dtype=np.float32)
            self.sq_norms = torch.from_numpy(
                np.einsum("ij,ij->i", d32, d32).astype(np.float32)).to(self.device)
        self.count = int(self.ids.size)
        held = codec if codec is Codec.SQ8 else (
            Codec.FLOAT16 if host.dtype == np.float16 else Codec.NONE)
        self.nbytes = block_bytes(held, dim, 4, metric, self.count)

    def chunks(self, local_list: int) -> list[Chunk]:
        """List ``local_list`` copied back to the CPU (only for scanners without scan_block)."""
        a, b = int(self.offsets[local_list]), int(self.offsets[local_list + 1])
        if b <= a:
            return []
        rows = self.vectors[a:b].cpu().numpy()
        if self.sq8 is not None:
            norms = None if self.sq_norms is None else self.sq_norms[a:b].cpu().numpy()
            return [Chunk(rows, self.ids[a:b], None, self.sq8, norms)]
        return [Chunk(rows.astype(np.float32), self.ids[a:b], None)]

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
        rows = np.arange(queries.shape[0])
        return self.scan_blocks(queries, [(self, rows, probe_mask)], k)

    def scan_blocks(
        self,
        queries: np.ndarray,
        jobs: Sequence[tuple[HotBlock, np.ndarray, np.ndarray]],
        k: int,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of each of ``queries`` (n, dim) over several hot blocks of this device at once.

        Each job is (block, query rows that probe it, their (rows, lists) probe mask). One
        upload, one GEMM + mask + top-k per block, the merge on the device, one download:
        a host sync per block would cost more than the scan of a small block.
        """
        torch = _torch()
        n = queries.shape[0]
        out_s = np.full((n, k), -np.inf, dtype=np.float32)
        out_i = np.full((n, k), -1, dtype=np.int64)
        jobs = [j for j in jobs if j[0].count and j[1].size]
        if not jobs:
            return out_s, out_i
        dev = self.device
        with torch.inference_mode():
            q_dev = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)).to(dev)
            rows_dev = torch.from_numpy(np.concatenate([r for _, r, _ in jobs])).to(dev)
            masks_dev = torch.from_numpy(
                np.concatenate([np.ascontiguousarray(m, dtype=bool).ravel() for *_, m in jobs])
            ).to(dev)
            qs_out, s_out, i_out = [], [], []
            at_r = at_m = 0
            for block, _rows, mask in jobs:
                m, nl = mask.shape
                r = rows_dev[at_r : at_r + m]
                pm = masks_dev[at_m : at_m + m * nl].view(m, nl)
                at_r += m
                at_m += m * nl
                s, j = block._topk(q_dev.index_select(0, r), pm, k)
                qs_out.append(r[:, None].expand_as(j).reshape(-1))
                s_out.append(s.reshape(-1))
                i_out.append(block.ids_dev[j].reshape(-1))
            q_all, s_all, i_all = torch.cat(qs_out), torch.cat(s_out), torch.cat(i_out)
            # per-query top-k of the candidates: by score, then (stable) by query
            order = torch.argsort(s_all, descending=True, stable=True)
            order = order[torch.argsort(q_all[order], stable=True)]
            q_all, s_all, i_all = q_all[order], s_all[order], i_all[order]
            starts = torch.searchsorted(q_all, torch.arange(n, device=dev))
            rank = torch.arange(q_all.numel(), device=dev) - starts[q_all]
            keep = (rank < k) & torch.isfinite(s_all)
            q_np = q_all[keep].cpu().numpy()
            r_np = rank[keep].cpu().numpy()
            out_s[q_np, r_np] = s_all[keep].cpu().numpy()
            out_i[q_np, r_np] = i_all[keep].cpu().numpy()
        return out_s, out_i

    def assign(
        self, queries: np.ndarray, centroids: np.ndarray, nprobe: int, cache: dict[str, Any]
    ) -> np.ndarray:
        """The nprobe nearest lists of each query, computed on this block's device.

        Same ranking as the CPU coarse quantizer (an exact flat scan): inner product, or
        squared L2 via ``|c|^2 - 2 q.c``. On the GPU this takes a fraction of a millisecond
        where FAISS's CPU scan of every centroid was a quarter of a hot search's time, and it
        is the part of a search that does not shrink when blocks spread over more GPUs.
        ``cache`` belongs to the caller's snapshot and keeps the device copy of the centroids.
        """
        torch = _torch()
        with torch.inference_mode():
            if "centroids" not in cache:
                c_dev = torch.from_numpy(np.ascontiguousarray(centroids, np.float32)).to(
                    self.device
                )
                cache["centroids"], cache["norms"] = c_dev, (c_dev * c_dev).sum(1)
            c_dev, c_norms = cache["centroids"], cache["norms"]
            q_dev = torch.from_numpy(np.ascontiguousarray(queries, np.float32)).to(self.device)
            scores = q_dev @ c_dev.T
            if self.sq_norms is not None:  # l2: nearest = largest 2 q.c - |c|^2
                scores.mul_(2.0).sub_(c_norms)
            _, idx = torch.topk(scores, min(nprobe, c_dev.shape[0]), dim=1)
            return idx.cpu().numpy().astype(np.int64)

    def _topk(self, qs: Any, probed: Any, k: int) -> tuple[Any, Any]:
        """Device top-min(k, rows) scores and row indices of ``qs`` over probed lists."""
        torch = _torch()
        kk = min(k, self.count)
        step = max(1, MAX_SCORES // self.count)
        parts_s, parts_j = [], []
        for lo in range(0, qs.shape[0], step):
            q = qs[lo : lo + step]
            if self.sq8 is not None:  # q . x = q . base + (q * scale) . codes
                codes = self.vectors.to(self._dtype)  # 0..255: exact in float16
                qs_ = q * self._scale
                # q * scale is ~1e-4: float16 would lose it to subnormals, so each row goes
                # to the GEMM scaled to a max of 1 and the product is scaled back
                norm = qs_.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)
                scores = ((qs_ / norm).to(self._dtype) @ codes.T).float() * norm
                scores.add_((q @ self._base)[:, None])
            else:
                mat = self.vectors if self.vectors.dtype == self._dtype else self.vectors.to(
                    self._dtype)
                scores = (q.to(self._dtype) @ mat.T).float()
            if self.sq_norms is not None:
                scores.mul_(2.0).sub_(self.sq_norms)
            # rows of lists this query does not probe drop out of its top-k
            mask = probed[lo : lo + step].index_select(1, self.row_list)
            scores.masked_fill_(~mask, -math.inf)
            s, j = torch.topk(scores, kk, dim=1)
            parts_s.append(s)
            parts_j.append(j)
        if len(parts_s) == 1:
            return parts_s[0], parts_j[0]
        return torch.cat(parts_s), torch.cat(parts_j)


class HotSource:
    """Hot tier: uploads a block's live rows to the device as one tensor."""

    tier = Tier.HOT

    def __init__(self, metric: str, device: str, codec: Codec = Codec.NONE) -> None:
        self.metric = metric
        self.device = device
        self.codec = codec

    def load(
        self,
        block_id: int,
        nlists: int,
        segments: Sequence[SegmentFiles],
        live: Sequence[np.ndarray | None],
    ) -> HotBlock:
        """Read the block's live rows and copy them to the device (swapped in by the caller)."""
        vectors, ids, offsets = read_live(nlists, segments, live)
        return HotBlock(block_id, vectors, ids, offsets, metric=self.metric, device=self.device,
                        codec=self.codec)


def hot_source(
    metric: str, *, allow_cpu: bool = False, device: str = "cuda", codec: Codec = Codec.NONE
) -> HotSource | None:
    """The hot tier of this machine: on CUDA; on the CPU only if ``allow_cpu`` (tests)."""
    if device.startswith("cuda") and cuda_available():
        return HotSource(metric, device, codec)
    if allow_cpu:
        try:
            _torch()
        except ImportError as exc:
            from services.retrieval_worker.errors import FailedPrecondition

            raise FailedPrecondition("a CPU hot tier was asked for but torch is missing") from exc
        return HotSource(metric, "cpu", codec)
    return None
