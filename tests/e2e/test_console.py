"""`infermesh console` in headless Chromium against a running process mesh."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.cli.procs import free_port
from shared.cli.supervisor import LocalMesh
from shared.client import Client

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="Debian's chromium is not installed (apt-get install chromium); `make test` "
    "installs it when run as root",
)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    mesh = LocalMesh(
        Path(tmp_path_factory.mktemp("mesh")),
        service_env={"inference-worker": {"INFERMESH_MODELS": "echo"}},
    )
    try:
        mesh.start()
        yield mesh
    finally:
        mesh.stop()


@pytest.fixture(scope="module")
def console_url(mesh: LocalMesh) -> Iterator[str]:
    from shared.cli.console import serve

    port = free_port()
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        task = loop.create_task(serve(mesh.nats_url, "127.0.0.1", port))
        loop.call_soon(ready.set)
        try:
            loop.run_until_complete(task)
        except asyncio.CancelledError:
            pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    ready.wait(10)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url + "api/state", timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    yield url
    for task in asyncio.all_tasks(loop):
        loop.call_soon_threadsafe(task.cancel)
    thread.join(10)


def _state(url: str) -> dict:
    import json

    return json.loads(urllib.request.urlopen(url + "api/state", timeout=2).read())


def test_the_console_shows_members_latency_and_a_batch_policy(
    mesh: LocalMesh, console_url: str, tmp_path: Path
) -> None:
    with Client(mesh.router_address) as client:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            for i in range(20):
                client.infer("echo", texts=[f"c{i}"])
            state = _state(console_url)
            if state["policies"] and state["latency"]:
                break
    assert state["policies"], "no batch policy was written for echo"
    policy = next(p for p in state["policies"] if p["target"] == "echo")

    profile = tmp_path / "chromium-profile"
    shot = tmp_path / "console.png"
    base = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-quic", f"--user-data-dir={profile}", "--virtual-time-budget=4000",
    ]
    dom = subprocess.run(
        [*base, "--dump-dom", console_url], capture_output=True, text=True, timeout=90
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    for service in ("router", "batcher", "inference-worker", "retrieval-worker", "tiering"):
        assert f"<td>{service}</td>" in html, service
    assert "SERVING" in html
    # The controller may change the policy while the page loads: the page shows the one
    # read before or the one read after.
    after = next(p for p in _state(console_url)["policies"] if p["target"] == "echo")
    shown = {policy["max_batch_size"], after["max_batch_size"]}
    assert any(f"<td>echo</td><td>{n}</td>" in html for n in shown), (shown, html[-1500:])
    subprocess.run(
        [*base, f"--screenshot={shot}", "--window-size=1280,1000", console_url],
        capture_output=True, timeout=90, env=dict(os.environ),
    )
    assert shot.exists() and shot.stat().st_size > 10_000
    keep = os.environ.get("INFERMESH_CONSOLE_SCREENSHOT")
    if keep:
        shutil.copyfile(shot, keep)


def test_console_command_is_registered() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "shared.cli.main", "console", "--help"],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0 and "live web page" in out.stdout
