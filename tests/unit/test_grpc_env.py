"""Service processes load gRPC with shared/grpc_env.py's core settings, unless told otherwise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from shared import grpc_env

ROOT = Path(__file__).resolve().parents[2]
SHOW = "print(os.environ.get('GRPC_EXPERIMENTS', 'unset'))"


def run(code: str, **env: str) -> str:
    """What ``code`` prints in a fresh interpreter (GRPC_EXPERIMENTS only as given)."""
    base = {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env={**base, **env},
        capture_output=True, text=True, timeout=60, check=True,
    )
    return out.stdout.strip()


def test_a_service_process_turns_off_the_event_engine_io_before_grpc_loads() -> None:
    # What ``python -m services.<name>`` does first: the package, then grpc via its modules.
    assert run(f"import os, services, grpc; {SHOW}") == grpc_env.EXPERIMENTS


def test_the_users_own_grpc_experiments_win() -> None:
    got = run(f"import os, services, grpc; {SHOW}", GRPC_EXPERIMENTS="event_engine_client")
    assert got == "event_engine_client"


def test_apply_sets_nothing_once_grpc_is_loaded_because_it_would_not_take_effect() -> None:
    assert run(f"import os, grpc; from shared import grpc_env; grpc_env.apply(); {SHOW}") == "unset"
