"""gRPC status codes by their numeric value (results carry codes as ints inside batches)."""

from __future__ import annotations

import grpc

from shared.errors import RPCError

BY_VALUE: dict[int, grpc.StatusCode] = {c.value[0]: c for c in grpc.StatusCode}


def code_value(code: grpc.StatusCode) -> int:
    """The wire number of a status code."""
    return int(code.value[0])


def error_from(code: int, message: str, hop: str = "") -> RPCError:
    """The exception for an error carried inside an answer (a batch result, a stream reply).

    With ``hop``, the message names the service it came from, as ``RPCError.from_aio`` does.
    """
    status = BY_VALUE.get(code, grpc.StatusCode.INTERNAL)
    if hop and not message.startswith("["):
        message = f"[{hop}] {message}"
    return RPCError(message, status)
