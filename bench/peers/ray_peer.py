"""Ray Serve peer: MiniLM (ONNX Runtime) and y = 2x behind Ray's gRPC ingress, @serve.batch.

Ray's gRPC ingress serves any compiled service; it serves KServe v2's
``inference.GRPCInferenceService`` here (stubs from tritonclient), each application
answering ``ModelInfer``, so the benchmark's one Python client talks to Ray, Triton and
infermesh with the same request bytes. The client picks the application with the metadata
``("application", NAME)``. perf_analyzer is not used against Ray: it also needs the
metadata, config and statistics calls that only a real KServe server answers.

Run in .bench/venvs/ray (prints ``READY <port>``, serves until SIGTERM)::

    .bench/venvs/ray/bin/python -m bench.peers.ray_peer --grpc-port 9000 --onnx model.onnx
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np

SERVICER = "tritonclient.grpc.service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server"
MAX_BATCH = 64
WAIT_S = 0.005


def ensure() -> dict[str, str]:
    """Install the venv and the proto shims Ray needs to pickle requests; the versions.

    tritonclient's generated classes say their module is ``grpc_service_pb2`` (and
    ``model_config_pb2``), names nothing can import, and Ray pickles each request from its
    gRPC proxy to the replica; two one-line modules in the venv make those names importable.
    """
    from bench.peers.common import venv

    v = venv("ray")
    v.ensure()
    site = next((v.path / "lib").glob("python3.*/site-packages"))
    for shim, real in (
        ("grpc_service_pb2", "service_pb2"),
        ("model_config_pb2", "model_config_pb2"),
    ):
        (site / f"{shim}.py").write_text(f"from tritonclient.grpc.{real} import *  # noqa\n")
    return v.versions()


def _reply(model: str, name: str, out: np.ndarray) -> Any:
    """A ModelInferResponse with one raw FP32 output."""
    from tritonclient.grpc import service_pb2

    reply = service_pb2.ModelInferResponse(model_name=model)
    reply.outputs.add(name=name, datatype="FP32", shape=list(out.shape))
    reply.raw_output_contents.append(np.ascontiguousarray(out, dtype=np.float32).tobytes())
    return reply


def _tensor(request: Any, name: str, dtype: type) -> np.ndarray:
    """The named raw input of a ModelInferRequest as an array of its declared shape."""
    for i, t in enumerate(request.inputs):
        if t.name == name:
            return np.frombuffer(request.raw_input_contents[i], dtype=dtype).reshape(t.shape)
    raise ValueError(f"input {name!r} missing")


def build_apps(onnx: Path, threads: int) -> dict[str, Any]:
    """The two Ray Serve applications (name -> bound deployment)."""
    from ray import serve

    @serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=256)
    class MiniLM:
        """all-MiniLM-L6-v2 through ONNX Runtime, requests joined by @serve.batch."""

        def __init__(self) -> None:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            self.session = ort.InferenceSession(
                str(onnx), options, providers=["CPUExecutionProvider"]
            )

        @serve.batch(max_batch_size=MAX_BATCH, batch_wait_timeout_s=WAIT_S)
        async def run(self, requests: list[Any]) -> list[Any]:
            ids = [_tensor(r, "input_ids", np.int64) for r in requests]
            mask = [_tensor(r, "attention_mask", np.int64) for r in requests]
            width = max(a.shape[1] for a in ids)

            def pad(a: np.ndarray) -> np.ndarray:
                return np.pad(a, ((0, 0), (0, width - a.shape[1])))

            out = self.session.run(
                None,
                {
                    "input_ids": np.concatenate([pad(a) for a in ids]),
                    "attention_mask": np.concatenate([pad(a) for a in mask]),
                },
            )[0]
            replies, lo = [], 0
            for a in ids:
                replies.append(_reply("minilm-l6", "embedding", out[lo : lo + len(a)]))
                lo += len(a)
            return replies

        async def ModelInfer(self, request: Any) -> Any:  # Ray routes gRPC by method name
            return await self.run(request)

    @serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=256)
    class Double:
        """y = 2x on FP32[16], requests joined by @serve.batch."""

        @serve.batch(max_batch_size=MAX_BATCH, batch_wait_timeout_s=0.0005)
        async def run(self, requests: list[Any]) -> list[Any]:
            xs = [_tensor(r, "x", np.float32) for r in requests]
            y = np.concatenate(xs) * np.float32(2)
            replies, lo = [], 0
            for x in xs:
                replies.append(_reply("double", "y", y[lo : lo + len(x)]))
                lo += len(x)
            return replies

        async def ModelInfer(self, request: Any) -> Any:  # Ray routes gRPC by method name
            return await self.run(request)

    return {"minilm": MiniLM.bind(), "double": Double.bind()}  # type: ignore[attr-defined]


def main() -> None:
    """Start Ray (2 CPUs), the gRPC ingress and both applications; serve until SIGTERM."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grpc-port", type=int, required=True)
    ap.add_argument("--http-port", type=int, default=0)
    ap.add_argument("--onnx", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import ray
    from ray import serve
    from ray.serve.config import gRPCOptions

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(
        http_options={"host": "127.0.0.1", "port": args.http_port or 8000},
        grpc_options=gRPCOptions(port=args.grpc_port, grpc_servicer_functions=[SERVICER]),
    )
    for name, app in build_apps(args.onnx.resolve(), args.threads).items():
        serve.run(app, name=name, route_prefix=f"/{name}")
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    print(f"READY {args.grpc_port}", flush=True)
    done.wait()
    serve.shutdown()
    ray.shutdown()
    sys.exit(0)


if __name__ == "__main__":
    main()
