"""Router configuration (INFERMESH_* environment)."""

from __future__ import annotations

from shared.config import CommonConfig


class RouterConfig(CommonConfig, frozen=True, kw_only=True):
    """Settings of one router process."""

    grpc_port: int = 8001
    default_timeout_ms: int = 30_000
    """End-to-end deadline for requests that set none."""
    max_tensor_elements: int = 1 << 24
    """Largest tensor (elements) a request may carry."""
    pipelines: str = "search=minilm-l6"
    """Search pipelines, ``name=embedding model`` comma separated: text -> embed -> retrieve."""
    embed_model: str = "minilm-l6"
    """Model that embeds texts sent to Collections.Upsert without vectors."""
    embed_chunk: int = 32
    """Texts per embedding request when ingesting (the batcher batches these chunks)."""
    max_k: int = 1024
    """Largest k a search may ask for."""
    search_coalesce_inflight: int = 2
    """Submits in flight per (collection, k, nprobe) before concurrent searches share the next
    one (services/router/coalesce.py); 0 = every search is its own Submit."""
