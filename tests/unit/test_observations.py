"""Batch observations leave a worker as one message per target per interval; both forms decode."""

from __future__ import annotations

import asyncio

import msgspec

from services.batcher.controller import BatchController
from services.inference_worker.handlers import Observations
from shared.events import BatchesObserved, BatchObserved, Event, batch_observed_decoder, encode


def observed(target: str, size: int) -> BatchObserved:
    return BatchObserved(target=target, size=size, queue_ms=1.0, exec_ms=2.0, worker="w")


class Sent:
    def __init__(self) -> None:
        self.messages: list[tuple[str, Event]] = []

    async def __call__(self, subject: str, event: Event) -> None:
        self.messages.append((subject, event))


async def test_batches_of_one_interval_go_out_as_one_message_per_target() -> None:
    sent = Sent()
    obs = Observations(sent, "w", interval_s=0.02)
    for size in (1, 2, 3):
        obs.add(observed("a", size))
    obs.add(observed("b", 7))
    await asyncio.sleep(0.06)
    by_subject = dict(sent.messages)
    assert set(by_subject) == {"infermesh.batch.observed.a", "infermesh.batch.observed.b"}
    many = by_subject["infermesh.batch.observed.a"]
    assert isinstance(many, BatchesObserved)
    assert [b.size for b in many.batches] == [1, 2, 3]
    assert by_subject["infermesh.batch.observed.b"] == observed("b", 7)  # a lone batch as itself


async def test_a_full_buffer_goes_at_once_without_waiting_for_the_interval() -> None:
    sent = Sent()
    obs = Observations(sent, "w", interval_s=60.0, max_batches=4)
    for size in range(4):
        obs.add(observed("a", size + 1))
    await asyncio.sleep(0)  # the publish task runs
    assert len(sent.messages) == 1
    assert [b.size for b in sent.messages[0][1].batches] == [1, 2, 3, 4]  # type: ignore[attr-defined]


async def test_the_controller_windows_every_batch_of_a_combined_message() -> None:
    controller = BatchController(None, "c", None, None)  # type: ignore[arg-type]
    wire = encode(
        BatchesObserved(target="m", worker="w", batches=(observed("m", 4), observed("m", 8)))
    )
    await controller.observe(batch_observed_decoder.decode(wire))
    await controller.observe(batch_observed_decoder.decode(encode(observed("m", 16))))
    assert [o.size for o in controller.window("m")] == [4, 8, 16]


def test_an_old_single_observation_still_decodes() -> None:
    wire = msgspec.msgpack.encode(observed("m", 3))
    assert batch_observed_decoder.decode(wire) == observed("m", 3)
