"""Tier names, the scan unit and in-memory codecs, without heavy imports (the GPU bench host
has no faiss)."""

from __future__ import annotations

import enum
from typing import NamedTuple

import numpy as np


class Tier(enum.StrEnum):
    """Where a block's vectors live; the order is fastest first."""

    HOT = "hot"  # GPU memory (gpu_tier.py; only where torch sees CUDA)
    WARM = "warm"  # host RAM
    COLD = "cold"  # disk, memory-mapped on demand


class Chunk(NamedTuple):
    """A contiguous run of one IVF list: vectors, their ids, and which rows are live."""

    vectors: np.ndarray  # (n, dim) storage dtype, float16, or uint8 SQ8 codes
    ids: np.ndarray  # (n,) int64
    live: np.ndarray | None  # (n,) bool, None = all live
    sq8: SQ8 | None = None  # set when ``vectors`` are SQ8 codes: their quantizer
    sq_norms: np.ndarray | None = None  # (n,) float32 |decoded row|^2 (SQ8 codes, l2 only)


class Codec(enum.StrEnum):
    """How a fast tier holds a block's vectors; block files always keep the storage dtype."""

    NONE = "none"  # the storage dtype as it is on disk
    FLOAT16 = "float16"  # IEEE half: 2 bytes a component, FAISS QT_fp16 codes
    SQ8 = "sq8"  # 1 byte a component, ranges per block and dimension (FAISS QT_8bit layout)


class SQ8:
    """8-bit scalar quantizer of one block: per-dimension min and range of the block's rows.

    The codes are FAISS's ``ScalarQuantizer.QT_8bit`` (uniform, ``RS_minmax``): component
    ``c`` decodes to ``vmin + (c + 0.5) / 255 * vdiff``, so a decoded component is off by at
    most ``vdiff / 510``. Ranges come from the block's own rows (an IVF list is one cluster,
    so they are about half the collection's): measured on bench/compression.py's data, 99.1 %
    of float32's top-10 where one collection-wide range finds 98.0 %. Scoring never decodes:
    ``q . x = q . base + (q * scale) . codes``.
    """

    __slots__ = ("base", "scale", "vdiff", "vmin")

    def __init__(self, vmin: np.ndarray, vdiff: np.ndarray) -> None:
        self.vmin = np.ascontiguousarray(vmin, dtype=np.float32)
        self.vdiff = np.ascontiguousarray(vdiff, dtype=np.float32)
        self.scale = self.vdiff / np.float32(255.0)
        self.base = self.vmin + np.float32(0.5) * self.scale

    @classmethod
    def train(cls, x: np.ndarray) -> SQ8:
        """Ranges of the rows ``x`` (n, dim); a constant dimension gets a tiny range."""
        x = np.asarray(x, dtype=np.float32)
        if x.shape[0] == 0:
            return cls(np.zeros(x.shape[1], np.float32), np.ones(x.shape[1], np.float32))
        vmin = x.min(axis=0)
        vdiff = x.max(axis=0) - vmin
        # a dimension where every row agrees: any positive range encodes it exactly
        vdiff[vdiff <= 0] = np.float32(1e-30)
        return cls(vmin, vdiff)

    def encode(self, x: np.ndarray) -> np.ndarray:
        """Codes (n, dim) uint8 of rows ``x``, as FAISS computes them."""
        xi = (np.asarray(x, dtype=np.float32) - self.vmin) / self.vdiff
        np.clip(xi, 0.0, 1.0, out=xi)
        xi *= np.float32(255.0)
        return xi.astype(np.uint8)  # truncation, as FAISS's (uint8_t)(255 * x)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Rows (n, dim) float32 the codes stand for."""
        return self.base + codes.astype(np.float32) * self.scale

    def scores(self, queries: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """(m, n) inner products of float32 ``queries`` (m, dim) with the decoded rows."""
        return (queries * self.scale) @ codes.T.astype(np.float32) + (queries @ self.base)[:, None]

    def max_error(self, queries: np.ndarray) -> np.ndarray:
        """(m,) bound on |q . x - q . decoded(x)| for rows inside the ranges."""
        return np.abs(queries) @ (self.vdiff / np.float32(510.0))


def row_bytes(codec: Codec, dim: int, itemsize: int, metric: str) -> int:
    """Bytes one vector takes in memory under ``codec`` (code + 8-byte id [+ 4-byte norm])."""
    if codec is Codec.SQ8:
        # l2 scans need each decoded row's squared norm: kept beside the codes
        return dim + 8 + (4 if metric == "l2" else 0)
    size = 2 if codec is Codec.FLOAT16 else itemsize
    return dim * size + 8


def block_bytes(codec: Codec, dim: int, itemsize: int, metric: str, count: int) -> int:
    """Bytes a block of ``count`` live vectors takes in memory under ``codec``."""
    extra = 2 * dim * 4 if codec is Codec.SQ8 and count else 0  # the block's ranges
    return count * row_bytes(codec, dim, itemsize, metric) + extra
