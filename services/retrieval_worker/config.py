"""Retrieval worker configuration (INFERMESH_* environment)."""

from __future__ import annotations

from shared.config import CommonConfig


class RetrievalConfig(CommonConfig, frozen=True, kw_only=True):
    """Settings of one retrieval worker."""

    grpc_port: int = 50053
    collections_dir: str = ""
    """Where collections live; empty = <data_dir>/collections."""
