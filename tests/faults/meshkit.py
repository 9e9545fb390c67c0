"""What the fault suite shares: a temp model repository, process meshes, polling, load, RSS.

Every fault test runs the real services as processes (``LocalMesh``) on loopback, bounded in
time and request count; the helpers here keep each test's own code about its fault.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from shared.cli.supervisor import LocalMesh
from shared.pb.infermesh.v1 import router_pb2, router_pb2_grpc
from shared.tensors import from_numpy

ROOT = Path(__file__).resolve().parents[2]

#: Settings that make membership react in well under a second and drains short.
FAST = {
    "INFERMESH_HEARTBEAT_S": "0.2",
    "INFERMESH_MEMBER_TTL_S": "2",
    "INFERMESH_GRACE_S": "5",
    "INFERMESH_LOG_LEVEL": "INFO",
    # Fault tests measure the data path; the SLO controller would move the batch cap under
    # them, which is tested on its own (tests/integration/test_batch_controller.py).
    "INFERMESH_BATCH_CONTROLLER": "false",
}


def echo_repository(root: Path, base_ms: float = 0.0, per_item_ms: float = 0.0) -> Path:
    """A model repository holding only the echo model, with a synthetic cost per batch."""
    config = json.loads((ROOT / "models" / "echo" / "config.json").read_text())
    config["parameters"] = {"base_ms": base_ms, "per_item_ms": per_item_ms}
    config["slo_ms"] = 1000
    folder = root / "echo"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return root


def mesh_env(repository: Path, **extra: str) -> dict[str, str]:
    """The environment of every service of a fault-test mesh (extra: INFERMESH_* overrides)."""
    return {
        **FAST,
        "INFERMESH_MODEL_REPOSITORY": str(repository),
        "INFERMESH_PIPELINES": "",
        **extra,
    }


@contextmanager
def process_mesh(
    data_dir: Path,
    env: dict[str, str],
    replicas: dict[str, int] | None = None,
    service_env: dict[str, dict[str, str]] | None = None,
) -> Iterator[LocalMesh]:
    """A LocalMesh (no retrieval worker or tiering unless asked) that serves echo; stopped after."""
    counts = {"tiering": 0, "retrieval-worker": 0} | (replicas or {})
    mesh = LocalMesh(data_dir, env=env, replicas=counts, service_env=service_env)
    try:
        mesh.start(timeout=60)
        for router in routers(mesh):
            wait_until(lambda r=router: echo_ok(r), 20, f"echo answers through {router}")
        yield mesh
    finally:
        mesh.stop()


def routers(mesh: LocalMesh) -> list[str]:
    """The addresses of the mesh's routers (one or more replicas)."""
    return [a for name, a in mesh.endpoints.items() if name.split("-")[0] == "router"]


def wait_until(check: Callable[[], object], timeout: float, what: str) -> Any:
    """Poll check() until truthy; AssertionError naming what after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached within {timeout:.0f}s")
        time.sleep(0.05)


def echo_request(i: int = 0, timeout_ms: int = 0) -> router_pb2.InferRequest:
    """An echo request whose tensor encodes i, so the answer can be checked bit for bit."""
    array = np.full((1, 4), float(i), dtype=np.float32)
    return router_pb2.InferRequest(
        model="echo", inputs=[from_numpy("INPUT0", array)], timeout_ms=timeout_ms
    )


def echo_ok(address: str) -> bool:
    """Whether one echo request through the router at address succeeds now."""
    with grpc.insecure_channel(address) as ch:
        try:
            router_pb2_grpc.RouterStub(ch).Infer(echo_request(7), timeout=2)
        except grpc.RpcError:
            return False
    return True


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise LookupError(f"no VmRSS for pid {pid}")


@dataclass
class Outcome:
    """One call made under load: when, how long, how it ended, and who served it."""

    started: float
    wall_s: float
    code: grpc.StatusCode
    details: str = ""
    worker: str = ""


@dataclass
class Load:
    """Closed-loop callers (threads) sending echo requests until stopped; records every call.

    ``call(stubs, i, timeout)`` makes one request and returns the worker that served it; a
    raised ``grpc.RpcError`` is recorded with its code. Each caller keeps long-lived channels,
    its own router first (round robin over callers), the others after it for failover.
    """

    routers: list[str]
    callers: int = 8
    timeout_s: float = 5.0
    call: Callable[[list[router_pb2_grpc.RouterStub], int, float], str] | None = None
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> Load:
        for n in range(self.callers):
            t = threading.Thread(target=self._run, args=(n,), daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def _run(self, n: int) -> None:
        call = self.call or default_call
        # The caller's own router first, then the others (a call may fail over to them).
        order = self.routers[n % len(self.routers) :] + self.routers[: n % len(self.routers)]
        channels = [grpc.insecure_channel(r) for r in order]
        stubs = [router_pb2_grpc.RouterStub(ch) for ch in channels]
        i = 0
        try:
            while not self._stop.is_set():
                i += 1
                start = time.monotonic()
                try:
                    worker = call(stubs, n * 1_000_000 + i, self.timeout_s)
                    out = Outcome(start, time.monotonic() - start, grpc.StatusCode.OK, "", worker)
                except grpc.RpcError as err:
                    out = Outcome(start, time.monotonic() - start, err.code(), err.details() or "")
                except AssertionError as exc:  # a wrong answer: worse than an error
                    code = grpc.StatusCode.DATA_LOSS
                    out = Outcome(start, time.monotonic() - start, code, str(exc))
                with self._lock:
                    self.outcomes.append(out)
        finally:
            for ch in channels:
                ch.close()

    def hold(self, seconds: float) -> None:
        """Keep the load on for a duration (a sleep that holds load, not a wait for state)."""
        time.sleep(seconds)

    def stop(self) -> list[Outcome]:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=self.timeout_s + 5)
        assert not any(t.is_alive() for t in self._threads), "a caller hung past its deadline"
        return list(self.outcomes)

    def since(self, t: float) -> list[Outcome]:
        with self._lock:
            return [o for o in self.outcomes if o.started >= t]

    def count(self) -> int:
        with self._lock:
            return len(self.outcomes)


def default_call(stubs: list[router_pb2_grpc.RouterStub], i: int, timeout_s: float) -> str:
    """One echo request to the caller's router, checked bit for bit; returns its worker."""
    return checked(stubs[0].Infer(echo_request(i), timeout=timeout_s), i)


def checked(reply: router_pb2.InferResponse, i: int) -> str:
    """The worker that served echo request i, after checking the answer bit for bit."""
    (out,) = reply.outputs
    got = np.frombuffer(out.data, dtype="<f4")
    assert got.tolist() == [float(i)] * 4, f"request {i} came back as {got.tolist()}"
    return reply.timings[0].worker


def failures(outcomes: list[Outcome]) -> list[Outcome]:
    return [o for o in outcomes if o.code != grpc.StatusCode.OK]


def summary(outcomes: list[Outcome]) -> str:
    """Counts by status code, for assertion messages."""
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o.code.name] = counts.get(o.code.name, 0) + 1
    bad = failures(outcomes)[:3]
    return f"{counts}; first failures: {[(o.code.name, o.details[:120]) for o in bad]}"
