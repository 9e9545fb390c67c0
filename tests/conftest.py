"""Fixtures shared by every test layer: a real nats-server from the wheel, polling helpers."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests_support import NatsServer

from shared import grpc_env

# gRPC reads these when it is first imported, and nothing above imports it: set here, they
# hold for every test module.
# gRPC's fork handlers can abort a child forked while other threads are inside gRPC (fault
# tests start processes under load). Children exec at once and need no handlers.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
# The services' gRPC core settings, so that services started in this process run as they do
# in their own.
grpc_env.apply()

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A fresh nats-server per test, torn down in finally."""
    server = NatsServer(tmp_path / "nats-data")
    server.start()
    try:
        yield server
    finally:
        server.stop()
