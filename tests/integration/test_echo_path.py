"""The data path over real gRPC and real NATS: router -> batcher -> inference worker."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from tests_support import eventually

from shared.bus import Bus
from shared.client import AsyncClient, build_request
from shared.errors import RPCError
from shared.pb.infermesh.v1 import common_pb2, router_pb2

from .mesh import echo_mesh, start_batcher, start_router, start_worker


async def ready(client: AsyncClient) -> bool:
    try:
        await client.infer("echo", texts=["ping"], timeout=2)
    except RPCError:
        return False
    return True


async def test_echo_text_goes_through_router_batcher_and_worker_and_back(
    nats_server, tmp_path: Path
) -> None:
    async with echo_mesh(nats_server.url, tmp_path) as mesh:
        async with AsyncClient(mesh["router"].endpoint) as client:
            await eventually(lambda: ready(client), what="mesh ready")
            result = await client.infer("echo", texts=["hi"])
    assert [t.decode() for t in result.outputs["TEXT"]] == ["hi"]
    (timing,) = result.timings
    assert timing.step == "infer" and timing.target == "echo"
    assert timing.worker == mesh["worker"].service.instance
    assert timing.total_ms > 0 and timing.batch_size >= 1


async def test_tensors_come_back_bit_exact_under_concurrency(nats_server, tmp_path: Path) -> None:
    async with echo_mesh(nats_server.url, tmp_path) as mesh:
        async with AsyncClient(mesh["router"].endpoint) as client:
            await eventually(lambda: ready(client), what="mesh ready")
            arrays = [np.random.default_rng(i).random((1, 16), dtype=np.float32) for i in range(64)]
            results = await asyncio.gather(*(client.infer("echo", {"INPUT0": a}) for a in arrays))
    for a, r in zip(arrays, results, strict=True):
        np.testing.assert_array_equal(r.outputs["OUTPUT0"], a)
    # Under concurrency the batcher formed batches larger than one.
    assert max(r.timings[0].batch_size for r in results) > 1


async def test_an_unknown_model_is_not_found_and_named(nats_server, tmp_path: Path) -> None:
    async with echo_mesh(nats_server.url, tmp_path) as mesh:
        async with AsyncClient(mesh["router"].endpoint) as client:
            await eventually(lambda: ready(client), what="mesh ready")
            with pytest.raises(RPCError) as info:
                await client.infer("no-such-model", texts=["x"])
    assert info.value.status == grpc.StatusCode.NOT_FOUND
    assert "no-such-model" in info.value.message


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"INPUT0": np.zeros((1, 16), np.int32)}, "must be FP32, got INT32"),
        ({"INPUT0": np.zeros((2, 3, 4), np.float32)}, "shape [batch, -1]"),
        ({"BOGUS": np.zeros((1, 4), np.float32)}, "no input 'BOGUS'"),
    ],
)
async def test_bad_tensors_are_invalid_argument_saying_what_was_wrong(
    nats_server, tmp_path: Path, inputs: dict[str, np.ndarray], message: str
) -> None:
    async with echo_mesh(nats_server.url, tmp_path) as mesh:
        async with AsyncClient(mesh["router"].endpoint) as client:
            await eventually(lambda: ready(client), what="mesh ready")
            with pytest.raises(RPCError) as info:
                await client.infer("echo", inputs)
    assert info.value.status == grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.message


async def test_an_oversized_tensor_is_rejected_before_any_work(nats_server, tmp_path: Path) -> None:
    async with echo_mesh(nats_server.url, tmp_path) as mesh:
        async with AsyncClient(mesh["router"].endpoint) as client:
            await eventually(lambda: ready(client), what="mesh ready")
            wire = common_pb2.Tensor(name="INPUT0", dtype="FP32", shape=[1, 1 << 30], data=b"")
            req = router_pb2.InferRequest(model="echo", inputs=[wire])
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await client.stub.Infer(req, timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "exceed the limit" in (info.value.details() or "")


async def test_no_healthy_worker_is_unavailable_within_the_deadline(
    nats_server, tmp_path: Path
) -> None:
    async with echo_mesh(nats_server.url, tmp_path) as mesh:
        async with AsyncClient(mesh["router"].endpoint) as client:
            await eventually(lambda: ready(client), what="mesh ready")
            await mesh["worker"].stop()
            start = time.monotonic()
            with pytest.raises(RPCError) as info:
                await client.infer("echo", texts=["x"], timeout=5)
            elapsed = time.monotonic() - start
    assert info.value.status == grpc.StatusCode.UNAVAILABLE
    assert "no healthy worker serves 'echo'" in info.value.message
    assert elapsed < 5


async def test_a_replaced_worker_is_found_again(nats_server, tmp_path: Path) -> None:
    async with echo_mesh(nats_server.url, tmp_path) as mesh:
        async with AsyncClient(mesh["router"].endpoint) as client:
            await eventually(lambda: ready(client), what="mesh ready")
            await mesh["worker"].stop()
            mesh["worker"] = await start_worker(nats_server.url, tmp_path)
            await eventually(lambda: ready(client), what="new worker used")
            result = await client.infer("echo", texts=["again"])
    assert result.timings[0].worker == mesh["worker"].service.instance


async def test_the_stream_variant_answers_every_request_with_errors_inline(
    nats_server, tmp_path: Path
) -> None:
    async with echo_mesh(nats_server.url, tmp_path) as mesh:
        async with AsyncClient(mesh["router"].endpoint) as client:
            await eventually(lambda: ready(client), what="mesh ready")
            requests = [
                build_request("echo", texts=[f"t{i}"], request_id=f"r{i}") for i in range(20)
            ]
            requests.append(build_request("missing", texts=["x"], request_id="bad"))

            async def gen():
                for r in requests:
                    yield r

            replies = {r.request_id: r async for r in client.stub.InferStream(gen())}
    assert len(replies) == 21
    assert replies["bad"].error_code == grpc.StatusCode.NOT_FOUND.value[0]
    assert replies["r7"].outputs[0].strings == [b"t7"]


async def test_the_client_stream_gives_each_concurrent_request_its_own_answer_or_error(
    nats_server, tmp_path: Path
) -> None:
    async with echo_mesh(nats_server.url, tmp_path) as mesh:
        async with AsyncClient(mesh["router"].endpoint) as client:
            await eventually(lambda: ready(client), what="mesh ready")
            arrays = [np.random.default_rng(i).random((1, 16), dtype=np.float32) for i in range(40)]
            async with client.stream() as stream:
                results = await asyncio.gather(
                    *(stream.infer("echo", {"INPUT0": a}) for a in arrays),
                    stream.infer("missing", texts=["x"]),
                    return_exceptions=True,
                )
                first, second = await asyncio.gather(
                    stream.infer("echo", texts=["a"], request_id="same"),
                    stream.infer("echo", texts=["b"], request_id="same"),
                    return_exceptions=True,
                )
                after = await stream.infer("echo", texts=["still open"], request_id="same")
    *answers, missing = results
    for a, r in zip(arrays, answers, strict=True):
        np.testing.assert_array_equal(r.outputs["OUTPUT0"], a)
    assert isinstance(missing, RPCError) and missing.status == grpc.StatusCode.NOT_FOUND
    assert "missing" in str(missing)
    assert [t.decode() for t in first.outputs["TEXT"]] == ["a"]  # type: ignore[union-attr]
    assert isinstance(second, ValueError) and "already in flight" in str(second)
    assert [t.decode() for t in after.outputs["TEXT"]] == ["still open"]


async def test_services_retry_until_nats_is_reachable(nats_server, tmp_path: Path) -> None:
    nats_server.stop()
    connecting = asyncio.get_running_loop().create_task(Bus.connect(nats_server.url, name="late"))
    await asyncio.sleep(0.5)
    assert not connecting.done()
    nats_server.start()
    bus = await asyncio.wait_for(connecting, timeout=15)
    assert bus.connected
    await bus.close()


async def test_a_bounded_attempt_count_gives_one_clear_error(nats_server, tmp_path: Path) -> None:
    nats_server.stop()
    with pytest.raises(ConnectionError, match=r"cannot reach NATS at .* after 2 attempts"):
        await Bus.connect(nats_server.url, name="x", attempts=2)


async def test_the_mesh_keeps_serving_through_a_nats_restart(nats_server, tmp_path: Path) -> None:
    async with echo_mesh(nats_server.url, tmp_path) as mesh:
        async with AsyncClient(mesh["router"].endpoint) as client:
            await eventually(lambda: ready(client), what="mesh ready")
            nats_server.kill()
            # Data path: last known members and specs keep requests flowing.
            result = await client.infer("echo", texts=["during outage"])
            assert [t.decode() for t in result.outputs["TEXT"]] == ["during outage"]
            nats_server.start()
            bus = mesh["batcher"].service.bus
            await eventually(lambda: _connected(bus), timeout=15, what="reconnect")
            # The control path recovers: a worker that joins now is seen.
            extra = await start_worker(nats_server.url, tmp_path)
            members = mesh["batcher"].service.members
            await eventually(
                lambda: _has(members, extra.service.instance), timeout=15, what="new member"
            )
            await extra.stop()


async def _connected(bus: Bus) -> bool:
    return bus.connected


async def _has(view, instance: str) -> bool:
    return any(m.instance == instance for m in view.members())


async def test_two_batchers_share_the_load_and_one_can_leave(nats_server, tmp_path: Path) -> None:
    async with echo_mesh(nats_server.url, tmp_path) as mesh:
        second = await start_batcher(nats_server.url, tmp_path)
        router = mesh["router"].service
        await eventually(lambda: _count(router.members, "batcher", 2), what="both batchers visible")
        async with AsyncClient(mesh["router"].endpoint) as client:
            await eventually(lambda: ready(client), what="mesh ready")
            await asyncio.gather(*(client.infer("echo", texts=[str(i)]) for i in range(40)))
            await second.stop()
            # Requests keep succeeding after one replica drained and left.
            await asyncio.gather(*(client.infer("echo", texts=[str(i)]) for i in range(20)))


async def _count(view, service: str, n: int) -> bool:
    return len(view.members(service)) == n


async def test_a_router_started_before_any_worker_serves_once_one_joins(
    nats_server, tmp_path: Path
) -> None:
    router = await start_router(nats_server.url, tmp_path)
    batcher = await start_batcher(nats_server.url, tmp_path)
    try:
        async with AsyncClient(router.endpoint) as client:
            with pytest.raises(RPCError) as info:
                await client.infer("echo", texts=["x"], timeout=2)
            assert info.value.status in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE)
            worker = await start_worker(nats_server.url, tmp_path)
            try:
                await eventually(lambda: ready(client), what="served after join")
            finally:
                await worker.stop()
    finally:
        await batcher.stop()
        await router.stop()


async def test_the_batcher_stream_answers_each_submit_with_errors_inline(
    nats_server, tmp_path: Path
) -> None:
    from shared import rpc
    from shared.pb.infermesh.v1 import batcher_pb2, batcher_pb2_grpc

    async with echo_mesh(nats_server.url, tmp_path) as mesh:
        async with AsyncClient(mesh["router"].endpoint) as client:
            await eventually(lambda: ready(client), what="mesh ready")
        channel = rpc.channel(mesh["batcher"].endpoint)
        stub = batcher_pb2_grpc.BatcherStub(channel)
        requests = [
            batcher_pb2.SubmitRequest(
                target="echo",
                kind=batcher_pb2.TARGET_KIND_MODEL,
                item=common_pb2.WorkItem(request_id=f"s{i}", texts=[f"t{i}"]),
            )
            for i in range(10)
        ]
        requests.append(
            batcher_pb2.SubmitRequest(
                target="nope", item=common_pb2.WorkItem(request_id="bad", texts=["x"])
            )
        )

        async def gen():
            yield batcher_pb2.SubmitCalls(calls=requests[:4])
            yield batcher_pb2.SubmitCalls(calls=requests[4:])

        replies = {
            r.result.request_id: r
            async for message in stub.SubmitStream(gen(), timeout=10)
            for r in message.answers
        }
        await channel.close()
    assert len(replies) == 11
    assert replies["s3"].result.outputs[0].strings == [b"t3"]
    assert replies["bad"].result.error_code == grpc.StatusCode.NOT_FOUND.value[0]
