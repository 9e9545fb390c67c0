"""The router's search coalescer: concurrent searches share Submits and get their own rows."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from services.router.coalesce import Coalescer, SearchKey
from shared.errors import DeadlineExceeded, ResourceExhausted
from shared.pb.infermesh.v1 import batcher_pb2, common_pb2
from shared.tensors import from_numpy, to_numpy

KEY = SearchKey("docs", 2, 4, False, 0)


class FakeBatcher:
    """Answers each Submit with ids = 100 * query value + rank, after a gate opens."""

    def __init__(self) -> None:
        self.submits: list[int] = []
        self.gate = asyncio.Event()
        self.fail: Exception | None = None

    async def send(
        self, key: SearchKey, queries: np.ndarray, timeout: float, rid: str
    ) -> batcher_pb2.SubmitResponse:
        self.submits.append(queries.shape[0])
        await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        ids = (queries[:, :1] * 100).astype(np.int64) + np.arange(key.k)
        hits = [common_pb2.Hit(id=int(i)) for i in ids.reshape(-1)]
        return batcher_pb2.SubmitResponse(
            result=common_pb2.WorkResult(
                outputs=[from_numpy("ids", ids), from_numpy("scores", ids.astype(np.float32))],
                hits=hits,
            ),
            batch_size=len(self.submits),
        )


def q(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)[:, None].repeat(3, axis=1)


async def test_a_lone_search_is_sent_at_once_and_answered_whole() -> None:
    fake = FakeBatcher()
    fake.gate.set()
    part = await Coalescer(fake.send).search(KEY, q(1, 2), timeout=1)
    assert fake.submits == [2]
    assert to_numpy(part.outputs[0]).tolist() == [[100, 101], [200, 201]]
    assert [h.id for h in part.hits] == [100, 101, 200, 201]


async def test_searches_arriving_while_the_slots_are_busy_share_the_next_submit() -> None:
    fake = FakeBatcher()
    co = Coalescer(fake.send, max_inflight=1)
    first = asyncio.create_task(co.search(KEY, q(1), timeout=1))
    await asyncio.sleep(0)
    later = [asyncio.create_task(co.search(KEY, q(v, v + 0.5), timeout=1)) for v in (2, 3, 4)]
    await asyncio.sleep(0)
    fake.gate.set()
    parts = await asyncio.gather(first, *later)
    assert fake.submits == [1, 6]  # one Submit for the first, one shared by the three others
    for v, part in zip((2, 3, 4), parts[1:], strict=True):
        ids = to_numpy(next(t for t in part.outputs if t.name == "ids"))
        assert ids[:, 0].tolist() == [100 * v, int(100 * (v + 0.5))]
        assert [h.id for h in part.hits][::2] == ids[:, 0].tolist()


async def test_searches_with_other_parameters_never_share_a_submit() -> None:
    fake = FakeBatcher()
    co = Coalescer(fake.send, max_inflight=1)
    tasks = [
        asyncio.create_task(co.search(key, q(1), timeout=1))
        for key in (KEY, KEY._replace(nprobe=8), KEY._replace(k=3))
    ]
    await asyncio.sleep(0)
    fake.gate.set()
    await asyncio.gather(*tasks)
    assert fake.submits == [1, 1, 1]


async def test_a_failed_submit_fails_every_search_that_shared_it() -> None:
    fake = FakeBatcher()
    fake.fail = ResourceExhausted("queue full")
    co = Coalescer(fake.send, max_inflight=1)
    tasks = [asyncio.create_task(co.search(KEY, q(v), timeout=1)) for v in (1, 2, 3)]
    await asyncio.sleep(0)
    fake.gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, ResourceExhausted) for r in results)


async def test_a_search_whose_caller_timed_out_is_not_sent() -> None:
    fake = FakeBatcher()
    co = Coalescer(fake.send, max_inflight=1)
    busy = asyncio.create_task(co.search(KEY, q(1), timeout=1))
    await asyncio.sleep(0)
    with pytest.raises(DeadlineExceeded, match="searching 'docs'"):
        await co.search(KEY, q(2), timeout=0.01)
    fake.gate.set()
    await busy
    await asyncio.sleep(0.01)
    assert fake.submits == [1]
