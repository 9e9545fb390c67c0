"""Retrieval worker configuration (INFERMESH_* environment)."""

from __future__ import annotations

from typing import Literal

from shared.config import CommonConfig

#: Values of ``warm_codec`` / ``hot_codec`` (services.retrieval_worker.tiers.Codec).
CodecName = Literal["none", "float16", "sq8"]


class RetrievalConfig(CommonConfig, frozen=True, kw_only=True):
    """Settings of one retrieval worker."""

    grpc_port: int = 50053
    collections_dir: str = ""
    """Where collections live; empty = <data_dir>/collections."""
    default_nprobe: int = 32
    """Lists probed when a search sets nprobe 0 (capped at the collection's nlist)."""
    max_k: int = 1024
    """Largest k a search may ask for."""
    max_queries: int = 65_536
    """Most query vectors in one Search."""
    ingest_fetch: int = 64
    """Stream messages fetched per pull."""
    flush_rows: int = 100_000
    """Flush once this many ingested rows are pending (besides on idle and on the interval)."""
    flush_interval_s: float = 1.0
    """Longest time an applied message waits for its flush (how stale searches may be)."""
    blas_threads: int = 1
    """numpy's OpenBLAS threads (the engine spreads list scans over its own threads); 0 = as is."""
    tiering: bool = True
    """Report block reads to the tiering service and apply its moves."""
    access_period_s: float = 2.0
    """How often block reads are reported (``infermesh.tiering.access.<instance>``)."""
    warm_budget_bytes: int = -1
    """RAM for warm blocks; -1 = ``warm_ram_share`` of physical RAM."""
    warm_ram_share: float = 0.25
    """Share of physical RAM given to warm blocks when ``warm_budget_bytes`` is -1."""
    hot_budget_bytes: int = -1
    """GPU memory for hot blocks; -1 = ``hot_gpu_share`` of free GPU memory at start.
    Always 0 without torch + CUDA: there is no hot tier then, and that is reported."""
    hot_gpu_share: float = 0.5
    """Share of free GPU memory given to hot blocks when ``hot_budget_bytes`` is -1."""
    hot_on_cpu: bool = False
    """Tests only: a "hot" tier held by torch on the CPU, where there is no GPU."""
    warm_codec: CodecName = "none"
    """How warm blocks are held in RAM: ``none`` (the collection's storage dtype), ``float16``
    (half of float32) or ``sq8`` (8-bit codes with per-block ranges, a quarter of float32;
    ~1 % of the top-10 changes). Block files on disk keep the storage dtype."""
    hot_codec: CodecName = "none"
    """How hot blocks are held in GPU memory: ``none``, ``float16`` or ``sq8`` (as warm)."""
