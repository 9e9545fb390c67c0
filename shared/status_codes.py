"""gRPC status codes by their numeric value (results carry codes as ints inside batches),
and which statuses came from the transport rather than from a peer's logic."""

from __future__ import annotations

import grpc

from shared.errors import RPCError, message_of, status_of

BY_VALUE: dict[int, grpc.StatusCode] = {c.value[0]: c for c in grpc.StatusCode}

#: Trailing metadata key on every error status a mesh service sets itself (its name): an
#: error without it came from the transport or gRPC core, not from the peer's logic.
ORIGIN_KEY = "infermesh-origin"



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


#: What grpc.aio reports when a write fails on a call its peer had already ended. The peer's
#: own status (OK after a drain) is overwritten, and the message written never left
#: (grpc/grpc#36066; upstream fix grpc/grpc#43486 is open).
CORE_WRITE_FAILED = "Internal error from Core"


def _no_origin(err: grpc.aio.AioRpcError) -> bool:
    return not any(key == ORIGIN_KEY for key, _ in err.trailing_metadata() or ())


def peer_ended_under_a_write(err: grpc.aio.AioRpcError) -> bool:
    """Whether a stream's INTERNAL is grpc.aio's own, for a write after the peer ended it."""
    return (
        err.code() == grpc.StatusCode.INTERNAL
        and err.details() == CORE_WRITE_FAILED
        and _no_origin(err)
    )


def peer_unreachable(err: grpc.aio.AioRpcError) -> bool:
    """Whether an UNAVAILABLE came from the transport (peer gone), not from the peer's logic."""
    return err.code() == grpc.StatusCode.UNAVAILABLE and _no_origin(err)
