"""Row joining for BERT-style backends: items (texts or input_ids) -> one padded batch -> back.

A batch carries items of several requests; each item is text (tokenized here) or
pre-tokenized ``input_ids``/``attention_mask``. Their rows run as one padded batch and the
outputs are cut back into per-item slices in the same order. The onnx and torch backends both
use this, so the two agree on validation and on where each item's rows land.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from services.inference_worker.backends import Item
from services.inference_worker.text import TextEncoder
from shared.errors import InvalidArgument

__all__ = ["Rows", "batch_rows", "join_rows", "split_rows"]

#: One item's ``(input_ids, attention_mask)``, both int64 ``[rows, seq]``.
Rows = tuple[np.ndarray, np.ndarray]


def batch_rows(
    items: Sequence[Item], encoder: TextEncoder | None, max_seq_length: int
) -> list[Rows]:
    """Every item's rows, in order: texts tokenized, pre-tokenized tensors checked.

    All texts of the batch go to the tokenizer in one call: it spreads a batch over the
    cores and pays its per-call cost once, where one call per item (a batch of single
    sentences) made tokenizing cost more than a GPU forward pass.
    """
    texts = [t for item in items for t in item.texts]
    if texts:
        if encoder is None:
            raise InvalidArgument("this model has no tokenizer; send input_ids")
        text_ids, text_mask = encoder.encode(texts)
    parts: list[Rows] = []
    row = 0
    for item in items:
        if item.texts:
            n = len(item.texts)
            # Rows padded to the batch's longest text: join_rows pads to that width anyway.
            parts.append((text_ids[row : row + n], text_mask[row : row + n]))
            row += n
        else:
            parts.append(_tensor_rows(item, max_seq_length))
    return parts


def _tensor_rows(item: Item, max_seq_length: int) -> Rows:
    ids = item.inputs["input_ids"]
    mask = item.inputs.get("attention_mask")
    if mask is None:
        mask = np.ones_like(ids)
    if ids.shape != mask.shape:
        raise InvalidArgument(
            f"input_ids {list(ids.shape)} and attention_mask {list(mask.shape)} differ"
        )
    if ids.shape[1] > max_seq_length:
        raise InvalidArgument(
            f"sequence length {ids.shape[1]} exceeds the model's {max_seq_length}"
        )
    return ids, mask


def join_rows(parts: Sequence[Rows]) -> Rows:
    """Stack every item's rows into one batch, right-padded (mask 0) to the longest row."""
    seq = max(ids.shape[1] for ids, _ in parts)
    ids = np.zeros((sum(p[0].shape[0] for p in parts), seq), dtype=np.int64)
    mask = np.zeros_like(ids)
    row = 0
    for p_ids, p_mask in parts:
        n, s = p_ids.shape
        ids[row : row + n, :s] = p_ids
        mask[row : row + n, :s] = p_mask
        row += n
    return ids, mask


def split_rows(
    outputs: Mapping[str, np.ndarray], parts: Sequence[Rows]
) -> list[dict[str, np.ndarray]]:
    """Cut batch outputs (first dimension = rows) back into one dict per item, in order."""
    results = []
    row = 0
    for p_ids, _ in parts:
        n = p_ids.shape[0]
        results.append({name: out[row : row + n] for name, out in outputs.items()})
        row += n
    return results
