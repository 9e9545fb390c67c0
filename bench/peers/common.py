"""Shared plumbing for the peers: pinned venvs, child processes, retrieval measurement.

Standard library and numpy only, because this module is imported both by the orchestrator
(project venv) and by peer workloads running in their own venvs.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
BENCH_DIR = ROOT / ".bench"
VENVS = BENCH_DIR / "venvs"
LOGS = BENCH_DIR / "logs"

#: Pinned requirements of each peer venv. Versions move; change them here and the next
#: `make bench` rebuilds the venv (the stamp holds the list it was built from).
REQUIREMENTS: dict[str, list[str]] = {
    # numpy 1.x: with numpy 2 Triton's Python-backend stub returns empty outputs (PEERS.md).
    "triton": ["nvidia-pytriton==0.7.0", "numpy==1.26.4", "onnxruntime==1.32.0"],
    # tritonclient 2.41 is the last wheel that ships a working perf_analyzer binary here;
    # it links libcudart.so.12 even on CPU, which this wheel provides.
    "perf": ["tritonclient[grpc]==2.41.0", "nvidia-cuda-runtime-cu12==12.9.79"],
    # tritonclient only for the KServe v2 stubs: Ray's gRPC ingress serves the same proto.
    "ray": ["ray[serve]==2.60.0", "onnxruntime==1.32.0", "tritonclient[grpc]==2.73.0"],
    "milvus": ["pymilvus==3.0.2", "milvus-lite==3.2.2"],
    "lancedb": ["lancedb==0.40.0"],
    "plot": ["matplotlib==3.11.2"],
}
#: The distributions whose versions each venv reports in the results.
REPORTED: dict[str, list[str]] = {
    "triton": ["nvidia-pytriton", "onnxruntime", "numpy"],
    "perf": ["tritonclient"],
    "ray": ["ray", "onnxruntime", "numpy"],
    "milvus": ["pymilvus", "milvus-lite", "numpy"],
    "lancedb": ["lancedb", "pylance", "pyarrow", "numpy"],
    "plot": ["matplotlib"],
}


class PeerUnavailable(RuntimeError):
    """A peer cannot run here; the message says why and goes into the table."""


@dataclass
class Venv:
    """One peer's virtual environment under .bench/venvs, with pinned requirements."""

    name: str
    requirements: list[str] = field(default_factory=list)

    @property
    def path(self) -> Path:
        return VENVS / self.name

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"

    @property
    def bin(self) -> Path:
        return self.path / "bin"

    def ensure(self, log: Callable[[str], None] = print) -> Path:
        """Create the venv and install the pins unless a stamp says it is done; its python."""
        stamp = self.path / ".bench-stamp"
        wanted = "\n".join(self.requirements)
        if stamp.is_file() and stamp.read_text() == wanted and self.python.exists():
            return self.python
        LOGS.mkdir(parents=True, exist_ok=True)
        logfile = LOGS / f"{self.name}-install.log"
        log(f"installing {self.name} venv ({', '.join(self.requirements)}); log {logfile}")
        with logfile.open("w") as out:
            steps = [
                [sys.executable, "-m", "venv", "--clear", str(self.path)],
                [
                    str(self.python),
                    "-m",
                    "pip",
                    "install",
                    "-q",
                    "--disable-pip-version-check",
                    *self.requirements,
                ],
            ]
            for cmd in steps:
                if subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT) != 0:
                    raise PeerUnavailable(
                        f"pip could not install {' '.join(self.requirements)} "
                        f"(see {logfile.relative_to(ROOT)}): {_tail(logfile)}"
                    )
        stamp.write_text(wanted)
        return self.python

    def versions(self) -> dict[str, str]:
        """Installed versions of the distributions this venv reports."""
        names = REPORTED.get(self.name, [])
        code = (
            "import json, sys\nfrom importlib import metadata\nout = {}\n"
            "for n in sys.argv[1:]:\n"
            "    try: out[n] = metadata.version(n)\n"
            "    except metadata.PackageNotFoundError: out[n] = 'absent'\n"
            "print(json.dumps(out))"
        )
        try:
            raw = subprocess.check_output([str(self.python), "-c", code, *names], text=True)
        except (OSError, subprocess.CalledProcessError):
            return {}
        return dict(json.loads(raw))


def venv(name: str) -> Venv:
    """The named peer venv with its pins."""
    return Venv(name, REQUIREMENTS[name])


def _tail(path: Path, lines: int = 3) -> str:
    text = path.read_text(errors="replace").strip().splitlines()
    return " / ".join(text[-lines:])[-400:]


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Proc:
    """A child process started in its own process group, logging to a file."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_for_line(self, needle: str, timeout: float) -> None:
        """Block until the log has a line containing needle, or raise PeerUnavailable."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.log_path.read_text(errors="replace"):
                return
            if not self.alive():
                raise PeerUnavailable(
                    f"{self.name} exited ({self.popen.returncode}) before '{needle}': "
                    f"{self.log_tail(4)}"
                )
            time.sleep(0.2)
        raise PeerUnavailable(
            f"{self.name}: no '{needle}' after {timeout:.0f}s: {self.log_tail(4)}"
        )

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the leader, wait, then SIGKILL whatever it left in its session.

        Only the leader gets SIGTERM: a server shuts its helpers down itself (signalling the
        whole group first kills Ray's raylet under its own graceful shutdown, which then hangs).
        """
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        for pid in session_members(self.popen.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def session_members(sid: int) -> list[int]:
    """Processes whose session id is sid (what a child started with start_new_session left)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # after the command: state, ppid, pgrp, session
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def spawn(
    name: str, cmd: Sequence[str], env: dict[str, str] | None = None, cwd: Path = ROOT
) -> Proc:
    """Start cmd in a new process group (so stop() reaches its children), output to a log."""
    LOGS.mkdir(parents=True, exist_ok=True)
    log_path = LOGS / f"{name}.log"
    out = log_path.open("wb")
    popen = subprocess.Popen(
        list(cmd),
        stdout=out,
        stderr=subprocess.STDOUT,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )
    out.close()
    return Proc(name, popen, log_path)


# -- retrieval measurement (the same for every engine) ------------------------------------

RECALL_TARGET = 0.95
K = 10


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of the true top-k found (rows of ids; -1 never matches)."""
    k = truth.shape[1]
    hits = [len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(found, truth, strict=True)]
    return float(np.mean(hits))


def rss_bytes() -> int:
    """This process's anonymous resident memory now (RssAnon).

    Anonymous only: the benchmark's vectors are memory-mapped from .npy files, and pages of
    them touched while inserting would otherwise count as the engine's memory.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def measure(
    search: Callable[[np.ndarray], np.ndarray],
    xq: np.ndarray,
    truth: np.ndarray,
    batch: int,
    budget_s: float,
) -> dict[str, float]:
    """Queries in calls of ``batch`` one after another: QPS, per-call p50/p99, recall@k."""
    ids: list[np.ndarray] = []
    lat: list[float] = []
    t0 = time.perf_counter()
    for lo in range(0, len(xq), batch):
        t = time.perf_counter()
        ids.append(search(xq[lo : lo + batch]))
        lat.append((time.perf_counter() - t) * 1000)
        if time.perf_counter() - t0 > budget_s:
            break
    dt = time.perf_counter() - t0
    found = np.concatenate(ids)
    return {
        "batch": batch,
        "qps": round(len(found) / dt, 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 3),
        "p99_ms": round(float(np.percentile(lat, 99)), 3),
        "recall": round(recall(found, truth[: len(found)]), 4),
        "queries": len(found),
    }


def sweep(
    make_search: Callable[[Any], Callable[[np.ndarray], np.ndarray]],
    knobs: list[Any],
    xq: np.ndarray,
    truth: np.ndarray,
    budget_s: float,
) -> tuple[Any, list[dict[str, Any]]]:
    """The first knob (cheapest first) whose recall@10 reaches the target, and what each gave.

    Recall is judged on the same queries for every engine (batch 64, up to the whole set), so
    "equal recall" means each engine at its cheapest setting that reaches RECALL_TARGET.
    """
    tried: list[dict[str, Any]] = []
    for knob in knobs:
        r = measure(make_search(knob), xq, truth, 64, budget_s)
        tried.append({"knob": knob, "recall": r["recall"], "qps64": r["qps"]})
        if r["recall"] >= RECALL_TARGET:
            return knob, tried
    return None, tried


def load_data(data_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """The collection, queries, exact top-k ids and the generator's parameters."""
    meta = json.loads((data_dir / "meta.json").read_text())
    xb = np.load(data_dir / "xb.npy", mmap_mode="r")
    return xb, np.load(data_dir / "xq.npy"), np.load(data_dir / "truth.npy"), meta


def emit(result: dict[str, Any]) -> None:
    """The one line the orchestrator parses from a peer workload's stdout."""
    print("RESULT " + json.dumps(result), flush=True)


def parse_result(stdout: str) -> dict[str, Any]:
    """The last RESULT line of a peer workload's output."""
    for line in reversed(stdout.splitlines()):
        if line.startswith("RESULT "):
            return dict(json.loads(line[len("RESULT ") :]))
    raise PeerUnavailable("no RESULT line: " + " / ".join(stdout.strip().splitlines()[-3:]))
