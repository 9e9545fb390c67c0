"""Batcher configuration (INFERMESH_* environment)."""

from __future__ import annotations

from shared.config import CommonConfig


class BatcherConfig(CommonConfig, frozen=True, kw_only=True):
    """Settings of one batcher replica."""

    grpc_port: int = 50051
    inflight_per_worker: int = 2
    """Batches in flight per worker and target: 2 overlaps transfer with execution."""
    search_max_batch_size: int = 64
    """Search requests per collection batch (each may carry many query vectors)."""
    search_max_delay_ms: float = 1.0
    """Longest a search request waits for its batch to fill while a batch is in flight."""
    default_capacity: int = 1024
    """Queue bound for targets whose spec names none."""
    default_timeout_ms: int = 30_000
    """Deadline for requests that carry none."""
