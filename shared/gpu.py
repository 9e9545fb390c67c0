"""GPU memory and utilisation as Prometheus gauges, where NVML sees a GPU.

Workers run ``sample_loop`` with their other loops. On a machine without an NVIDIA driver
NVML does not initialise; then there is nothing to report and the loop ends at once (the
absence is logged once, not faked with zeros).
"""

from __future__ import annotations

import asyncio
import logging

from shared import metrics

log = logging.getLogger(__name__)


def gpu_count() -> int:
    """How many GPUs NVML sees (0 without a driver or without nvidia-ml-py)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return int(pynvml.nvmlDeviceGetCount())
    except Exception:
        return 0


def sample_once() -> int:
    """Set the GPU gauges from NVML; returns the number of GPUs sampled."""
    import pynvml

    count = int(pynvml.nvmlDeviceGetCount())
    for i in range(count):
        handle = pynvml.nvmlDeviceGetHandleByIndex(i)
        mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
        util = pynvml.nvmlDeviceGetUtilizationRates(handle)
        label = str(i)
        metrics.GPU_MEMORY_USED.labels(label).set(mem.used)
        metrics.GPU_MEMORY_FREE.labels(label).set(mem.free)
        metrics.GPU_UTILIZATION.labels(label).set(util.gpu / 100.0)
    return count


async def sample_loop(period_s: float = 5.0) -> None:
    """Refresh the GPU gauges every period; returns at once when there is no GPU."""
    if gpu_count() == 0:
        log.info("no GPU visible to NVML: GPU metrics are not reported")
        return
    while True:
        await asyncio.to_thread(sample_once)
        await asyncio.sleep(period_s)
