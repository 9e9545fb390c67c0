"""The echo backend: returns inputs unchanged (wiring tests, overhead and batching benchmarks).

An optional synthetic cost (``base_ms + per_item_ms * n`` per batch) makes it behave like a
model whose batches get cheaper per item as they grow, so the batching benchmark runs fast.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from services.inference_worker.backends import Item


class EchoBackend:
    """Outputs = inputs (INPUTn -> OUTPUTn); texts come back as the BYTES tensor TEXT."""

    def __init__(self, parameters: dict[str, Any]) -> None:
        self.base_ms = float(parameters.get("base_ms", 0.0))
        self.per_item_ms = float(parameters.get("per_item_ms", 0.0))
        # With a synthetic cost the batch sleeps, so keep it off the event loop.
        self.blocking = self.base_ms > 0 or self.per_item_ms > 0

    def execute(self, items: list[Item]) -> list[dict[str, np.ndarray]]:
        if self.blocking:
            time.sleep((self.base_ms + self.per_item_ms * len(items)) / 1000.0)
        out = []
        for item in items:
            result = {_output_name(name): array for name, array in item.inputs.items()}
            if item.texts:
                result["TEXT"] = np.array([t.encode() for t in item.texts], dtype=object)
            out.append(result)
        return out

    def close(self) -> None:
        pass


def _output_name(input_name: str) -> str:
    return "OUTPUT" + input_name[5:] if input_name.startswith("INPUT") else input_name
