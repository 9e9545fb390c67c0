"""Prometheus metrics of every service (names in docs/architecture.md's table).

Metrics are module-level collectors in the default registry, as prometheus-client intends;
each process serves them on its own port (``serve``), so one service's numbers never mix
with another's.
"""

from __future__ import annotations

import time

from prometheus_client import Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.004,
    0.008,
    0.016,
    0.032,
    0.064,
    0.128,
    0.256,
    0.512,
    1.024,
    2.048,
    4.096,
    8.192,
)

REQUESTS = Counter(
    "infermesh_requests",
    "RPCs handled, by service, method, target and final status code.",
    ["service", "method", "target", "code"],
)
REQUEST_SECONDS = Histogram(
    "infermesh_request_duration_seconds",
    "RPC handling time in seconds.",
    ["service", "method", "target"],
    buckets=_LATENCY_BUCKETS,
)
QUEUE_DEPTH = Gauge("infermesh_queue_depth", "Requests waiting in a batcher queue.", ["target"])
BATCH_SIZE = Histogram(
    "infermesh_batch_size",
    "Requests per dispatched batch.",
    ["target"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
)
POLICY_MAX_BATCH = Gauge(
    "infermesh_batch_policy_max_batch_size", "Current max batch size per target.", ["target"]
)
POLICY_MAX_DELAY = Gauge(
    "infermesh_batch_policy_max_delay_seconds", "Current max queue delay per target.", ["target"]
)
POLICY_CHANGES = Counter(
    "infermesh_batch_policy_changes",
    "Batch policy changes the controller leader wrote, by target and reason code.",
    ["target", "reason"],
)
TARGET_SLO = Gauge("infermesh_target_slo_seconds", "Latency SLO per target.", ["target"])
TIER_BYTES = Gauge("infermesh_tier_bytes", "Bytes of vector blocks per tier.", ["worker", "tier"])
TIER_READS = Counter(
    "infermesh_tier_reads", "Block reads served from each tier.", ["worker", "tier"]
)
GPU_MEMORY_USED = Gauge("infermesh_gpu_memory_used_bytes", "GPU memory in use.", ["gpu"])
GPU_MEMORY_FREE = Gauge("infermesh_gpu_memory_free_bytes", "GPU memory free.", ["gpu"])
GPU_UTILIZATION = Gauge("infermesh_gpu_utilization_ratio", "GPU busy ratio (0-1).", ["gpu"])


def observe_request(service: str, method: str, target: str, code: str, start: float) -> None:
    """Count one finished RPC and record its latency (start from time.perf_counter())."""
    REQUESTS.labels(service, method, target, code).inc()
    REQUEST_SECONDS.labels(service, method, target).observe(time.perf_counter() - start)


def serve(port: int, host: str = "0.0.0.0") -> int:
    """Serve /metrics on port (0 = off); returns the port."""
    if port:
        start_http_server(port, addr=host)
    return port
