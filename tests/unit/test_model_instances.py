"""A worker runs at most ``instances`` batches of one model at once; the rest wait their turn."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import numpy as np
import pytest
from tests_support import eventually_sync

from services.inference_worker.backends import Item
from services.inference_worker.handlers import InferenceWorkerServicer, Model
from services.inference_worker.repository import ModelConfig
from shared.errors import InvalidArgument
from shared.events import Event, TensorSpec
from shared.pb.infermesh.v1 import common_pb2, inference_worker_pb2
from shared.tensors import from_numpy


class HeldBackend:
    """Blocks every batch until released; records how many ran at the same time."""

    blocking = True

    def __init__(self) -> None:
        self.release = threading.Event()
        self.running = 0
        self.most = 0
        self.entered = 0
        self._lock = threading.Lock()

    def execute(self, items: list[Item]) -> list[dict[str, np.ndarray]]:
        with self._lock:
            self.running += 1
            self.entered += 1
            self.most = max(self.most, self.running)
        self.release.wait(10)
        with self._lock:
            self.running -= 1
        return [dict(item.inputs) for item in items]

    def close(self) -> None:
        pass


async def _nothing(subject: str, event: Event) -> None:
    pass


def _batch(i: int) -> inference_worker_pb2.ExecuteRequest:
    x = np.full((1, 4), i, dtype=np.float32)
    return inference_worker_pb2.ExecuteRequest(
        model="held",
        items=[common_pb2.WorkItem(request_id=f"r{i}", inputs=[from_numpy("INPUT0", x)])],
    )


@pytest.mark.parametrize("instances", [1, 2])
async def test_batches_beyond_the_models_instances_wait_and_then_all_answer(instances: int) -> None:
    backend = HeldBackend()
    config = ModelConfig(
        name="held",
        backend="echo",
        inputs=(TensorSpec(name="INPUT0", dtype="FP32", shape=(4,)),),
        outputs=(TensorSpec(name="INPUT0", dtype="FP32", shape=(4,)),),
        instances=instances,
    )
    servicer = InferenceWorkerServicer({"held": Model(config, backend)}, "w", _nothing)
    calls = [asyncio.create_task(servicer.Execute(_batch(i), None)) for i in range(4)]  # type: ignore[arg-type]
    await eventually_sync(lambda: backend.entered == instances)
    await asyncio.sleep(0.05)  # a batch that ignored the limit would have entered by now
    assert backend.entered == instances
    backend.release.set()
    replies = await asyncio.gather(*calls)
    assert backend.most == instances
    for i, reply in enumerate(replies):
        assert reply.results[0].request_id == f"r{i}"
        assert not reply.results[0].error_code


def test_a_model_with_no_instances_is_refused(tmp_path: Any) -> None:
    from services.inference_worker.repository import load_model

    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text('{"backend": "echo", "instances": 0}')
    with pytest.raises(InvalidArgument, match="instances must be >= 1"):
        load_model(folder)
