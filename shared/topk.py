"""Merging per-shard top-k results: the gather side of a scatter/gather search.

Shared by the retrieval engine (which merges its own partial scans) and the batcher (which
merges the answers of the retrieval workers that each scanned a disjoint set of blocks).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from shared.errors import InvalidArgument

Metric = Literal["ip", "l2"]


def worst_score(metric: Metric) -> float:
    """The score of a missing result: -inf for inner product, +inf for squared L2."""
    return float("-inf") if metric == "ip" else float("inf")


def merge_topk(
    results: Sequence[tuple[np.ndarray, np.ndarray]], k: int, metric: Metric = "ip"
) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard ``(scores, ids)`` results of the same queries into the global top-k.

    Pure function: each shard searched a disjoint set of blocks, so an id appears in at most
    one input. Inner product sorts descending, squared L2 ascending; padding (id -1) sorts
    last and comes out with the metric's worst score.
    """
    if k <= 0:
        raise InvalidArgument(f"k must be positive, got {k}")
    if not results:
        raise InvalidArgument("merge_topk needs at least one result")
    n = results[0][0].shape[0]
    for s, i in results:
        if s.shape != i.shape or s.ndim != 2 or s.shape[0] != n:
            raise InvalidArgument("all results must be (n, k_i) score/id pairs of one batch")
    scores = np.concatenate([np.asarray(s, dtype=np.float32) for s, _ in results], axis=1)
    ids = np.concatenate([np.asarray(i, dtype=np.int64) for _, i in results], axis=1)
    key = -scores if metric == "ip" else scores.copy()
    key[ids < 0] = np.inf
    order = np.argsort(key, axis=1, kind="stable")[:, :k]
    out_s = np.take_along_axis(scores, order, axis=1)
    out_i = np.take_along_axis(ids, order, axis=1)
    if out_s.shape[1] < k:
        pad = k - out_s.shape[1]
        out_s = np.pad(out_s, ((0, 0), (0, pad)), constant_values=worst_score(metric))
        out_i = np.pad(out_i, ((0, 0), (0, pad)), constant_values=-1)
    out_s[out_i < 0] = worst_score(metric)
    return out_s, out_i
