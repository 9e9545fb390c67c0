"""NVIDIA's perf_analyzer (from tritonclient 2.41's wheel) driving any KServe v2 gRPC server.

The same binary and flags measure infermesh's router and Triton, so neither side's client
is in question. Needs Debian's libb64-0d (installed with apt-get when running as root) and
libcudart.so.12 (the nvidia-cuda-runtime-cu12 wheel), even on a CPU-only machine.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from bench.peers.common import LOGS, PeerUnavailable, venv


def ensure() -> dict[str, str]:
    """Install the venv and libb64; the versions (perf_analyzer has none of its own)."""
    v = venv("perf")
    v.ensure()
    if not Path("/usr/lib/x86_64-linux-gnu/libb64.so.0d").exists():
        if shutil.which("apt-get") and _is_root():
            subprocess.call(
                ["apt-get", "install", "-y", "-qq", "libb64-0d"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
    out = subprocess.run(
        [str(v.bin / "perf_analyzer"), "--help"], env=_env(), capture_output=True, text=True
    )
    if "error while loading shared libraries" in out.stderr:
        raise PeerUnavailable(f"perf_analyzer cannot start: {out.stderr.strip()[:200]}")
    return {"perf_analyzer": f"from tritonclient {v.versions().get('tritonclient', '?')}"}


def _is_root() -> bool:
    import os

    return os.geteuid() == 0


def _env() -> dict[str, str]:
    import os

    cudart = next(
        venv("perf").path.glob("lib/python3.*/site-packages/nvidia/cuda_runtime/lib"), None
    )
    lib = str(cudart) if cudart else ""
    return {
        **os.environ,
        "LD_LIBRARY_PATH": ":".join(p for p in (lib, os.environ.get("LD_LIBRARY_PATH", "")) if p),
    }


def write_input(path: Path, inputs: dict[str, list[Any]]) -> Path:
    """A ``--input-data`` file with one fixed request (name -> flat content, 1-d shape)."""
    data = {k: {"content": v, "shape": [len(v)]} for k, v in inputs.items()}
    path.write_text(json.dumps({"data": [data]}))
    return path


def run(
    model: str,
    url: str,
    concurrency: int,
    input_data: Path,
    shapes: dict[str, int],
    window_ms: int,
    label: str,
) -> dict[str, Any]:
    """One perf_analyzer run at one concurrency: infer/s, p50 and p99 (ms) from its CSV."""
    LOGS.mkdir(parents=True, exist_ok=True)
    csv_path = LOGS / f"perf-{label}-{model}-c{concurrency}.csv"
    base = [
        str(venv("perf").bin / "perf_analyzer"),
        "-m",
        model,
        "-u",
        url,
        "-i",
        "grpc",
        "--concurrency-range",
        str(concurrency),
        "-p",
        str(window_ms),
        "--percentile=99",
        "--max-trials",
        "8",
        "--input-data",
        str(input_data),
        "-f",
        str(csv_path),
    ]
    for name, n in shapes.items():
        base += ["--shape", f"{name}:{n}"]
    # perf_analyzer's own criterion first (3 windows within 50%); on a shared, noisy machine
    # that may never hold, so one retry accepts any windows and the row says it was unstable.
    for stability in ("50", "100"):
        csv_path.unlink(missing_ok=True)
        proc = subprocess.run(
            [*base, "-s", stability],
            env=_env(),
            capture_output=True,
            text=True,
            timeout=60 + 12 * window_ms / 1000,
        )
        log = LOGS / f"perf-{label}-{model}-c{concurrency}.log"
        log.write_text(proc.stdout + proc.stderr)
        if csv_path.is_file() or "stable measurement" not in proc.stdout + proc.stderr:
            break
    if not csv_path.is_file():
        tail = " / ".join((proc.stdout + proc.stderr).strip().splitlines()[-2:])
        raise PeerUnavailable(f"perf_analyzer gave no result ({proc.returncode}): {tail[:300]}")
    with csv_path.open() as f:
        row = next(csv.DictReader(f))
    return {
        "concurrency": concurrency,
        "throughput": round(float(row["Inferences/Second"]), 1),
        "p50_ms": round(float(row["p50 latency"]) / 1000, 2),
        "p99_ms": round(float(row["p99 latency"]) / 1000, 2),
        "stable": stability == "50",
    }
