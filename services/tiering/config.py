"""Tiering service configuration (INFERMESH_* environment)."""

from __future__ import annotations

from shared.config import CommonConfig


class TieringConfig(CommonConfig, frozen=True, kw_only=True):
    """Settings of the tiering service."""

    grpc_port: int = 50054
    tiering_period_s: float = 2.0
    """How often placement is recomputed."""
    half_life_s: float = 30.0
    """Half-life of the decayed read frequencies."""
    hysteresis: float = 1.25
    """A challenger must read this many times more per byte to displace an incumbent."""
    max_moves_per_round: int = 64
    """Bound on moves published per round (limits copy traffic)."""
    worker_silence_s: float = 30.0
    """Forget a worker that has not reported for this long."""
