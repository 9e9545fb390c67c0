"""Closed-loop load generation and reporting shared by the benchmarks.

``closed_loop(call, concurrency, seconds)`` keeps `concurrency` requests in flight for a
duration and returns latencies; ``summary`` turns them into throughput and percentiles;
``machine()`` says what the numbers were measured on.
"""

from __future__ import annotations

import asyncio
import os
import platform
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np


@dataclass
class Run:
    """One measured load level."""

    label: str
    concurrency: int
    completed: int
    errors: int
    seconds: float
    latencies_ms: np.ndarray

    @property
    def throughput(self) -> float:
        return self.completed / self.seconds if self.seconds else 0.0

    def pct(self, q: float) -> float:
        return (
            float(np.percentile(self.latencies_ms, q)) if len(self.latencies_ms) else float("nan")
        )

    def row(self) -> dict[str, float | int | str]:
        return {
            "label": self.label,
            "concurrency": self.concurrency,
            "throughput": round(self.throughput, 1),
            "p50_ms": round(self.pct(50), 3),
            "p99_ms": round(self.pct(99), 3),
            "errors": self.errors,
        }


async def closed_loop(
    label: str,
    call: Callable[[], Awaitable[object]],
    concurrency: int,
    seconds: float,
    warmup_s: float = 1.0,
) -> Run:
    """Keep `concurrency` calls in flight; measure after a warm-up."""
    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + warmup_s + seconds
    measure_from = time.perf_counter() + warmup_s

    async def worker() -> None:
        nonlocal errors
        while True:
            t0 = time.perf_counter()
            if t0 >= stop_at:
                return
            try:
                await call()
            except Exception:
                errors += 1
                continue
            t1 = time.perf_counter()
            if t0 >= measure_from:
                latencies.append((t1 - t0) * 1000.0)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return Run(label, concurrency, len(latencies), errors, seconds, np.array(latencies))


def machine() -> str:
    """CPU model and core count, for the header of every table."""
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {model}, Python {platform.python_version()}"


def table(rows: list[dict[str, float | int | str]]) -> str:
    """A markdown table of dict rows (same keys)."""
    if not rows:
        return ""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)
