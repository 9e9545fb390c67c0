"""Turn sentences into the ``input_ids`` / ``attention_mask`` tensors the BERT graph takes."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

__all__ = ["TextEncoder"]


class TextEncoder:
    """Tokenizes text exactly as sentence-transformers does for the model in ``model_dir``.

    Reads ``tokenizer.json`` and ``sentence_bert_config.json`` (``max_seq_length``,
    ``do_lower_case``). By default each batch is padded to its longest member; with
    ``fixed_length`` every row is padded or truncated to that many tokens (benchmarks want
    stable shapes). Padding is configured once here, not per call, because the underlying
    Rust tokenizer is shared state and callers may encode from several threads.
    """

    def __init__(self, model_dir: Path, fixed_length: int | None = None) -> None:
        st_config_path = model_dir / "sentence_bert_config.json"
        st_config: dict[str, Any] = (
            json.loads(st_config_path.read_text()) if st_config_path.is_file() else {}
        )
        self.max_seq_length: int = int(st_config.get("max_seq_length", 256))
        self.do_lower_case: bool = bool(st_config.get("do_lower_case", False))
        if fixed_length is not None and not 2 <= fixed_length:
            # [CLS] and [SEP] alone take two positions.
            raise ValueError(f"fixed_length must be >= 2, got {fixed_length}")
        self.fixed_length = fixed_length

        self._tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        # tokenizer.json of this model ships with fixed padding/truncation at 128; replace both
        # so only sentence-transformers' max_seq_length (or the requested fixed length) applies.
        length = fixed_length if fixed_length is not None else self.max_seq_length
        self._tokenizer.enable_truncation(max_length=length)
        pad_id = self._tokenizer.token_to_id("[PAD]")
        self._tokenizer.enable_padding(
            pad_id=0 if pad_id is None else pad_id, pad_token="[PAD]", length=fixed_length
        )

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(input_ids, attention_mask)``, both int64 of shape ``[len(texts), seq]``."""
        if isinstance(texts, str):
            # A bare str is a Sequence[str] of characters; almost certainly a caller mistake.
            raise TypeError("encode() takes a sequence of strings, not a single string")
        if not texts:
            raise ValueError("encode() needs at least one text")
        # sentence-transformers strips each text (and lowercases when configured) before
        # tokenizing; mirroring it keeps ids identical to the reference model.
        prepared = [t.strip().lower() if self.do_lower_case else t.strip() for t in texts]
        encodings = self._tokenizer.encode_batch(prepared)
        input_ids = np.array([e.ids for e in encodings], dtype=np.int64)
        attention_mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        return input_ids, attention_mask
