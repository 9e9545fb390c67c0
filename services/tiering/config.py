"""Tiering service configuration (INFERMESH_* environment)."""

from __future__ import annotations

from shared.config import CommonConfig


class TieringConfig(CommonConfig, frozen=True, kw_only=True):
    """Settings of the tiering service."""

    grpc_port: int = 50054
    tiering_period_s: float = 2.0
    """How often placement is recomputed."""
    half_life_s: float = 120.0
    """Half-life of the slow read-rate estimate, which ranks blocks (long: the reads at a
    budget's edge are rare, and a rank rests on their count)."""
    fast_half_life_s: float = 10.0
    """Half-life of the fast estimate, which detects a change in a block's popularity."""
    change_z: float = 4.0
    """Standard deviations between the fast count and the slow rate's forecast that mean
    "changed" (the slow estimate then restarts from the fast one)."""
    gap_reads: float = 7.0
    """A block unread for as long as this many reads were due has changed too."""
    hysteresis: float = 1.1
    """A challenger must read this many times more per byte (plus the incumbent's noise,
    one standard error, plus ``margin_reads``) to displace an incumbent."""
    margin_reads: float = 1.0
    """Reads added to an incumbent's count (over its exposure) when challenged."""
    max_moves_per_round: int = 64
    """Bound on moves published per round (limits copy traffic)."""
    worker_silence_s: float = 30.0
    """Forget a worker that has not reported for this long."""
