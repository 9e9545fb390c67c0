"""`infermesh up` as a user runs it: a subprocess, a request from the CLI, then Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

INFERMESH = [sys.executable, "-m", "shared.cli.main"]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is gone for our purposes once reaped or defunct.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


class Output:
    """Collects a child's output lines on a thread, so the test can wait for one."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._proc = proc
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, needle: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = "\n".join(self.lines)
            if needle in text:
                return text
            if self._proc.poll() is not None:
                self._thread.join(2)
                raise AssertionError(f"infermesh up exited with {self._proc.returncode}:\n{text}")
            time.sleep(0.1)
        raise AssertionError(f"{needle!r} not printed within {timeout}s:\n" + "\n".join(self.lines))


@pytest.fixture
def mesh_up(tmp_path: Path):
    env = dict(os.environ, COLUMNS="200", TERM="dumb")
    proc = subprocess.Popen(
        [*INFERMESH, "up", "--data-dir", str(tmp_path), "--no-demo"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        output = Output(proc)
        output.wait_for("press Ctrl-C", timeout=180)
        yield proc, tmp_path, output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_up_serves_a_request_from_the_cli_and_ctrl_c_leaves_no_process(mesh_up) -> None:
    proc, data_dir, output = mesh_up
    text = "\n".join(output.lines)
    assert "mesh is up: router at 127.0.0.1:" in text
    assert "sample: infer(model=echo" in text and "'hello, mesh'" in text
    state = json.loads((data_dir / "mesh.json").read_text())
    pids = list(state["pids"].values())
    assert len(pids) == 5

    reply = subprocess.run(
        [
            *INFERMESH,
            "infer",
            "--data-dir",
            str(data_dir),
            "--model",
            "echo",
            "--text",
            "hi",
            "--timings",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, COLUMNS="200"),
    )
    assert reply.returncode == 0, reply.stderr
    assert "TEXT [1]: ['hi']" in reply.stdout
    assert "infer" in reply.stdout and "echo" in reply.stdout  # the timings table

    status = subprocess.run(
        [*INFERMESH, "status", "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, COLUMNS="200"),
    )
    assert status.returncode == 0, status.stderr
    for service in ("router", "batcher", "inference-worker", "retrieval-worker", "tiering"):
        assert service in status.stdout
    assert status.stdout.count("SERVING") >= 5

    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 0
    deadline = time.monotonic() + 10
    while any(_pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in pids if _pid_alive(p)], "children outlived infermesh up"
    assert not (data_dir / "mesh.json").exists()


def test_cli_errors_are_one_line_without_a_traceback(tmp_path: Path) -> None:
    reply = subprocess.run(
        [
            *INFERMESH,
            "infer",
            "--router",
            "127.0.0.1:1",
            "--model",
            "echo",
            "--text",
            "x",
            "--timeout",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert reply.returncode == 1
    assert "Traceback" not in reply.stderr
    assert reply.stderr.strip().startswith("error: UNAVAILABLE")
    assert len(reply.stderr.strip().splitlines()) == 1


def test_up_loads_the_demo_collection_and_answers_a_text_search(tmp_path: Path) -> None:
    env = dict(os.environ, COLUMNS="200", TERM="dumb")
    args = [*INFERMESH, "up", "--data-dir", str(tmp_path), "--demo-docs", "300",
            "--exit-after-start"]
    first = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "stdlib docstrings loaded" in first.stdout
    # The sample question about command-line arguments finds argparse or getopt first.
    hits = first.stdout.split("search(collection=stdlib", 1)[1]
    top = next(line for line in hits.splitlines() if "0." in line and ":" in line)
    assert "argparse" in top or "getopt" in top, hits[:1500]
    second = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "(cached)" in second.stdout


def test_a_port_taken_between_pick_and_bind_is_picked_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    from shared.cli import supervisor

    pick = supervisor.LocalMesh._port
    squatters: list[socket.socket] = []

    def squat_on_the_third(self: supervisor.LocalMesh) -> int:
        port = pick(self)
        if len(self._ports) == 3 and not squatters:  # someone else binds it first
            s = socket.socket()
            s.bind(("127.0.0.1", port))
            s.listen()
            squatters.append(s)
        return port

    monkeypatch.setattr(supervisor.LocalMesh, "_port", squat_on_the_third)
    mesh = supervisor.LocalMesh(tmp_path, replicas={"retrieval-worker": 0, "inference-worker": 0})
    try:
        mesh.start()
        assert squatters, "the test did not take a port"
        assert all(c.alive() for c in mesh.children)
    finally:
        mesh.stop()
        for s in squatters:
            s.close()


def test_a_mesh_keeps_its_logs_with_their_last_lines_once_it_stopped(tmp_path: Path) -> None:
    # Benchmarks run a mesh in a temporary folder and read its logs after the run: the copy
    # is made once every process stopped, so it holds the shutdown too.
    from shared.cli import supervisor

    kept = tmp_path / "kept"
    only_router = {name: 0 for name in supervisor.ORDER} | {"router": 1}
    with supervisor.LocalMesh(tmp_path / "mesh", replicas=only_router, keep_logs=kept) as mesh:
        mesh.start()
        assert not kept.exists()
    router_log = (kept / "router.log").read_text()
    assert "router serving on" in router_log
    assert "router stopped" in router_log
    assert (kept / "nats.log").is_file()
