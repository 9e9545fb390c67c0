"""Serves small models from a real Triton server (PyTriton) for tests and benchmarks.

Runs in its own venv, never the project's (see PEERS.md)::

    python3 -m venv .bench/pytriton
    .bench/pytriton/bin/pip install nvidia-pytriton==0.7.0 numpy==1.26.4
    .bench/pytriton/bin/python bench/peers/pytriton_server.py --grpc-port 8101

Models: ``double`` (FP32 x[16] -> y = 2x, dynamic batching) and ``upper`` (BYTES TEXT[1] ->
TEXT upper-cased). Prints ``READY <grpc port>`` once Triton reports both models ready, then
serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import numpy as np


def _fix_environment() -> None:
    """Work around the two traps PEERS.md describes, before tritonserver starts.

    The Python-backend stub links the system libpython but loads this interpreter's standard
    library, so this interpreter's libpython must come first; and the stub must see this
    venv's numpy 1.26 (with numpy 2 it returns empty outputs), which only PATH reaches.
    """
    lib = str(Path(sys.base_prefix) / "lib")
    os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(
        p for p in (lib, os.environ.get("LD_LIBRARY_PATH", "")) if p
    )
    os.environ["PATH"] = os.pathsep.join((str(Path(sys.prefix) / "bin"), os.environ["PATH"]))
    if not np.__version__.startswith("1."):
        raise SystemExit(f"numpy {np.__version__} here: Triton's Python stub needs numpy 1.x")


def main() -> None:
    """Parse the ports, bind the models, serve until a signal."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--http-port", type=int, default=0, help="0 = HTTP off")
    parser.add_argument("--metrics-port", type=int, default=0, help="0 = metrics off")
    parser.add_argument("--max-delay-us", type=int, default=500)
    args = parser.parse_args()
    _fix_environment()

    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    @batch
    def double(x: np.ndarray) -> dict[str, np.ndarray]:
        return {"y": (x * 2).astype(np.float32)}

    # @batch passes inputs by keyword, so the argument carries the Triton input's name.
    @batch
    def upper(TEXT: np.ndarray) -> dict[str, np.ndarray]:
        return {"TEXT": np.array([[t.upper() for t in row] for row in TEXT], dtype=object)}

    config = TritonConfig(
        grpc_address="127.0.0.1",
        grpc_port=args.grpc_port,
        allow_http=bool(args.http_port),
        http_port=args.http_port or None,
        allow_metrics=bool(args.metrics_port),
        metrics_port=args.metrics_port or None,
        log_verbose=0,
    )
    batching = ModelConfig(
        max_batch_size=64, batcher=DynamicBatcher(max_queue_delay_microseconds=args.max_delay_us)
    )
    with Triton(config=config) as triton:
        triton.bind(
            model_name="double",
            infer_func=double,
            inputs=[Tensor(name="x", dtype=np.float32, shape=(16,))],
            outputs=[Tensor(name="y", dtype=np.float32, shape=(16,))],
            config=batching,
        )
        triton.bind(
            model_name="upper",
            infer_func=upper,
            inputs=[Tensor(name="TEXT", dtype=bytes, shape=(1,))],
            outputs=[Tensor(name="TEXT", dtype=bytes, shape=(1,))],
            config=batching,
        )
        # SIGTERM must unwind the `with` so tritonserver and its stubs stop with us.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        print(f"READY {args.grpc_port}", flush=True)
        triton.serve()


if __name__ == "__main__":
    main()
