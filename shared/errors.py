"""The one exception hierarchy of infermesh and the one table from exception to gRPC status.

Every service raises these; one server interceptor (``shared.grpc.ErrorInterceptor``) turns
them into a gRPC status with the message, so callers see a defined code and a message that
names the problem. Errors that arrive from another service over gRPC are wrapped once into
``RPCError`` carrying the remote status, so they pass through a hop unchanged.
"""

from __future__ import annotations

import grpc


class InfermeshError(Exception):
    """Root of every error infermesh raises on purpose."""

    status: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(InfermeshError, ValueError):
    """The request is malformed: wrong dtype, shape, size, or a missing/unknown field."""

    status = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(InfermeshError, LookupError):
    """A named model, pipeline, collection or id does not exist."""

    status = grpc.StatusCode.NOT_FOUND


class AlreadyExists(InfermeshError):
    """Something with that name exists already."""

    status = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(InfermeshError):
    """The target is not in a state that allows the operation (e.g. collection untrained)."""

    status = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(InfermeshError):
    """A bounded queue is full; the caller should back off."""

    status = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(InfermeshError):
    """The request's deadline passed before it could be served."""

    status = grpc.StatusCode.DEADLINE_EXCEEDED


class Unavailable(InfermeshError):
    """No healthy worker (or dependency) can take the request now; safe to retry later."""

    status = grpc.StatusCode.UNAVAILABLE


class Cancelled(InfermeshError):
    """The caller went away."""

    status = grpc.StatusCode.CANCELLED


class Unimplemented(InfermeshError):
    """The operation exists in the protocol but this service does not offer it."""

    status = grpc.StatusCode.UNIMPLEMENTED


class RPCError(InfermeshError):
    """A call to another service failed; carries that service's status through this hop."""

    def __init__(self, message: str, status: grpc.StatusCode) -> None:
        super().__init__(message)
        self.status = status

    @classmethod
    def from_hop(cls, message: str, status: grpc.StatusCode, hop: str) -> RPCError:
        """An error another service answered, its message prefixed with that hop's name."""
        # A message already prefixed by a deeper hop keeps its origin; only add ours once.
        if hop and not message.startswith("["):
            message = f"[{hop}] {message}"
        return cls(message, status)

    @classmethod
    def from_aio(cls, err: grpc.aio.AioRpcError, hop: str) -> RPCError:
        """Wrap a grpc.aio error once, keeping its code and naming the hop it came from."""
        return cls.from_hop(err.details() or err.code().name, err.code(), hop)


# The one table: exception type -> gRPC status. Checked in order; first match wins.
STATUS_TABLE: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (InfermeshError, grpc.StatusCode.INTERNAL),  # subclasses carry their own .status
    (TimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT),
    (LookupError, grpc.StatusCode.NOT_FOUND),
    (MemoryError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (NotImplementedError, grpc.StatusCode.UNIMPLEMENTED),
)


def status_of(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status an exception maps to (INTERNAL for anything not in the table)."""
    if isinstance(exc, InfermeshError):
        return exc.status
    for kind, code in STATUS_TABLE:
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


def message_of(exc: BaseException) -> str:
    """A one-line message for the caller: the error's own text, or its type when it has none."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return text or type(exc).__name__
