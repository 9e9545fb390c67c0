"""The one Python client common to infermesh, Triton and Ray Serve: KServe v2 ModelInfer.

A grpc.aio stub of ``inference.GRPCInferenceService`` (tritonclient's compiled proto) driven
by ``bench.loadgen.closed_loop``. Every system gets the same request bytes (raw input
contents); Ray additionally gets the ``application`` metadata its gRPC ingress routes by.
Runs in the project venv.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc

from bench.loadgen import Run, closed_loop

#: gRPC channel options: no message cap surprises, and one connection per target.
_OPTIONS = [
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
]


@dataclass(frozen=True)
class Target:
    """Where one system serves KServe v2 ModelInfer."""

    system: str
    address: str
    model: str
    metadata: tuple[tuple[str, str], ...] = ()


def request(model: str, inputs: dict[str, np.ndarray]) -> service_pb2.ModelInferRequest:
    """A ModelInferRequest carrying the arrays as raw contents (batch dimension included)."""
    dtypes = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64"}
    req = service_pb2.ModelInferRequest(model_name=model)
    for name, array in inputs.items():
        req.inputs.add(name=name, datatype=dtypes[array.dtype], shape=list(array.shape))
        req.raw_input_contents.append(np.ascontiguousarray(array).tobytes())
    return req


def first_output(reply: service_pb2.ModelInferResponse) -> np.ndarray:
    """The reply's first output as a float32 array of its shape (empty if it came back empty)."""
    out = reply.outputs[0]
    raw = reply.raw_output_contents[0] if reply.raw_output_contents else b""
    data = np.frombuffer(raw, dtype=np.float32)
    return data.reshape(out.shape) if data.size == int(np.prod(out.shape)) else data


async def infer_once(target: Target, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """One request, to check a real output before trusting the system's numbers."""
    async with grpc.aio.insecure_channel(target.address, options=_OPTIONS) as ch:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(ch)
        reply = await stub.ModelInfer(
            request(target.model, inputs), timeout=60, metadata=target.metadata or None
        )
    return first_output(reply)


async def load(
    target: Target,
    inputs: dict[str, np.ndarray],
    concurrency: int,
    seconds: float,
    warmup_s: float = 2.0,
) -> Run:
    """Closed loop at one concurrency, one channel, the same prebuilt request every call."""
    async with grpc.aio.insecure_channel(target.address, options=_OPTIONS) as ch:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(ch)
        req = request(target.model, inputs)
        metadata = target.metadata or None

        async def call() -> object:
            return await stub.ModelInfer(req, timeout=30, metadata=metadata)

        return await closed_loop(target.system, call, concurrency, seconds, warmup_s)
