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

__all__ = ["Rows", "item_rows", "join_rows", "split_rows"]

#: One item's ``(input_ids, attention_mask)``, both int64 ``[rows, seq]``.
Rows = tuple[np.ndarray, np.ndarray]


def item_rows(item: Item, encoder: TextEncoder | None, max_seq_length: int) -> Rows:
    """Tokenize an item's texts, or check its pre-tokenized tensors; return its rows."""
    if item.texts:
        if encoder is None:
            raise InvalidArgument("this model has no tokenizer; send input_ids")
        return encoder.encode(item.texts)
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
