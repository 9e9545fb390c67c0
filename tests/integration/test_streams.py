"""The data path's call streams (shared/streams.py) against a real grpc.aio server.

A small Batcher servicer answers SubmitStream through ``answer_concurrently`` after the delay
its request names (``item.k`` milliseconds), so answers come back out of order. The tests
check what the router and batcher rely on: every call gets its own answer, a draining server
answers what it took and sends the rest elsewhere, a dead server fails calls PeerGone (never
a hang), and a deadline ends one call without disturbing the others.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import grpc
import pytest

from shared import metrics, rpc, streams
from shared.client import AsyncClient, InferStream
from shared.errors import DeadlineExceeded, InvalidArgument, RPCError
from shared.pb.infermesh.v1 import (
    batcher_pb2,
    batcher_pb2_grpc,
    common_pb2,
    router_pb2,
    router_pb2_grpc,
)

SUBMIT = streams.PerMessage(
    service="stream-test",
    method="infermesh.v1.Batcher/Submit",
    answer_code=lambda reply: reply.result.error_code,
    answer=batcher_pb2.SubmitResponse,
    bundle=batcher_pb2.SubmitAnswers,
)


class Delayed(batcher_pb2_grpc.BatcherServicer):
    """Answers each submit after item.k ms with its request_id; target "bad" fails."""

    def __init__(self) -> None:
        self.draining = asyncio.Event()
        self.ran: list[str] = []
        self.messages_in = 0
        self.messages_out = 0
        self.bundle_bytes = streams.BUNDLE_BYTES

    async def _one(self, req: batcher_pb2.SubmitRequest) -> batcher_pb2.SubmitResponse:
        if req.target == "bad":
            raise InvalidArgument("target 'bad' is refused")
        await asyncio.sleep(req.item.k / 1000.0)
        self.ran.append(req.item.request_id)
        return batcher_pb2.SubmitResponse(
            result=common_pb2.WorkResult(request_id=req.item.request_id), call_id=req.call_id
        )

    async def SubmitStream(
        self, requests: AsyncIterator[batcher_pb2.SubmitCalls], context: object
    ) -> AsyncIterator[batcher_pb2.SubmitAnswers]:
        async def counted() -> AsyncIterator[batcher_pb2.SubmitCalls]:
            async for message in requests:
                self.messages_in += 1
                yield message

        async for reply in streams.answer_concurrently(
            counted(),
            self._one,
            lambda req, exc: batcher_pb2.SubmitResponse(
                call_id=req.call_id,
                result=common_pb2.WorkResult(error_code=3, error_message=str(exc)),
            ),
            stopping=self.draining,
            per_message=SUBMIT,
            bundle_bytes=self.bundle_bytes,
        ):
            self.messages_out += 1
            yield reply


def submit(request_id: str, delay_ms: int = 0, target: str = "t") -> batcher_pb2.SubmitRequest:
    return batcher_pb2.SubmitRequest(
        target=target, item=common_pb2.WorkItem(request_id=request_id, k=delay_ms)
    )


async def started(
    register: Callable[[grpc.aio.Server], None], service: str, limit: int = 64 * 1024 * 1024
) -> tuple[grpc.aio.Server, int]:
    """A started test server for one servicer, under a gRPC message limit; and its port."""
    server, port, _ = rpc.create_server(
        "stream-test", "127.0.0.1", 0, [register], [service],
        max_message_bytes=limit, tracing=False,
    )
    await server.start()
    return server, port


@asynccontextmanager
async def serving(
    limit: int = 64 * 1024 * 1024, servicer: Delayed | None = None
) -> AsyncIterator[tuple[grpc.aio.Server, Delayed, streams.CallStream]]:
    """A Delayed servicer (or the one given) and a CallStream to it, under a message limit."""
    servicer = servicer or Delayed()
    servicer.bundle_bytes = streams.bundle_budget(limit)
    server, port = await started(
        lambda s: batcher_pb2_grpc.add_BatcherServicer_to_server(servicer, s),
        "infermesh.v1.Batcher",
        limit,
    )
    channels = rpc.Channels(rpc.Transport(max_message_bytes=limit, tracing=False))
    pool: streams.Streams = streams.Streams(
        channels,
        batcher_pb2_grpc.BatcherStub,
        "SubmitStream",
        batcher_pb2.SubmitCalls,
        "infermesh.v1.Batcher/Submit",
        "batcher",
    )
    try:
        yield server, servicer, pool.get(f"127.0.0.1:{port}")
    finally:
        await channels.close()
        await server.stop(0)


@pytest.fixture
async def served() -> AsyncIterator[tuple[grpc.aio.Server, Delayed, streams.CallStream]]:
    async with serving() as parts:
        yield parts


async def test_concurrent_calls_on_one_stream_each_get_their_own_answer(served) -> None:
    _, servicer, stream = served
    # Later requests answer first: matching is by call_id, not by order.
    replies = await asyncio.gather(
        *(stream.call(submit(f"r{i}", delay_ms=40 - i), timeout=5) for i in range(40))
    )
    assert [r.result.request_id for r in replies] == [f"r{i}" for i in range(40)]
    assert servicer.ran[0] == "r39"


async def test_calls_that_queue_together_share_a_message_each_way(served) -> None:
    _, servicer, stream = served
    await stream.call(submit("first"), timeout=5)  # the stream is open
    before_in, before_out = servicer.messages_in, servicer.messages_out
    replies = await asyncio.gather(*(stream.call(submit(f"b{i}"), timeout=5) for i in range(50)))
    assert [r.result.request_id for r in replies] == [f"b{i}" for i in range(50)]
    # Fifty calls queued before the writer ran: far fewer messages than calls, both ways.
    assert servicer.messages_in - before_in <= 5
    assert servicer.messages_out - before_out <= 10


def test_a_bundle_stays_under_its_byte_budget_and_a_big_call_goes_alone() -> None:
    small = [submit(f"s{i}") for i in range(5)]
    assert small[0].ByteSize() == 9
    big = batcher_pb2.SubmitRequest(target="t", item=common_pb2.WorkItem(request_id="x" * 400))
    bundles = list(  # a budget of 30 bytes: three small calls fit, not four
        streams.packed([*small, big, small[0]], lambda b: batcher_pb2.SubmitCalls(calls=b), 30)
    )
    # under a gRPC limit, a bundle takes at most half of it
    assert streams.bundle_budget(1 << 20) == 1 << 19
    assert streams.bundle_budget(1 << 30) == streams.BUNDLE_BYTES
    assert [len(b.calls) for b in bundles] == [3, 2, 1, 1]
    order = [c.item.request_id for b in bundles for c in b.calls]
    assert order == [*(f"s{i}" for i in range(5)), "x" * 400, "s0"]


async def test_bundles_stay_under_a_small_grpc_message_limit() -> None:
    # Each call is 60 % of a 64 KiB limit (and each answer echoes its request id): two in one
    # message would be refused by gRPC and end the stream.
    async with serving(limit=64 * 1024) as (_, servicer, stream):
        calls = [
            batcher_pb2.SubmitRequest(
                target="t", item=common_pb2.WorkItem(request_id=f"{i:02d}" + "x" * 39_000)
            )
            for i in range(6)
        ]
        replies = await asyncio.gather(*(stream.call(c, timeout=5) for c in calls))
    assert [r.result.request_id[:2] for r in replies] == [f"{i:02d}" for i in range(6)]
    assert servicer.messages_in >= 6 and servicer.messages_out >= 6


async def test_an_error_comes_back_inline_and_the_stream_keeps_serving(served) -> None:
    _, _, stream = served
    bad = await stream.call(submit("x", target="bad"), timeout=5)
    assert bad.result.error_code == 3 and "refused" in bad.result.error_message
    ok = await stream.call(submit("y"), timeout=5)
    assert ok.result.request_id == "y" and not ok.result.error_code


async def test_each_message_is_counted_under_the_unary_method_name(served) -> None:
    _, _, stream = served
    before = metrics.REQUESTS.labels("stream-test", "Submit", "t", "OK")._value.get()
    await asyncio.gather(*(stream.call(submit(f"m{i}"), timeout=5) for i in range(5)))
    after = metrics.REQUESTS.labels("stream-test", "Submit", "t", "OK")._value.get()
    assert after - before == 5


async def test_a_deadline_ends_one_call_and_its_late_answer_is_dropped(served) -> None:
    _, _, stream = served
    with pytest.raises(DeadlineExceeded, match="deadline of 50 ms"):
        await stream.call(submit("slow", delay_ms=300), timeout=0.05)
    assert (await stream.call(submit("next"), timeout=5)).result.request_id == "next"
    await asyncio.sleep(0.3)  # the late answer for "slow" arrives and finds no caller
    assert (await stream.call(submit("after"), timeout=5)).result.request_id == "after"


async def test_a_draining_server_answers_what_it_took_and_new_calls_go_elsewhere(
    served,
) -> None:
    server, servicer, stream = served
    taken = [asyncio.ensure_future(stream.call(submit(f"d{i}", 200), timeout=5)) for i in range(5)]
    await asyncio.sleep(0.05)  # the five are on the server
    servicer.draining.set()
    stopped = asyncio.ensure_future(server.stop(5))
    replies = await asyncio.gather(*taken)
    assert [r.result.request_id for r in replies] == [f"d{i}" for i in range(5)]
    # The closing notice moved new calls off the old stream; the server takes no new one.
    with pytest.raises(streams.PeerGone):
        await stream.call(submit("late"), timeout=5)
    await asyncio.wait_for(stopped, 5)
    assert "late" not in servicer.ran


async def test_a_server_that_dies_fails_its_calls_peer_gone_instead_of_hanging(
    served,
) -> None:
    server, _, stream = served
    pending = [
        asyncio.ensure_future(stream.call(submit(f"k{i}", 2000), timeout=10)) for i in range(3)
    ]
    await asyncio.sleep(0.05)
    await server.stop(0)
    for call in pending:
        with pytest.raises(streams.PeerGone):
            await asyncio.wait_for(call, 5)


class EndsEarly(Delayed):
    """Answers the calls of the first message it reads, then ends the stream with OK."""

    async def SubmitStream(
        self, requests: AsyncIterator[batcher_pb2.SubmitCalls], context: object
    ) -> AsyncIterator[batcher_pb2.SubmitAnswers]:
        async for message in requests:
            yield batcher_pb2.SubmitAnswers(answers=[await self._one(c) for c in message.calls])
            return


async def test_a_stream_ended_under_a_write_fails_the_unsent_calls_peer_gone() -> None:
    # grpc.aio reports a write after the peer ended the call as INTERNAL "Internal error from
    # Core" (grpc/grpc#36066), in place of the peer's OK. Those calls never left: they fail
    # PeerGone (the caller tries another replica), as after a drain; never with an INTERNAL.
    outcomes: list[str] = []
    async with serving(servicer=EndsEarly()) as (_, _, stream):

        async def one(request_id: str) -> None:
            try:
                await stream.call(submit(request_id + "x" * 1000), timeout=5)
                outcomes.append("answered")
            except streams.PeerGone as gone:
                outcomes.append(str(gone))

        for round_ in range(20):
            calls = []
            for i in range(100):  # one write each: the stream ends while they go out
                calls.append(asyncio.ensure_future(one(f"{round_}-{i}")))
                await asyncio.sleep(0)
            await asyncio.gather(*calls)  # an RPCError (the INTERNAL) would raise here
    assert "answered" in outcomes
    assert any("ended the stream under a write" in o for o in outcomes), set(outcomes)


class RouterEndsEarly(router_pb2_grpc.RouterServicer):
    """Answers the first request of an InferStream, then ends the stream with OK."""

    async def InferStream(
        self, requests: AsyncIterator[router_pb2.InferRequest], context: object
    ) -> AsyncIterator[router_pb2.InferResponse]:
        async for request in requests:
            yield router_pb2.InferResponse(request_id=request.request_id, model=request.model)
            return


async def test_a_client_stream_ended_under_a_write_fails_its_requests_unavailable() -> None:
    # The same grpc.aio INTERNAL, seen by a user's InferStream: the router ended the stream
    # (a drain), so the requests not answered are UNAVAILABLE (send again), never INTERNAL.
    server, port = await started(
        lambda s: router_pb2_grpc.add_RouterServicer_to_server(RouterEndsEarly(), s),
        "infermesh.v1.Router",
    )
    codes: list[str] = []

    async def one(stream: InferStream, text: str) -> None:
        try:
            await stream.infer("m", texts=[text], timeout=5)
            codes.append("OK")
        except RPCError as err:
            codes.append(err.status.name)

    try:
        async with AsyncClient(f"127.0.0.1:{port}") as client:
            for round_ in range(20):
                stream = client.stream()
                calls = []
                for i in range(50):
                    calls.append(asyncio.ensure_future(one(stream, f"{round_}-{i}" + "x" * 1000)))
                    await asyncio.sleep(0)
                await asyncio.gather(*calls)
                await stream.close()
    finally:
        await server.stop(0)
    assert "OK" in codes and "UNAVAILABLE" in codes
    assert set(codes) == {"OK", "UNAVAILABLE"}, collections.Counter(codes)
