"""SIGKILL under load: a worker mid-batch, and NATS (then restarted) with the data path busy."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import grpc

from shared.cli.procs import start_nats

from .meshkit import (
    Load,
    echo_repository,
    failures,
    mesh_env,
    process_mesh,
    routers,
    summary,
    wait_until,
)

CALL_TIMEOUT_S = 3.0
#: How much later than its deadline a call may come back (scheduling on 2 shared cores).
LATE_S = 0.5


def test_a_worker_killed_mid_batch_costs_no_caller_more_than_its_deadline(
    tmp_path: Path,
) -> None:
    # Batches take 20 ms + 1 ms per item, so a kill lands while batches are running.
    repo = echo_repository(tmp_path / "models", base_ms=20, per_item_ms=1)
    with process_mesh(tmp_path / "mesh", mesh_env(repo), {"inference-worker": 2}) as mesh:
        load = Load(routers(mesh), callers=12, timeout_s=CALL_TIMEOUT_S).start()
        load.hold(1.0)
        victim = mesh.child("inference-worker-0")
        killed = time.monotonic()
        victim.signal(signal.SIGKILL)
        load.hold(3.0)
        outcomes = load.stop()
        alive = [c.name for c in mesh.children if c.alive()]
    print(f"\nworker SIGKILL: {len(outcomes)} requests; {summary(outcomes)}")
    allowed = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
    assert all(o.code in allowed for o in failures(outcomes)), summary(outcomes)
    slowest = max(o.wall_s for o in outcomes)
    assert slowest <= CALL_TIMEOUT_S + LATE_S, f"a call took {slowest:.2f}s"
    # Once the batcher has seen the failure, everything runs on the survivor, and succeeds.
    later = [o for o in outcomes if o.started > killed + 1.0]
    assert len(later) > 50 and not failures(later), summary(later)
    assert {o.worker for o in later} == {"inference-worker-1"}
    assert set(alive) == {"router", "batcher", "inference-worker-1"}


def test_nats_killed_and_restarted_under_load_loses_no_request_and_the_control_path_returns(
    tmp_path: Path,
) -> None:
    repo = echo_repository(tmp_path / "models", base_ms=2, per_item_ms=0.1)
    with process_mesh(tmp_path / "mesh", mesh_env(repo)) as mesh:
        assert mesh.nats is not None
        port = int(mesh.nats_url.rsplit(":", 1)[1])
        load = Load(routers(mesh), callers=8, timeout_s=CALL_TIMEOUT_S).start()
        load.hold(1.0)
        mesh.nats.signal(signal.SIGKILL)
        mesh.nats.proc.wait()
        down = time.monotonic()
        load.hold(3.0)  # the outage: the data path runs on what it last knew
        during = load.since(down)
        mesh.nats = start_nats(mesh.data_dir, port, mesh.logs)
        restarted = time.monotonic()
        # A worker that joins after the restart is found through the control path...
        mesh.add("inference-worker", "-1", timeout=30)
        wait_until(
            lambda: any(o.worker == "inference-worker-1" for o in load.since(restarted)),
            10,
            "requests reach the worker that joined after NATS came back",
        )
        rejoined_s = time.monotonic() - restarted
        load.hold(1.0)
        outcomes = load.stop()
        dead = [c.name for c in mesh.dead()]
    print(
        f"\nNATS SIGKILL: {len(during)} requests during the 3 s outage, {len(outcomes)} in all, "
        f"new worker used {rejoined_s:.1f}s after restart; {summary(outcomes)}; failures at "
        f"{[round(o.started - restarted, 2) for o in failures(outcomes)]} s after the restart"
    )
    assert len(during) > 100 and not failures(during), summary(during)
    assert not failures(outcomes), summary(outcomes)
    assert rejoined_s < 10
    assert not dead, f"exited: {dead}"
