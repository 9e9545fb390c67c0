"""Model backends behind one Protocol: a backend runs one formed batch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from shared.errors import FailedPrecondition


class BackendUnavailable(FailedPrecondition):
    """A backend cannot run on this machine (its library is not installed, e.g. torch).

    A worker that loads its whole repository skips such a model with a warning instead of
    failing, so one optional backend never takes the others down.
    """


@dataclass
class Item:
    """One request's inputs inside a batch."""

    inputs: dict[str, np.ndarray] = field(default_factory=dict)
    texts: list[str] = field(default_factory=list)


class Backend(Protocol):
    """Runs a batch of items; returns each item's named outputs, in order."""

    #: Whether execute() blocks the thread (then it runs in a worker thread, not the loop).
    blocking: bool

    def execute(self, items: list[Item]) -> list[dict[str, np.ndarray]]: ...

    def close(self) -> None: ...
