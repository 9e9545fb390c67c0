"""gRPC status codes by their numeric value (results carry codes as ints inside batches)."""

from __future__ import annotations

import grpc

from shared.errors import RPCError, message_of, status_of

BY_VALUE: dict[int, grpc.StatusCode] = {c.value[0]: c for c in grpc.StatusCode}


def code_value(code: grpc.StatusCode) -> int:
    """The wire number of a status code."""
    return int(code.value[0])


def name_of(value: int) -> str:
    """The name of a wire status number ("UNKNOWN" for a number gRPC does not define)."""
    code = BY_VALUE.get(value)
    return code.name if code is not None else "UNKNOWN"


def error_fields(exc: BaseException) -> dict[str, int | str]:
    """``error_code`` and ``error_message`` of an answer that carries exc inline."""
    return {"error_code": code_value(status_of(exc)), "error_message": message_of(exc)}


def error_from(code: int, message: str, hop: str = "") -> RPCError:
    """The exception for an error carried inside an answer (a batch result, a stream reply).

    With ``hop``, the message names the service it came from, as ``RPCError.from_aio`` does.
    """
    return RPCError.from_hop(message, BY_VALUE.get(code, grpc.StatusCode.INTERNAL), hop)
