"""Small helpers tests import (kept out of conftest so they are plain imports)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from shared.cli.procs import Child, free_port, start_nats


async def eventually_sync(check: Callable[[], object], timeout: float = 5.0) -> None:
    """Poll a synchronous check until it is truthy; fail after timeout."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


async def eventually(
    check: Callable[[], Awaitable[Any]],
    timeout: float = 10.0,
    interval: float = 0.05,
    what: str = "condition",
) -> Any:
    """Await check() until it returns a truthy value without raising AssertionError."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            value = await check()
            if value:
                return value
        except AssertionError as exc:
            last = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s") from last
        await asyncio.sleep(interval)


class NatsServer:
    """A nats-server (JetStream) on a free loopback port, restartable on the same port."""

    def __init__(self, data_dir: Path, extra_conf: str = "") -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.extra_conf = extra_conf
        self.child: Child | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.child = start_nats(
            self.data_dir, self.port, self.data_dir / "logs", self.extra_conf
        )

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop(10)
            self.child = None

    def kill(self) -> None:
        if self.child is not None:
            self.child.signal(9)
            self.child.proc.wait()
            self.child = None
