"""Dynamic batching in one target's queue, driven by a fake dispatch (no network)."""

from __future__ import annotations

import asyncio

import pytest
from tests_support import eventually_sync

from services.batcher.queue import Outcome, Pending, Policy, TargetQueue
from shared.errors import DeadlineExceeded, ResourceExhausted
from shared.pb.infermesh.v1 import common_pb2

INF = float("inf")


class Recorder:
    """A dispatch that records batches and answers after `hold` seconds (or on release)."""

    def __init__(self, hold: float = 0.0) -> None:
        self.batches: list[list[str]] = []
        self.hold = hold
        self.release = asyncio.Event()
        self.release.set()  # tests that need a busy worker clear it

    async def __call__(self, target: str, batch: list[Pending]) -> None:
        self.batches.append([p.item.request_id for p in batch])
        await self.release.wait()
        await asyncio.sleep(self.hold)
        for p in batch:
            if not p.future.done():
                p.future.set_result(Outcome(common_pb2.WorkResult(), 0.0, 0.0, "w", len(batch)))


def item(i: int) -> common_pb2.WorkItem:
    return common_pb2.WorkItem(request_id=str(i))


async def run_queue(policy: Policy, dispatch: Recorder, slots: int = 1) -> TargetQueue:
    q = TargetQueue("t", policy, dispatch, lambda: slots)
    task = asyncio.get_running_loop().create_task(q.run())
    q._runner = task  # type: ignore[attr-defined]  # kept alive for the test
    return q


async def test_a_full_batch_is_dispatched_without_waiting_for_the_delay() -> None:
    rec = Recorder()
    q = await run_queue(Policy(max_batch_size=4, max_delay_ms=10_000), rec)
    for i in range(4):
        q.submit(item(i), 0, INF)
    await eventually_sync(lambda: rec.batches == [["0", "1", "2", "3"]])


async def test_a_partial_batch_waits_at_most_the_max_delay_while_another_runs() -> None:
    rec = Recorder(hold=0.2)
    q = await run_queue(Policy(max_batch_size=8, max_delay_ms=30), rec, slots=2)
    q.submit(item(0), 0, INF)  # idle worker: goes at once, stays in flight for 0.2 s
    await eventually_sync(lambda: len(rec.batches) == 1)
    loop = asyncio.get_running_loop()
    start = loop.time()
    futures = [q.submit(item(i), 0, INF).future for i in range(1, 4)]
    await eventually_sync(lambda: len(rec.batches) == 2)
    waited = loop.time() - start
    await asyncio.gather(*futures)
    assert rec.batches[1] == ["1", "2", "3"]
    assert 0.025 <= waited < 0.15


async def test_an_idle_target_dispatches_without_waiting_for_the_delay() -> None:
    rec = Recorder()
    q = await run_queue(Policy(max_batch_size=8, max_delay_ms=10_000), rec)
    q.submit(item(0), 0, INF)
    await eventually_sync(lambda: rec.batches == [["0"]], timeout=1.0)


async def test_a_saturated_target_gathers_its_batch_even_with_nothing_in_flight() -> None:
    # Saturated, an idle slot is waiting for the callers of the batch that just ended: the
    # first of them must not leave alone and strand the rest behind a whole batch.
    rec = Recorder()
    q = await run_queue(Policy(max_batch_size=3, max_delay_ms=10_000, gather=True), rec)
    q.submit(item(0), 0, INF)
    await asyncio.sleep(0.05)
    assert rec.batches == []
    q.submit(item(1), 0, INF)
    q.submit(item(2), 0, INF)
    await eventually_sync(lambda: rec.batches == [["0", "1", "2"]])
    # ...and no longer than the delay.
    q.set_policy(Policy(max_batch_size=3, max_delay_ms=30, gather=True))
    loop = asyncio.get_running_loop()
    start = loop.time()
    await q.submit(item(3), 0, INF).future
    assert 0.025 <= loop.time() - start < 0.5
    assert rec.batches[1] == ["3"]


async def test_a_gathering_slot_waits_for_its_callers_and_takes_the_one_left_behind() -> None:
    # Saturated closed loop: the batch that just ended had 3 callers, and one request left
    # behind by an earlier batch has waited longer than the delay. The slot's next batch is
    # the straggler plus all 3 callers: leaving at the cap with the straggler and 2 of them
    # (or at once, for the straggler's age) would strand the third behind a whole batch.
    rec = Recorder()
    rec.release.clear()
    policy = Policy(max_batch_size=3, max_delay_ms=200, gather=True, limit=8)
    q = await run_queue(policy, rec)
    for i in range(3):
        q.submit(item(i), 0, INF)
    await eventually_sync(lambda: len(rec.batches) == 1)
    q.submit(item(99), 0, INF)  # the straggler, older than the delay when the slot frees
    await asyncio.sleep(0.25)
    rec.release.set()
    await eventually_sync(lambda: q.inflight == 0)
    for i in range(3, 6):  # the callers come back
        q.submit(item(i), 0, INF)
    await eventually_sync(lambda: len(rec.batches) == 2)
    assert rec.batches[1] == ["99", "3", "4", "5"]


async def test_gathering_slots_split_the_callers_evenly_whatever_the_cap() -> None:
    # Two slots ran batches of 3; the controller's cap is now 2 (its estimate of the callers
    # misses those in transit). A cap of 2 would leave two of the 6 callers behind each
    # cycle; each slot takes its even share instead.
    rec = Recorder()
    rec.release.clear()
    q = await run_queue(
        Policy(max_batch_size=3, max_delay_ms=200, gather=True, limit=8), rec, slots=2
    )
    for i in range(6):
        q.submit(item(i), 0, INF)
    await eventually_sync(lambda: len(rec.batches) == 2)
    q.set_policy(Policy(max_batch_size=2, max_delay_ms=200, gather=True, limit=8))
    rec.release.set()
    await eventually_sync(lambda: q.inflight == 0)
    for i in range(6, 12):  # the callers come back
        q.submit(item(i), 0, INF)
    await eventually_sync(lambda: len(rec.batches) == 4)
    assert rec.batches[2:] == [["6", "7", "8"], ["9", "10", "11"]]


async def test_a_preferred_size_is_dispatched_at_once() -> None:
    rec = Recorder()
    q = await run_queue(Policy(max_batch_size=8, max_delay_ms=10_000, preferred_sizes=(2,)), rec)
    q.submit(item(0), 0, INF)
    q.submit(item(1), 0, INF)
    await eventually_sync(lambda: rec.batches == [["0", "1"]])


async def test_higher_priority_requests_are_served_first() -> None:
    rec = Recorder(hold=0.0)
    rec.release.clear()
    q = await run_queue(Policy(max_batch_size=1, max_delay_ms=0), rec)
    q.submit(item(0), 0, INF)  # taken at once, blocks the only slot
    await eventually_sync(lambda: len(rec.batches) == 1)
    q.submit(item(1), 0, INF)
    q.submit(item(2), 5, INF)
    rec.release.set()
    await eventually_sync(lambda: len(rec.batches) == 3)
    assert rec.batches[1:] == [["2"], ["1"]]


async def test_busy_workers_make_the_next_batch_larger() -> None:
    rec = Recorder()
    rec.release.clear()
    q = await run_queue(Policy(max_batch_size=16, max_delay_ms=0), rec, slots=1)
    q.submit(item(0), 0, INF)
    await eventually_sync(lambda: len(rec.batches) == 1)
    for i in range(1, 6):
        q.submit(item(i), 0, INF)
    rec.release.set()
    await eventually_sync(lambda: len(rec.batches) == 2)
    assert rec.batches[1] == ["1", "2", "3", "4", "5"]


async def test_a_request_whose_deadline_passed_in_the_queue_is_never_executed() -> None:
    rec = Recorder()
    rec.release.clear()
    q = await run_queue(Policy(max_batch_size=1, max_delay_ms=0), rec)
    q.submit(item(0), 0, INF)
    await eventually_sync(lambda: len(rec.batches) == 1)
    loop = asyncio.get_running_loop()
    late = q.submit(item(1), 0, loop.time() + 0.01)
    await asyncio.sleep(0.03)
    rec.release.set()
    with pytest.raises(DeadlineExceeded, match="deadline passed"):
        await late.future
    assert ["1"] not in rec.batches


async def test_a_cancelled_caller_is_skipped() -> None:
    rec = Recorder()
    rec.release.clear()
    q = await run_queue(Policy(max_batch_size=1, max_delay_ms=0), rec)
    q.submit(item(0), 0, INF)
    await eventually_sync(lambda: len(rec.batches) == 1)
    gone = q.submit(item(1), 0, INF)
    gone.future.cancel()
    q.submit(item(2), 0, INF)
    rec.release.set()
    await eventually_sync(lambda: len(rec.batches) == 2)
    assert rec.batches[1] == ["2"]


async def test_a_full_queue_answers_resource_exhausted() -> None:
    rec = Recorder()
    rec.release.clear()
    q = await run_queue(Policy(max_batch_size=1, max_delay_ms=0, capacity=2), rec)
    q.submit(item(0), 0, INF)
    await eventually_sync(lambda: len(rec.batches) == 1)
    q.submit(item(1), 0, INF)
    q.submit(item(2), 0, INF)
    with pytest.raises(ResourceExhausted, match="full"):
        q.submit(item(3), 0, INF)


async def test_batch_sizes_count_samples_not_requests() -> None:
    rec = Recorder()
    rec.release.clear()
    q = await run_queue(Policy(max_batch_size=8, max_delay_ms=0), rec)
    q.submit(item(0), 0, INF)  # occupies the only slot
    await eventually_sync(lambda: len(rec.batches) == 1)
    for i in range(1, 5):  # four requests of 3 texts each = 12 samples
        q.submit(common_pb2.WorkItem(request_id=str(i), texts=["a", "b", "c"]), 0, INF)
    rec.release.set()
    await eventually_sync(lambda: len(rec.batches) == 3)
    assert rec.batches[1] == ["1", "2"]  # 6 samples; a third request would make 9 > 8
    assert rec.batches[2] == ["3", "4"]
