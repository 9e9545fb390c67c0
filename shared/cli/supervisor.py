"""The local mesh behind `infermesh up`: nats-server plus the five services as processes.

Starts NATS (JetStream, data under the data dir), then every service on free ports, waits
until each reports SERVING on grpc.health.v1, and writes ``<data dir>/mesh.json`` so other
CLI commands find the running mesh. Stops in the drain order: router, batcher, workers,
tiering, NATS last. Tests and benchmarks use the same class.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.cli.procs import Child, free_port, start_nats, start_service

#: Start order (dependencies first); stop order is the reverse.
ORDER = ("tiering", "retrieval-worker", "inference-worker", "batcher", "router")


class MeshError(RuntimeError):
    """The local mesh could not start; the message names the service and its log."""


def grpc_serving(address: str, timeout: float = 1.0) -> bool:
    """Whether address reports SERVING (overall health)."""
    with grpc.insecure_channel(address) as ch:
        try:
            reply = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout
            )
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


class LocalMesh:
    """Owns the processes of one local mesh."""

    def __init__(
        self,
        data_dir: Path,
        env: dict[str, str] | None = None,
        replicas: dict[str, int] | None = None,
        router_port: int = 0,
        service_env: dict[str, dict[str, str]] | None = None,
        keep_logs: Path | None = None,
    ) -> None:
        """``keep_logs``: a folder the service logs are copied to once the mesh stopped
        (benchmarks run a mesh in a temporary folder and read its logs afterwards)."""
        self.data_dir = data_dir.resolve()
        self.logs = self.data_dir / "logs"
        self.keep_logs = keep_logs
        self.env = env or {}
        self.replicas = {name: 1 for name in ORDER} | (replicas or {})
        self.router_port = router_port
        self.service_env = service_env or {}
        self.nats: Child | None = None
        self.nats_url = ""
        self.children: list[Child] = []
        self.endpoints: dict[str, str] = {}  # child name -> host:port
        self._ports: set[int] = set()

    @property
    def router_address(self) -> str:
        """The router's address (the first replica's when there are several)."""
        if "router" in self.endpoints:
            return self.endpoints["router"]
        return next(a for name, a in self.endpoints.items() if name.startswith("router-"))

    def start(
        self, on_step: Callable[[str], None] = lambda _: None, timeout: float = 120.0
    ) -> None:
        """Start NATS and every service; return once all report SERVING."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        port = free_port()
        on_step(f"starting nats-server (JetStream) on 127.0.0.1:{port}")
        self.nats = start_nats(self.data_dir, port, self.logs)
        self.nats_url = f"nats://127.0.0.1:{port}"
        for name in ORDER:
            for i in range(self.replicas.get(name, 0)):
                suffix = f"-{i}" if self.replicas[name] > 1 else ""
                self._spawn(name, suffix)
        on_step("waiting for every service to report SERVING")
        self._wait_serving(timeout)
        self._write_state()

    def _port(self) -> int:
        """A free port this mesh has not handed out yet (the OS may offer one twice)."""
        while True:
            port = free_port()
            if port not in self._ports:
                self._ports.add(port)
                return port

    def _spawn(self, name: str, suffix: str) -> Child:
        fixed = name == "router" and self.router_port
        grpc_port = self.router_port if fixed else self._port()
        env = {
            "INFERMESH_NATS_URL": self.nats_url,
            "INFERMESH_GRPC_HOST": "127.0.0.1",
            "INFERMESH_GRPC_PORT": str(grpc_port),
            "INFERMESH_METRICS_PORT": str(self._port()),
            "INFERMESH_DATA_DIR": str(self.data_dir),
            "INFERMESH_INSTANCE": f"{name}{suffix or '-0'}",
            **self.env,
            **self.service_env.get(name, {}),
        }
        child = start_service(name, env, self.logs, suffix)
        child.suffix = suffix  # type: ignore[attr-defined]
        self.children.append(child)
        self.endpoints[name + suffix] = f"127.0.0.1:{grpc_port}"
        return child

    def add(self, name: str, suffix: str, timeout: float = 60.0) -> Child:
        """Start one more instance of a service (scale-out tests)."""
        child = self._spawn(name, suffix)
        self._wait_serving(timeout, [child])
        return child

    def _wait_serving(self, timeout: float, children: list[Child] | None = None) -> None:
        deadline = time.monotonic() + timeout
        waiting = list(children or self.children)
        respawns = 0
        while waiting:
            for child in list(waiting):
                if not child.alive() and respawns < 3 and _port_taken(child):
                    # A free port was taken by someone else between our pick and the
                    # child's bind: start it again on new ports.
                    respawns += 1
                    self.children.remove(child)
                    waiting.remove(child)
                    suffix: str = child.suffix  # type: ignore[attr-defined]
                    waiting.append(self._spawn(child.service, suffix))
                    continue
                if not child.alive():
                    raise MeshError(
                        f"{child.name} exited with code {child.proc.returncode} while starting; "
                        f"log {child.log_path}:\n{child.log_tail()}"
                    )
                if grpc_serving(self.endpoints[child.name], timeout=0.5):
                    waiting.remove(child)
            if waiting and time.monotonic() > deadline:
                names = ", ".join(c.name for c in waiting)
                raise MeshError(f"not SERVING after {timeout:.0f}s: {names} (logs in {self.logs})")
            if waiting:
                time.sleep(0.1)

    def _write_state(self) -> None:
        state = {
            "router": self.router_address,
            "nats": self.nats_url,
            "endpoints": self.endpoints,
            "pids": {c.name: c.pid for c in self.children},
        }
        (self.data_dir / "mesh.json").write_text(json.dumps(state, indent=2))

    def dead(self) -> list[Child]:
        """Children that exited on their own."""
        gone = [c for c in self.children if not c.alive()]
        if self.nats is not None and not self.nats.alive():
            gone.append(self.nats)
        return gone

    def child(self, name: str) -> Child:
        return next(c for c in self.children if c.name == name)

    def stop(self, timeout: float = 15.0) -> dict[str, int]:
        """Stop services in drain order, NATS last; returns exit codes by name."""
        codes: dict[str, int] = {}
        for name in reversed(ORDER):
            for child in [c for c in self.children if c.service == name]:
                codes[child.name] = child.stop(timeout)
        if self.nats is not None:
            codes["nats"] = self.nats.stop(timeout)
        (self.data_dir / "mesh.json").unlink(missing_ok=True)
        if self.keep_logs is not None and self.logs.is_dir():
            # After every process stopped, so the copy holds their last lines. A failed copy
            # must not replace the exception the mesh may be stopping for.
            with contextlib.suppress(OSError):
                shutil.copytree(self.logs, self.keep_logs, dirs_exist_ok=True)
        return codes

    def __enter__(self) -> LocalMesh:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _port_taken(child: Child) -> bool:
    """Whether a child died because a port it was given was in use."""
    tail = child.log_tail(5)
    return "Address already in use" in tail or "cannot bind gRPC server" in tail


def read_state(data_dir: Path) -> dict[str, object]:
    """The running mesh's addresses, as written by `infermesh up` (empty if none)."""
    try:
        return dict(json.loads((data_dir / "mesh.json").read_text()))
    except (OSError, ValueError):
        return {}
