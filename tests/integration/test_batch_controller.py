"""The batch controller on real NATS and gRPC: one leader, shared policies, outages."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import grpc
from prometheus_client import REGISTRY
from tests_support import eventually, eventually_sync

from services.batcher.app import Batcher
from shared.bus import Bus
from shared.cli.status import collect
from shared.client import AsyncClient
from shared.events import POLICY_BUCKET, BatchPolicy, encode
from shared.pb.infermesh.v1 import batcher_pb2, batcher_pb2_grpc, common_pb2

from .mesh import Running, serves_echo, start_batcher, start_router, start_worker

#: A controller that decides five times a second, so tests see several decisions quickly.
FAST = {
    "batch_controller_interval_s": 0.2,
    "batch_controller_window_s": 2.0,
    "batch_controller_lease_s": 1.5,
}


def costly_echo(tmp: Path) -> Path:
    """A repository whose "echo" costs 2 + 1.5 ms per item: its 20 ms SLO bounds the cap
    (2·exec(n) <= 0.7·20 ms: n <= 3), so the controller must change the spec's 64."""
    config = json.loads((Path(__file__).parents[2] / "models" / "echo" / "config.json").read_text())
    config["parameters"] = {"base_ms": 2.0, "per_item_ms": 1.5}
    folder = tmp / "costly-models" / "echo"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder.parent


def batcher(r: Running) -> Batcher:
    service = r.service
    assert isinstance(service, Batcher)
    return service


async def submit_many(endpoint: str, n: int, target: str = "echo") -> list[int]:
    """n concurrent Submits straight to one batcher; returns the batch size of each."""
    async with grpc.aio.insecure_channel(endpoint) as ch:
        stub = batcher_pb2_grpc.BatcherStub(ch)
        replies = await asyncio.gather(
            *(
                stub.Submit(
                    batcher_pb2.SubmitRequest(
                        target=target,
                        item=common_pb2.WorkItem(request_id=str(i), texts=[f"t{i}"]),
                    ),
                    timeout=5,
                )
                for i in range(n)
            )
        )
    return [r.batch_size for r in replies]


async def served(endpoint: str) -> bool:
    try:
        await submit_many(endpoint, 1)
    except grpc.aio.AioRpcError:
        return False
    return True


async def traffic(endpoints: list[str], stop: asyncio.Event) -> None:
    """Keep observations flowing until stop is set (bursts, so batch sizes vary)."""
    i = 0
    while not stop.is_set():
        await submit_many(endpoints[i % len(endpoints)], 1 + i % 7)
        i += 1


async def with_traffic(endpoints: list[str], body: Any) -> None:
    stop = asyncio.Event()
    task = asyncio.get_running_loop().create_task(traffic(endpoints, stop))
    try:
        await body()
    finally:
        stop.set()
        await task


async def reconnected(r: Running) -> bool:
    return r.service.bus is not None and r.service.bus.connected


def changes(target: str) -> float:
    total = 0.0
    for metric in REGISTRY.collect():
        if metric.name == "infermesh_batch_policy_changes":
            for s in metric.samples:
                if s.name.endswith("_total") and s.labels.get("target") == target:
                    total += s.value
    return total


async def test_two_batcher_replicas_converge_to_the_same_policy(
    nats_server, tmp_path: Path
) -> None:
    worker = await start_worker(
        nats_server.url, tmp_path, model_repository=str(costly_echo(tmp_path))
    )
    first = await start_batcher(nats_server.url, tmp_path, **FAST)
    second = await start_batcher(nats_server.url, tmp_path, **FAST)
    before = changes("echo")
    try:
        ends = [first.endpoint, second.endpoint]
        await eventually(lambda: served(first.endpoint), what="first batcher serves")
        await eventually(lambda: served(second.endpoint), what="second batcher serves")
        a, b = batcher(first), batcher(second)

        async def converged() -> bool:
            written = a.policies.values.get("echo") if a.policies else None
            if written is None or written.revision < 2:
                return False
            qa, qb = a.queues["echo"].policy, b.queues["echo"].policy
            return (qa == qb and qa.max_batch_size == written.max_batch_size
                    and qa.max_delay_ms == written.max_delay_ms)

        await with_traffic(ends, lambda: eventually(converged, timeout=20, what="converged"))
        leaders = [s.controller.lease.is_leader for s in (a, b) if s.controller]
        assert leaders.count(True) == 1
        # A change is counted, and `infermesh status` shows the policy and why it changed.
        assert changes("echo") > before
        snap = await collect(nats_server.url)
        (policy,) = [p for p in snap.policies if p.target == "echo"]
        assert policy.revision >= 2 and policy.reason and policy.slo_ms == 20
        assert policy.max_batch_size <= 64  # the echo model's max_batch_size
    finally:
        await second.stop()
        await first.stop()
        await worker.stop()


async def test_when_the_leader_stops_the_other_replica_takes_over_and_keeps_deciding(
    nats_server, tmp_path: Path
) -> None:
    worker = await start_worker(nats_server.url, tmp_path)
    replicas = [await start_batcher(nats_server.url, tmp_path, **FAST) for _ in range(2)]
    stopped: set[int] = set()
    try:
        for r in replicas:
            await eventually(lambda r=r: served(r.endpoint), what="batcher serves")

        async def one_leader() -> int | None:
            flags = [bool(batcher(r).controller and batcher(r).controller.lease.is_leader)
                     for r in replicas]
            return flags.index(True) + 1 if flags.count(True) == 1 else None

        leader = await eventually(one_leader, what="a leader") - 1
        follower = replicas[1 - leader]
        f = batcher(follower)
        await replicas[leader].stop()
        stopped.add(leader)

        async def written_by_follower() -> bool:
            written = f.policies.values.get("echo") if f.policies else None
            return written is not None and written.leader == f.instance

        await with_traffic(
            [follower.endpoint],
            lambda: eventually(written_by_follower, timeout=15, what="follower writes"),
        )
        assert f.controller is not None and f.controller.lease.is_leader
    finally:
        for i, r in enumerate(replicas):
            if i not in stopped:
                await r.stop()
        await worker.stop()


async def test_with_nats_down_batchers_keep_the_last_policy_and_keep_serving(
    nats_server, tmp_path: Path
) -> None:
    worker = await start_worker(nats_server.url, tmp_path)
    b = await start_batcher(nats_server.url, tmp_path, **FAST)
    router = await start_router(nats_server.url, tmp_path)
    try:
        svc = batcher(b)
        await eventually(lambda: served(b.endpoint), what="batcher serves")
        await eventually_sync(lambda: svc.policies is not None and "echo" in svc.policies.values)
        async with AsyncClient(router.endpoint) as client:
            # The router must have seen the model and the batcher before NATS goes away.
            await eventually(lambda: serves_echo(client), what="the router serves echo")
            last = svc.queues["echo"].policy
            nats_server.kill()
            # Several controller intervals pass while requests keep being served.
            deadline = time.monotonic() + 1.5
            while time.monotonic() < deadline:
                result = await client.infer("echo", texts=["during outage"], timeout=5)
                assert [t.decode() for t in result.outputs["TEXT"]] == ["during outage"]
        assert svc.queues["echo"].policy == last
        assert svc.controller is not None and not svc.controller.lease.is_leader
    finally:
        # Services drain their NATS connection on stop, which needs a server to drain to.
        if nats_server.child is None:
            nats_server.start()
        for r in (router, b, worker):
            await eventually(lambda r=r: reconnected(r), timeout=15, what="reconnect")
        await router.stop()
        await b.stop()
        await worker.stop()


async def test_a_policy_written_to_kv_reaches_a_running_queue_within_a_second(
    nats_server, tmp_path: Path
) -> None:
    worker = await start_worker(nats_server.url, tmp_path)
    b = await start_batcher(nats_server.url, tmp_path, batch_controller="false")
    bus = await Bus.connect(nats_server.url, name="test-writer")
    try:
        svc = batcher(b)
        await eventually(lambda: served(b.endpoint), what="batcher serves")
        queue = svc.queues["echo"]
        assert queue.policy.max_batch_size == 64  # from the model spec
        kv = await bus.kv(POLICY_BUCKET)
        policy = BatchPolicy(target="echo", max_batch_size=3, max_delay_ms=5.0, revision=7,
                             reason="test: written by hand")
        await kv.put("echo", encode(policy))
        await eventually_sync(lambda: queue.policy.max_batch_size == 3, timeout=1.0)
        assert queue.policy.max_delay_ms == 5.0
        # The queue loop is the same one (no restart), and its next batches obey the cap.
        sizes = await submit_many(b.endpoint, 40)
        assert max(sizes) <= 3
    finally:
        await bus.close()
        await b.stop()
        await worker.stop()
