"""The onnx backend: ONNX Runtime (CPU by default, CUDA when present), with text preprocessing.

Text items are tokenized here (the model's own tokenizer, shipped beside the graph), so the
mesh takes text in and returns embeddings; pre-tokenized items (input_ids/attention_mask)
join the same batch. Rows of all items run as one padded batch and are split back per item.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from services.inference_worker.backends import Item
from services.inference_worker.text import TextEncoder
from shared.errors import FailedPrecondition, InvalidArgument

log = logging.getLogger(__name__)


def providers() -> list[str]:
    """CUDA first when this onnxruntime build has it, CPU always."""
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class OnnxBackend:
    """Runs an ONNX graph whose inputs are input_ids/attention_mask (BERT-style encoders)."""

    blocking = True

    def __init__(self, model_path: Path, parameters: dict[str, Any], threads: int) -> None:
        if not model_path.is_file():
            raise FailedPrecondition(
                f"{model_path} is missing; build it with `infermesh models build`"
            )
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(
            str(model_path), sess_options=options, providers=providers()
        )
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.max_seq_length = int(parameters.get("max_seq_length", 256))
        tokenizer_dir = model_path.parent
        self.encoder = (
            TextEncoder(tokenizer_dir) if (tokenizer_dir / "tokenizer.json").exists() else None
        )

    def _rows(self, item: Item) -> tuple[np.ndarray, np.ndarray]:
        if item.texts:
            if self.encoder is None:
                raise InvalidArgument("this model has no tokenizer; send input_ids")
            return self.encoder.encode(item.texts)
        ids = item.inputs["input_ids"]
        mask = item.inputs.get("attention_mask")
        if mask is None:
            mask = np.ones_like(ids)
        if ids.shape != mask.shape:
            raise InvalidArgument(
                f"input_ids {list(ids.shape)} and attention_mask {list(mask.shape)} differ"
            )
        if ids.shape[1] > self.max_seq_length:
            raise InvalidArgument(
                f"sequence length {ids.shape[1]} exceeds the model's {self.max_seq_length}"
            )
        return ids, mask

    def execute(self, items: list[Item]) -> list[dict[str, np.ndarray]]:
        parts = [self._rows(item) for item in items]
        seq = max(ids.shape[1] for ids, _ in parts)
        ids = np.zeros((sum(p[0].shape[0] for p in parts), seq), dtype=np.int64)
        mask = np.zeros_like(ids)
        row = 0
        for p_ids, p_mask in parts:
            n, s = p_ids.shape
            ids[row : row + n, :s] = p_ids
            mask[row : row + n, :s] = p_mask
            row += n
        feeds = {"input_ids": ids, "attention_mask": mask}
        outputs = self.session.run(self.output_names, {k: feeds[k] for k in self.input_names})
        results = []
        row = 0
        for p_ids, _ in parts:
            n = p_ids.shape[0]
            results.append(
                {
                    name: out[row : row + n]
                    for name, out in zip(self.output_names, outputs, strict=True)
                }
            )
            row += n
        return results

    def close(self) -> None:
        pass
