"""Checks of a request against a model's declared inputs, shared by router and workers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from shared.errors import InvalidArgument
from shared.events import ModelSpec
from shared.tensors import dtype_name

#: Largest magnitude a stored vector element may have: beyond it squared norms and distances
#: overflow float32 inside FAISS (k-means then aborts the process on an invalid assignment).
MAX_VECTOR_ABS = 1e15

MAX_TEXTS = 1024
MAX_TEXT_CHARS = 100_000


def check_texts(spec: ModelSpec, texts: Sequence[str]) -> None:
    """Text is accepted only by text models, within count and length limits."""
    if not texts:
        return
    if not spec.accepts_text:
        raise InvalidArgument(f"model {spec.name!r} does not accept text; send tensors")
    if len(texts) > MAX_TEXTS:
        raise InvalidArgument(f"{len(texts)} texts exceed the limit of {MAX_TEXTS} per request")
    for i, text in enumerate(texts):
        if len(text) > MAX_TEXT_CHARS:
            raise InvalidArgument(
                f"text {i} has {len(text)} characters; the limit is {MAX_TEXT_CHARS}"
            )


def check_inputs(spec: ModelSpec, inputs: Mapping[str, np.ndarray], texts: Sequence[str]) -> int:
    """Validate named tensors (batch dim first) against the spec; return the row count."""
    check_texts(spec, texts)
    if not inputs and not texts:
        raise InvalidArgument(f"request for model {spec.name!r} has neither inputs nor texts")
    declared = {t.name: t for t in spec.inputs}
    rows = -1
    for name, array in inputs.items():
        want = declared.get(name)
        if want is None:
            raise InvalidArgument(
                f"model {spec.name!r} has no input {name!r} "
                f"(inputs: {', '.join(declared) or 'none'})"
            )
        got = dtype_name(array.dtype)
        if got != want.dtype:
            raise InvalidArgument(f"input {name!r} must be {want.dtype}, got {got}")
        if array.ndim != len(want.shape) + 1:
            raise InvalidArgument(
                f"input {name!r} must have shape [batch, {', '.join(map(str, want.shape))}], "
                f"got {list(array.shape)}"
            )
        for axis, (have, need) in enumerate(zip(array.shape[1:], want.shape, strict=True)):
            if need != -1 and have != need:
                raise InvalidArgument(
                    f"input {name!r} dimension {axis + 1} must be {need}, got {have}"
                )
        if array.shape[0] == 0:
            raise InvalidArgument(f"input {name!r} has an empty batch dimension")
        if rows not in (-1, array.shape[0]):
            raise InvalidArgument("inputs disagree on the batch dimension")
        rows = array.shape[0]
    if inputs and not texts:
        missing = set(declared) - set(inputs)
        if missing:
            raise InvalidArgument(f"missing inputs for model {spec.name!r}: {sorted(missing)}")
    return rows if rows > 0 else len(texts)
