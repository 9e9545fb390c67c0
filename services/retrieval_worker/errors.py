"""Typed errors of the retrieval worker's storage and search engine.

``shared/errors.py`` (the one table from exception to gRPC status) did not exist when this
engine was written, so the three classes it needs live here. They subclass the builtin
``ValueError`` / ``LookupError`` so callers that only know the builtins still catch them; when
``shared.errors`` lands, these become re-exports of its classes.
"""

from __future__ import annotations


class RetrievalError(Exception):
    """Root of every error the retrieval engine raises on purpose."""


class InvalidArgument(RetrievalError, ValueError):
    """Bad input from the caller (shape, dtype, NaN, k, nprobe); maps to INVALID_ARGUMENT."""


class NotFound(RetrievalError, LookupError):
    """An id, block or collection that does not exist; maps to NOT_FOUND."""


class FailedPrecondition(RetrievalError, ValueError):
    """The collection is not in a state that allows the call (untrained, dropped, closed)."""
