"""NVIDIA Triton Inference Server (CPU) from the nvidia-pytriton wheel, run as tritonserver.

The wheel ships a real ``tritonserver`` with the Python backend but no ONNX Runtime backend,
so both models are ``backend: "python"`` models whose ``execute()`` joins the dynamic batch
into one array: ``minilm-l6`` runs the project's ONNX graph with ONNX Runtime (2 intra-op
threads), ``double`` computes y = 2x on FP32[16]. Dynamic batching is on for both.

Used by bench/compare.py from the project venv; tritonserver itself runs with the
``.bench/venvs/triton`` environment (numpy 1.26, onnxruntime) as PEERS.md requires.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from bench.peers.common import PeerUnavailable, Proc, spawn, venv

MINILM_CONFIG = """name: "minilm-l6"
backend: "python"
max_batch_size: 64
input [
  {{ name: "input_ids", data_type: TYPE_INT64, dims: [ -1 ] }},
  {{ name: "attention_mask", data_type: TYPE_INT64, dims: [ -1 ] }}
]
output [ {{ name: "embedding", data_type: TYPE_FP32, dims: [ 384 ] }} ]
dynamic_batching {{ max_queue_delay_microseconds: {delay_us} }}
instance_group [ {{ count: 1, kind: KIND_CPU }} ]
parameters: {{ key: "onnx_path", value: {{ string_value: "{onnx}" }} }}
parameters: {{ key: "threads", value: {{ string_value: "{threads}" }} }}
"""

# Requests of one dynamic batch are joined into one ORT run, then split back.
MINILM_MODEL = """
import json

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        params = json.loads(args["model_config"])["parameters"]
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(params["threads"]["string_value"])
        self.session = ort.InferenceSession(
            params["onnx_path"]["string_value"], options, providers=["CPUExecutionProvider"])
        self.output = self.session.get_outputs()[0].name

    def execute(self, requests):
        ids = [pb_utils.get_input_tensor_by_name(r, "input_ids").as_numpy() for r in requests]
        mask = [pb_utils.get_input_tensor_by_name(r, "attention_mask").as_numpy()
                for r in requests]
        width = max(a.shape[1] for a in ids)
        pad = lambda a: np.pad(a, ((0, 0), (0, width - a.shape[1])))  # noqa: E731
        feeds = {"input_ids": np.concatenate([pad(a) for a in ids]),
                 "attention_mask": np.concatenate([pad(a) for a in mask])}
        out = self.session.run([self.output], feeds)[0].astype(np.float32)
        replies, lo = [], 0
        for a in ids:
            part = out[lo : lo + len(a)]
            lo += len(a)
            replies.append(pb_utils.InferenceResponse([pb_utils.Tensor("embedding", part)]))
        return replies
"""

DOUBLE_CONFIG = """name: "double"
backend: "python"
max_batch_size: 64
input [ { name: "x", data_type: TYPE_FP32, dims: [ 16 ] } ]
output [ { name: "y", data_type: TYPE_FP32, dims: [ 16 ] } ]
dynamic_batching { max_queue_delay_microseconds: 500 }
instance_group [ { count: 1, kind: KIND_CPU } ]
"""

DOUBLE_MODEL = """
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        xs = [pb_utils.get_input_tensor_by_name(r, "x").as_numpy() for r in requests]
        y = np.concatenate(xs) * np.float32(2)
        replies, lo = [], 0
        for x in xs:
            replies.append(pb_utils.InferenceResponse([pb_utils.Tensor("y", y[lo : lo + len(x)])]))
            lo += len(x)
        return replies
"""


def ensure() -> dict[str, str]:
    """Install the venv, put the 3.11 Python-backend stub where tritonserver looks; versions."""
    py = venv("triton").ensure()
    site = next((py.parent.parent / "lib").glob("python3.*/site-packages"))
    server = site / "pytriton" / "tritonserver"
    if not (server / "bin" / "tritonserver").is_file():
        raise PeerUnavailable(f"nvidia-pytriton has no tritonserver binary under {server}")
    minor = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = server / "python_backend_stubs" / minor / "triton_python_backend_stub"
    if not stub.is_file():
        raise PeerUnavailable(f"nvidia-pytriton has no Python backend stub for Python {minor}")
    target = server / "backends" / "python" / "triton_python_backend_stub"
    if not target.is_file():
        shutil.copy2(stub, target)
    versions = venv("triton").versions()
    versions["tritonserver"] = "2.51.0 (bundled with nvidia-pytriton 0.7.0)"
    return versions


def write_repository(root: Path, onnx: Path, delay_us: int = 5000, threads: int = 2) -> Path:
    """A model repository with minilm-l6 and double (python backend) under root."""
    for name, config, model in (
        (
            "minilm-l6",
            MINILM_CONFIG.format(onnx=onnx, delay_us=delay_us, threads=threads),
            MINILM_MODEL,
        ),
        ("double", DOUBLE_CONFIG, DOUBLE_MODEL),
    ):
        (root / name / "1").mkdir(parents=True, exist_ok=True)
        (root / name / "config.pbtxt").write_text(config)
        (root / name / "1" / "model.py").write_text(model)
    return root


def start(repository: Path, grpc_port: int, timeout: float = 120.0) -> Proc:
    """tritonserver on the repository, gRPC only; returns once it serves every model."""
    v = venv("triton")
    site = next((v.path / "lib").glob("python3.*/site-packages"))
    server = site / "pytriton" / "tritonserver"
    env = {
        # PEERS.md trap 1: the stub links Debian's libpython but loads this interpreter's
        # standard library; this interpreter's own libpython must win.
        "LD_LIBRARY_PATH": ":".join(
            [str(Path(sys.base_prefix) / "lib"), str(site / "nvidia_pytriton.libs")]
        ),
        # Trap 2: the stub must import the venv's numpy 1.26 (numpy 2 gives empty outputs);
        # only PATH reaches it.
        "PATH": f"{v.bin}:/usr/local/bin:/usr/bin:/bin",
        "VIRTUAL_ENV": str(v.path),
    }
    cmd = [
        str(server / "bin" / "tritonserver"),
        f"--model-repository={repository}",
        f"--backend-directory={server / 'backends'}",
        f"--grpc-port={grpc_port}",
        "--allow-http=false",
        "--allow-metrics=false",
        "--log-verbose=0",
        f"--cache-directory={server / 'caches'}",
    ]
    proc = spawn("tritonserver", cmd, env=env)
    try:
        proc.wait_for_line("Started GRPCInferenceService", timeout)
    except PeerUnavailable:
        proc.stop()
        raise
    return proc
