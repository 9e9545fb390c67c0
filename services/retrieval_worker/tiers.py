"""The tier names and the scan unit, without heavy imports (the GPU bench host has no faiss)."""

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

    vectors: np.ndarray  # (n, dim) storage dtype
    ids: np.ndarray  # (n,) int64
    live: np.ndarray | None  # (n,) bool, None = all live
