"""Errors the retrieval engine raises: the mesh-wide classes of ``shared.errors``.

Re-exported here so the engine's modules import one place; ``shared/errors.py`` maps each of
them to a gRPC status (INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION).
"""

from __future__ import annotations

from shared.errors import FailedPrecondition, InfermeshError, InvalidArgument, NotFound

RetrievalError = InfermeshError

__all__ = ["FailedPrecondition", "InvalidArgument", "NotFound", "RetrievalError"]
