"""The triton backend of the inference worker, against KServe v2 servers over real gRPC.

Two remotes: the router's own KServe endpoint (always available), and a real Triton server
started from PyTriton in its own venv (``.bench/pytriton``; those tests skip without it).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tests_support import eventually

from shared.cli.procs import free_port
from shared.client import AsyncClient
from shared.errors import RPCError

from .mesh import ROOT, Running, echo_mesh, start_worker

PYTRITON_PYTHON = ROOT / ".bench" / "pytriton" / "bin" / "python"
PYTRITON_SERVER = ROOT / "bench" / "peers" / "pytriton_server.py"
INSTALL_HINT = (
    "python3 -m venv .bench/pytriton && "
    ".bench/pytriton/bin/pip install nvidia-pytriton==0.7.0 numpy==1.26.4"
)


def write_model(repo: Path, name: str, config: dict[str, Any]) -> None:
    (repo / name).mkdir(parents=True, exist_ok=True)
    (repo / name / "config.json").write_text(json.dumps(config))


def remote_model(url: str, remote: str, **overrides: Any) -> dict[str, Any]:
    """A triton-backend model config forwarding to ``remote`` at ``url``."""
    config: dict[str, Any] = {
        "backend": "triton",
        "inputs": [{"name": "INPUT0", "dtype": "FP32", "shape": [16]}],
        "outputs": [{"name": "OUTPUT0", "dtype": "FP32", "shape": [16]}],
        "max_batch_size": 64,
        "max_delay_ms": 2,
        "parameters": {"url": url, "model_name": remote, "timeout_s": 5},
    }
    config.update(overrides)
    return config


async def ready(client: AsyncClient, model: str, **kwargs: Any) -> bool:
    try:
        await client.infer(model, timeout=5, **kwargs)
    except RPCError as exc:
        if exc.status in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE):
            return False
        raise
    return True


async def infer_many(client: AsyncClient, model: str, n: int) -> tuple[list[np.ndarray], list]:
    arrays = [np.random.default_rng(i).random((1, 16), dtype=np.float32) for i in range(n)]
    results = await asyncio.gather(*(client.infer(model, {"INPUT0": a}) for a in arrays))
    return arrays, list(results)


# -- against the router's own KServe endpoint ----------------------------------------------


@pytest.fixture
async def loopback(nats_server, tmp_path: Path) -> AsyncIterator[dict[str, Running]]:
    """An echo mesh plus a worker whose models forward to that mesh's KServe endpoint."""
    async with echo_mesh(nats_server.url, tmp_path) as mesh:
        repo = tmp_path / "remote-models"
        url = mesh["router"].endpoint
        write_model(
            repo,
            "remote-echo",
            remote_model(
                url,
                "echo",
                inputs=[{"name": "INPUT0", "dtype": "FP32", "shape": [-1]}],
                outputs=[],
                accepts_text=True,
            ),
        )
        write_model(repo, "remote-missing", remote_model(url, "no-such-model"))
        mesh["remote"] = await start_worker(
            nats_server.url,
            tmp_path,
            model_repository=repo,
            models="remote-echo,remote-missing",
        )
        try:
            yield mesh
        finally:
            await mesh["remote"].stop()


async def test_tensors_forwarded_to_a_kserve_server_come_back_bit_exact_per_item(
    loopback: dict[str, Running],
) -> None:
    async with AsyncClient(loopback["router"].endpoint) as client:
        probe = {"INPUT0": np.zeros((1, 16), np.float32)}
        await eventually(lambda: ready(client, "remote-echo", inputs=probe), what="remote ready")
        arrays, results = await infer_many(client, "remote-echo", 48)
    for a, r in zip(arrays, results, strict=True):
        np.testing.assert_array_equal(r.outputs["OUTPUT0"], a)
    # Batches of several items went out as one remote request and were split back correctly.
    assert max(r.timings[0].batch_size for r in results) > 1
    assert results[0].timings[0].worker == loopback["remote"].service.instance


async def test_texts_are_forwarded_as_a_bytes_input(loopback: dict[str, Running]) -> None:
    async with AsyncClient(loopback["router"].endpoint) as client:
        await eventually(lambda: ready(client, "remote-echo", texts=["x"]), what="remote ready")
        result = await client.infer("remote-echo", texts=["alpha", "βeta"])
    assert [t.decode() for t in result.outputs["TEXT"].reshape(-1)] == ["alpha", "βeta"]


async def test_a_model_missing_on_the_remote_is_not_found_naming_the_remote(
    loopback: dict[str, Running],
) -> None:
    async with AsyncClient(loopback["router"].endpoint) as client:
        probe = {"INPUT0": np.zeros((1, 16), np.float32)}
        await eventually(lambda: ready(client, "remote-echo", inputs=probe), what="remote ready")
        with pytest.raises(RPCError) as info:
            await client.infer("remote-missing", probe, timeout=5)
    assert info.value.status == grpc.StatusCode.NOT_FOUND
    assert "no-such-model" in info.value.message
    assert "[triton " in info.value.message


# -- against a real Triton server (PyTriton) ----------------------------------------------


class TritonProcess:
    """bench/peers/pytriton_server.py in the PyTriton venv, on a free port."""

    def __init__(self, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"127.0.0.1:{self.port}"
        self.log = log_path.open("wb")
        self.proc = subprocess.Popen(
            [str(PYTRITON_PYTHON), str(PYTRITON_SERVER), "--grpc-port", str(self.port)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")},
        )

    def wait_ready(self, timeout: float) -> None:
        client = triton.InferenceServerClient(self.url)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"pytriton_server exited with {self.proc.returncode}")
                try:
                    if client.is_model_ready("double") and client.is_model_ready("upper"):
                        return
                except triton.InferenceServerException:
                    pass  # not listening yet
                time.sleep(0.2)
            raise TimeoutError(f"Triton not ready at {self.url} within {timeout}s")
        finally:
            client.close()

    def stop(self) -> None:
        # SIGTERM: the script leaves PyTriton's context, which stops tritonserver.
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def triton_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonProcess]:
    venv = PYTRITON_PYTHON.parent.parent
    # `make test` marks a complete install; a venv made by hand counts when it has pytriton.
    installed = (venv / ".installed").exists() or (
        PYTRITON_PYTHON.exists()
        and subprocess.run([str(PYTRITON_PYTHON), "-c", "import pytriton"],
                           capture_output=True).returncode == 0
    )
    if not installed:
        pytest.skip(f"no PyTriton venv at {venv}; install: {INSTALL_HINT}")
    log_path = tmp_path_factory.mktemp("triton") / "tritonserver.log"
    server = TritonProcess(log_path)
    try:
        server.wait_ready(120)
    except (RuntimeError, TimeoutError) as exc:
        server.stop()
        tail = log_path.read_text(errors="replace")[-2000:]
        raise AssertionError(f"{exc}\n--- server log ---\n{tail}") from None
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def triton_mesh(
    nats_server, tmp_path: Path, triton_server: TritonProcess
) -> AsyncIterator[dict[str, Running]]:
    """An echo mesh plus a worker whose models live on the real Triton server."""
    async with echo_mesh(nats_server.url, tmp_path) as mesh:
        repo = tmp_path / "triton-models"
        double = remote_model(
            triton_server.url,
            "double",
            outputs=[{"name": "OUTPUT0", "dtype": "FP32", "shape": [16]}],
        )
        double["parameters"].update(inputs={"INPUT0": "x"}, outputs={"OUTPUT0": "y"})
        write_model(repo, "triton-double", double)
        write_model(
            repo,
            "triton-upper",
            remote_model(triton_server.url, "upper", inputs=[], outputs=[], accepts_text=True),
        )
        mesh["remote"] = await start_worker(
            nats_server.url, tmp_path, model_repository=repo, models="triton-double,triton-upper"
        )
        try:
            yield mesh
        finally:
            await mesh["remote"].stop()


async def test_a_real_triton_server_doubles_every_item_of_a_batch(
    triton_mesh: dict[str, Running],
) -> None:
    async with AsyncClient(triton_mesh["router"].endpoint) as client:
        probe = {"INPUT0": np.zeros((1, 16), np.float32)}
        await eventually(lambda: ready(client, "triton-double", inputs=probe), what="ready")
        arrays, results = await infer_many(client, "triton-double", 64)
    for a, r in zip(arrays, results, strict=True):
        np.testing.assert_array_equal(r.outputs["OUTPUT0"], 2 * a)
    assert max(r.timings[0].batch_size for r in results) > 1


async def test_a_real_triton_server_receives_texts_as_bytes(
    triton_mesh: dict[str, Running],
) -> None:
    async with AsyncClient(triton_mesh["router"].endpoint) as client:
        await eventually(lambda: ready(client, "triton-upper", texts=["x"]), what="ready")
        results = await asyncio.gather(
            *(client.infer("triton-upper", texts=[f"item {i}", "b"]) for i in range(8))
        )
    for i, r in enumerate(results):
        assert [t.decode() for t in r.outputs["TEXT"].reshape(-1)] == [f"ITEM {i}", "B"]
