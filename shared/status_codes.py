"""gRPC status codes by their numeric value (results carry codes as ints inside batches)."""

from __future__ import annotations

import grpc

from shared.errors import RPCError

BY_VALUE: dict[int, grpc.StatusCode] = {c.value[0]: c for c in grpc.StatusCode}


def code_value(code: grpc.StatusCode) -> int:
    """The wire number of a status code."""
    return int(code.value[0])


def error_from(code: int, message: str) -> RPCError:
    """The exception for a per-item error carried inside a batch result."""
    return RPCError(message, BY_VALUE.get(code, grpc.StatusCode.INTERNAL))
