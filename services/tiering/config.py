"""Tiering service configuration (INFERMESH_* environment)."""

from __future__ import annotations

from shared.config import CommonConfig


class TieringConfig(CommonConfig, frozen=True, kw_only=True):
    """Settings of the tiering service."""

    grpc_port: int = 50054
