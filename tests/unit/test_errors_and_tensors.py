"""The error table and the tensor codec: the checks every RPC relies on."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from shared.errors import (
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    RPCError,
    Unavailable,
    message_of,
    status_of,
)
from shared.pb.infermesh.v1 import common_pb2
from shared.tensors import DTYPES, from_numpy, to_numpy


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (InvalidArgument("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (NotFound("x"), grpc.StatusCode.NOT_FOUND),
        (ResourceExhausted("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (DeadlineExceeded("x"), grpc.StatusCode.DEADLINE_EXCEEDED),
        (Unavailable("x"), grpc.StatusCode.UNAVAILABLE),
        (RPCError("x", grpc.StatusCode.ABORTED), grpc.StatusCode.ABORTED),
        (ValueError("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (KeyError("x"), grpc.StatusCode.NOT_FOUND),
        (TimeoutError(), grpc.StatusCode.DEADLINE_EXCEEDED),
        (RuntimeError("boom"), grpc.StatusCode.INTERNAL),
    ],
)
def test_every_exception_maps_to_a_defined_status_never_unknown(
    exc: BaseException, code: grpc.StatusCode
) -> None:
    assert status_of(exc) == code


def test_error_messages_are_one_line_and_never_empty() -> None:
    assert message_of(ValueError("first line\nsecond")) == "first line"
    assert message_of(TimeoutError()) == "TimeoutError"


wire_dtypes = st.sampled_from(sorted(k for k in DTYPES if k != "BOOL"))


@given(
    dtype=wire_dtypes,
    shape=hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=5),
    data=st.data(),
)
def test_tensors_round_trip_through_the_wire_format_bit_exactly(
    dtype: str, shape: tuple[int, ...], data: st.DataObject
) -> None:
    array = data.draw(hnp.arrays(DTYPES[dtype], shape))
    back = to_numpy(from_numpy("x", array))
    assert back.shape == array.shape
    assert back.dtype == array.dtype.newbyteorder("<")
    assert back.tobytes() == np.ascontiguousarray(array).tobytes()


def test_text_tensors_round_trip_as_bytes() -> None:
    t = from_numpy("t", np.array(["héllo", "wörld"], dtype=object))
    assert t.dtype == "BYTES"
    assert list(to_numpy(t)) == ["héllo".encode(), "wörld".encode()]


def test_a_tensor_whose_bytes_disagree_with_its_shape_is_rejected_with_both_numbers() -> None:
    t = common_pb2.Tensor(name="x", dtype="FP32", shape=[2, 3], data=b"\0" * 20)
    with pytest.raises(InvalidArgument, match="needs 24 bytes, got 20"):
        to_numpy(t)


def test_unknown_dtypes_negative_dims_and_huge_shapes_are_rejected() -> None:
    with pytest.raises(InvalidArgument, match="unknown dtype 'FLOAT'"):
        to_numpy(common_pb2.Tensor(name="x", dtype="FLOAT", shape=[1], data=b"\0" * 4))
    with pytest.raises(InvalidArgument, match="negative"):
        to_numpy(common_pb2.Tensor(name="x", dtype="FP32", shape=[-1], data=b""))
    with pytest.raises(InvalidArgument, match="exceed the limit"):
        to_numpy(common_pb2.Tensor(name="x", dtype="FP32", shape=[1 << 20, 1 << 20]))
