"""SIGTERM to a router, batcher or inference worker under load loses no request.

Each service runs twice; one replica gets SIGTERM while closed-loop callers keep the mesh
busy. The drain order (NOT_SERVING -> leave membership -> server.stop(grace) -> NATS drain)
promises that every request the draining replica accepted is answered, and that peers stop
sending it new ones. What the callers may do, precisely: a call that no handler of the router
saw is sent again once, to the other router: UNAVAILABLE because its *connection* could not
be made, or CANCELLED by the stopping server's gRPC core while it still waited in the queue
for a handler (grpc/grpc#41785; the mesh's own errors carry the infermesh-origin trailer, and
these carry none). Nothing else is retried by the test; any other failure counts.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import grpc
import pytest

from shared.pb.infermesh.v1 import router_pb2_grpc

from .meshkit import (
    Load,
    checked,
    echo_repository,
    echo_request,
    failures,
    mesh_env,
    process_mesh,
    routers,
    summary,
    wait_until,
)

#: Transport errors that mean the request was never sent to a server.
NEVER_SENT = ("failed to connect", "Connection refused", "connections to all backends failing")


def never_reached_a_server(err: grpc.RpcError) -> bool:
    """No handler saw the call: no infermesh-origin trailer, and refused or cancelled in queue."""
    details = err.details() or ""
    trailing = dict(err.trailing_metadata() or ())  # type: ignore[attr-defined]
    if "infermesh-origin" in trailing:
        return False
    if err.code() == grpc.StatusCode.CANCELLED:
        return True  # the test's callers never cancel; the stopping server did (#41785)
    return err.code() == grpc.StatusCode.UNAVAILABLE and any(m in details for m in NEVER_SENT)


def failover_call(stubs: list[router_pb2_grpc.RouterStub], i: int, timeout_s: float) -> str:
    """Send to the caller's router; only a request that never reached it goes to the next."""
    deadline = time.monotonic() + timeout_s
    try:
        return checked(stubs[0].Infer(echo_request(i), timeout=timeout_s), i)
    except grpc.RpcError as err:
        if not never_reached_a_server(err) or len(stubs) < 2:
            raise
    left = max(0.001, deadline - time.monotonic())
    return checked(stubs[1].Infer(echo_request(i), timeout=left), i)


@pytest.mark.parametrize("service", ["router", "batcher", "inference-worker"])
def test_sigterm_to_one_replica_under_load_fails_no_request(tmp_path: Path, service: str) -> None:
    repo = echo_repository(tmp_path / "models", base_ms=5, per_item_ms=0.2)
    with process_mesh(tmp_path / "mesh", mesh_env(repo), replicas={service: 2}) as mesh:
        load = Load(routers(mesh), callers=8, timeout_s=5.0, call=failover_call).start()
        load.hold(1.0)
        victim = mesh.child(f"{service}-0")
        terminated = time.monotonic()
        victim.signal(signal.SIGTERM)
        wait_until(lambda: not victim.alive(), 15, f"{victim.name} exits after SIGTERM")
        drained_s = time.monotonic() - terminated
        load.hold(1.0)
        outcomes = load.stop()
    code = victim.proc.returncode
    after = [o for o in outcomes if o.started > terminated]
    print(
        f"\ndrain {service}: {len(outcomes)} requests, {len(after)} after SIGTERM, exit {code} "
        f"in {drained_s:.2f}s; {summary(outcomes)}"
    )
    assert code == 0, f"{victim.name} exited {code}; log: {victim.log_tail()}"
    assert not failures(outcomes), summary(outcomes)
    assert len(after) > 50, "the mesh kept serving after the SIGTERM"
    if service == "inference-worker":
        survivor = "inference-worker-1"
        assert {o.worker for o in outcomes if o.started > terminated + drained_s} == {survivor}
