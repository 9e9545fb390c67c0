"""Fixtures shared by every test layer: a real nats-server from the wheel, polling helpers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.cli.procs import Child, free_port, start_nats

ROOT = Path(__file__).resolve().parent.parent


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


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A fresh nats-server per test, torn down in finally."""
    server = NatsServer(tmp_path / "nats-data")
    server.start()
    try:
        yield server
    finally:
        server.stop()
