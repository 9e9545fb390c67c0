"""Conversion between numpy arrays and the wire Tensor, with the checks every RPC applies.

Vectors travel as raw little-endian bytes with a KServe v2 dtype name and a shape; text
travels as BYTES tensors (one bytes entry per element). Every decode validates dtype, shape
and size against the bytes before anything else touches them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from shared.errors import InvalidArgument
from shared.pb.infermesh.v1 import common_pb2

# KServe v2 datatype name <-> numpy dtype (little-endian on the wire).
DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
_NAMES = {dt.newbyteorder("="): name for name, dt in DTYPES.items()}

MAX_RANK = 8


def dtype_name(dtype: np.dtype) -> str:
    """The KServe v2 name of a numpy dtype (InvalidArgument if the wire has none)."""
    if dtype.kind in ("U", "S", "O"):
        return "BYTES"
    try:
        return _NAMES[dtype.newbyteorder("=")]
    except KeyError:
        raise InvalidArgument(f"dtype {dtype} has no wire representation") from None


def check_shape(shape: Iterable[int], what: str, max_elements: int) -> tuple[int, ...]:
    """Validate a shape: rank, no negative dims, element count under the limit."""
    dims = tuple(int(d) for d in shape)
    if len(dims) > MAX_RANK:
        raise InvalidArgument(f"{what}: rank {len(dims)} exceeds {MAX_RANK}")
    if any(d < 0 for d in dims):
        raise InvalidArgument(f"{what}: shape {list(dims)} has a negative dimension")
    count = math.prod(dims)
    if count > max_elements:
        raise InvalidArgument(f"{what}: {count} elements exceed the limit of {max_elements}")
    return dims


def to_numpy(t: common_pb2.Tensor, max_elements: int = 1 << 26) -> np.ndarray:
    """Decode a wire tensor, checking that dtype, shape and byte length agree."""
    what = f"tensor {t.name!r}" if t.name else "tensor"
    shape = check_shape(t.shape, what, max_elements)
    count = math.prod(shape)
    if t.dtype == "BYTES":
        if len(t.strings) != count:
            raise InvalidArgument(
                f"{what}: BYTES shape {list(shape)} needs {count} elements, got {len(t.strings)}"
            )
        return np.array(list(t.strings), dtype=object).reshape(shape)
    dtype = DTYPES.get(t.dtype)
    if dtype is None:
        raise InvalidArgument(
            f"{what}: unknown dtype {t.dtype!r} (expected one of {', '.join([*DTYPES, 'BYTES'])})"
        )
    expected = count * dtype.itemsize
    if len(t.data) != expected:
        raise InvalidArgument(
            f"{what}: {t.dtype} shape {list(shape)} needs {expected} bytes, got {len(t.data)}"
        )
    return np.frombuffer(t.data, dtype=dtype).reshape(shape)


def from_numpy(name: str, array: np.ndarray) -> common_pb2.Tensor:
    """Encode an array as a wire tensor (object/str arrays become BYTES)."""
    kind = dtype_name(array.dtype)
    if kind == "BYTES":
        items = [x if isinstance(x, bytes) else str(x).encode() for x in array.reshape(-1)]
        return common_pb2.Tensor(name=name, dtype="BYTES", shape=array.shape, strings=items)
    data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
    return common_pb2.Tensor(name=name, dtype=kind, shape=array.shape, data=data)


def require_finite(name: str, array: np.ndarray) -> None:
    """Reject NaN/Inf in float inputs where they would poison a result (search, pooling)."""
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise InvalidArgument(f"tensor {name!r} contains NaN or Inf")
