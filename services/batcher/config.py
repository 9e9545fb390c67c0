"""Batcher configuration (INFERMESH_* environment)."""

from __future__ import annotations

from shared.config import CommonConfig


class BatcherConfig(CommonConfig, frozen=True, kw_only=True):
    """Settings of one batcher replica."""

    grpc_port: int = 50051
    inflight_per_worker: int = 2
    """Batches in flight per worker and target: 2 overlaps transfer with execution."""
    default_capacity: int = 1024
    """Queue bound for targets whose spec names none."""
    default_timeout_ms: int = 30_000
    """Deadline for requests that carry none."""
