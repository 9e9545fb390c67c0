"""The model repository: ``models/<name>/config.json`` files, parsed and checked once.

A config declares the backend, inputs/outputs (KServe v2 dtypes, shapes without the batch
dimension), batching limits and the latency SLO, like a Triton ``config.pbtxt``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec

from shared.errors import InvalidArgument
from shared.events import ModelSpec, TensorSpec

BACKENDS = ("echo", "onnx", "torch", "triton")


class ModelConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One model's declaration in the repository."""

    name: str = ""
    """Defaults to the folder name."""
    backend: str
    description: str = ""
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    accepts_text: bool = False
    """Whether requests may carry text (tokenized by the backend's preprocessing)."""
    max_batch_size: int = 32
    max_delay_ms: float = 2.0
    preferred_batch_sizes: tuple[int, ...] = ()
    slo_ms: float = 100.0
    """Latency SLO for one batch on a worker (the batch controller holds p99 under it)."""
    max_queue: int = 1024
    version: str = "1"
    instances: int = 1
    """Batches of this model one worker runs at once (Triton's instance_group count); others
    wait their turn in the worker, ready to start. An onnx run gets the cores divided by this
    (two one-thread MiniLM runs on 2 cores match one two-thread run); without the limit two
    batches shared one two-thread session and each took 2.7x as long as one alone."""
    parameters: dict[str, Any] = {}
    """Backend-specific settings (model file, Triton URL, fp16, synthetic cost, ...)."""

    def spec(self) -> ModelSpec:
        """The part other services need, as published in the models KV bucket."""
        return ModelSpec(
            name=self.name,
            backend=self.backend,
            inputs=self.inputs,
            outputs=self.outputs,
            max_batch_size=self.max_batch_size,
            max_delay_ms=self.max_delay_ms,
            preferred_batch_sizes=self.preferred_batch_sizes,
            slo_ms=self.slo_ms,
            accepts_text=self.accepts_text,
            version=self.version,
            max_queue=self.max_queue,
            instances=self.instances,
        )


def load_model(folder: Path) -> ModelConfig:
    """Parse and check one model folder's config.json."""
    path = folder / "config.json"
    try:
        config = msgspec.json.decode(path.read_bytes(), type=ModelConfig)
    except FileNotFoundError:
        raise InvalidArgument(f"model {folder.name!r}: {path} is missing") from None
    except msgspec.ValidationError as exc:
        raise InvalidArgument(f"model {folder.name!r}: {path}: {exc}") from None
    config = msgspec.structs.replace(config, name=config.name or folder.name)
    if config.backend not in BACKENDS:
        raise InvalidArgument(
            f"model {config.name!r}: unknown backend {config.backend!r} "
            f"(expected one of {', '.join(BACKENDS)})"
        )
    if config.max_batch_size < 1:
        raise InvalidArgument(f"model {config.name!r}: max_batch_size must be >= 1")
    if config.instances < 1:
        raise InvalidArgument(f"model {config.name!r}: instances must be >= 1")
    return config


def load_repository(root: Path, only: tuple[str, ...] = ()) -> dict[str, ModelConfig]:
    """Every model under root (or only the named ones), by name."""
    if not root.is_dir():
        raise InvalidArgument(f"model repository {root} does not exist")
    models = {}
    for folder in sorted(p for p in root.iterdir() if (p / "config.json").exists()):
        config = load_model(folder)
        if not only or config.name in only:
            models[config.name] = config
    missing = set(only) - set(models)
    if missing:
        raise InvalidArgument(f"models not in repository {root}: {', '.join(sorted(missing))}")
    return models
