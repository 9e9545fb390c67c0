"""Builds the backend a model config names."""

from __future__ import annotations

import os
from pathlib import Path

from services.inference_worker.backends import Backend, BackendUnavailable
from services.inference_worker.repository import ModelConfig
from shared.errors import FailedPrecondition


def make_backend(config: ModelConfig, model_dir: Path, cache_dir: Path, threads: int) -> Backend:
    """The backend for one model (imports each backend's libraries only when used)."""
    if config.backend == "echo":
        from services.inference_worker.backends.echo import EchoBackend

        return EchoBackend(config.parameters)
    if config.backend == "onnx":
        from services.inference_worker.backends.onnx import OnnxBackend

        build = config.parameters.get("build")
        if build == "minilm-l6":
            # The default model is built from its wheel on first use (about a second).
            from services.inference_worker.build_model import build as build_default

            model_path = build_default(cache_dir)
        else:
            model_path = model_dir / str(config.parameters.get("model", "model.onnx"))
        # Instances run side by side and share the cores: each run gets its share. (ORT's
        # default gives every run all cores; two runs then meet at each op's barrier.)
        per_run = threads or max(1, len(os.sched_getaffinity(0)) // config.instances)
        return OnnxBackend(model_path, config.parameters, per_run)
    if config.backend == "torch":
        try:
            from services.inference_worker.backends.torch_backend import TorchBackend
        except ModuleNotFoundError as exc:
            if exc.name != "torch":
                raise
            raise BackendUnavailable(
                f"model {config.name!r}: the torch backend needs torch, which is not "
                "installed here (pip install torch)"
            ) from None
        output = config.outputs[0].name if config.outputs else "embedding"
        return TorchBackend(config.parameters, model_dir, output_name=output, threads=threads)
    if config.backend == "triton":
        from services.inference_worker.backends.triton import TritonBackend

        return TritonBackend(config)
    raise FailedPrecondition(
        f"model {config.name!r}: backend {config.backend!r} is not available in this build"
    )
