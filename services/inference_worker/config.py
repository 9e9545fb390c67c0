"""Inference worker configuration (INFERMESH_* environment)."""

from __future__ import annotations

from shared.config import CommonConfig


class WorkerConfig(CommonConfig, frozen=True, kw_only=True):
    """Settings of one inference worker."""

    grpc_port: int = 50052
    model_repository: str = "models"
    """Folder of models/<name>/config.json."""
    models: str = ""
    """Comma-separated names to load; empty = every model in the repository."""
    threads: int = 0
    """Intra-op threads per run of a model; 0 = the cores divided by the model's instances."""
    model_cache: str = ""
    """Where built model files live; empty = <data_dir>/models."""
