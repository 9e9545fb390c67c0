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
from services.inference_worker.backends.batching import batch_rows, join_rows, split_rows
from services.inference_worker.text import TextEncoder
from shared.errors import FailedPrecondition

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
        # ORT's pool threads spin after each run by default; in a mesh they spin on the cores
        # the router and batcher need to hand over the next batch.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
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

    def execute(self, items: list[Item]) -> list[dict[str, np.ndarray]]:
        parts = batch_rows(items, self.encoder, self.max_seq_length)
        ids, mask = join_rows(parts)
        feeds = {"input_ids": ids, "attention_mask": mask}
        outputs = self.session.run(self.output_names, {k: feeds[k] for k in self.input_names})
        return split_rows(dict(zip(self.output_names, outputs, strict=True)), parts)

    def close(self) -> None:
        pass
