"""The triton backend: each batch goes to a remote Triton (KServe v2 gRPC) server.

All items' rows are concatenated into one request per input signature (items whose tensors
differ past the batch dimension cannot share one), cut to the remote model's
``max_batch_size``, and the outputs are split back per item. Texts travel as a BYTES input.

Parameters (``parameters`` of the model config):

- ``url``: ``host:port`` of Triton's gRPC endpoint (required).
- ``model_name`` / ``model_version``: the remote model (default: this model's name / latest).
- ``timeout_s``: per request to Triton (default 10).
- ``inputs`` / ``outputs``: ``{infermesh name: Triton name}`` where the names differ.
- ``text_input``: the Triton BYTES input that receives texts (default ``TEXT``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from services.inference_worker.backends import Item
from services.inference_worker.repository import ModelConfig
from shared.errors import FailedPrecondition, InvalidArgument, RPCError
from shared.tensors import dtype_name

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RemoteModel:
    """What the worker needs to know of the remote model, read once from its config."""

    max_batch_size: int
    input_dims: dict[str, tuple[int, ...]]


class TritonBackend:
    """Forwards batches to a remote Triton model through ``tritonclient.grpc``."""

    # tritonclient's sync client blocks, so the worker runs batches in a thread.
    blocking = True

    def __init__(self, config: ModelConfig) -> None:
        params = config.parameters
        url = params.get("url")
        if not isinstance(url, str) or not url:
            raise InvalidArgument(f"model {config.name!r}: triton backend needs parameters.url")
        self.url = url
        self.model_name = str(params.get("model_name") or config.name)
        self.model_version = str(params.get("model_version", ""))
        self.timeout_s = float(params.get("timeout_s", 10.0))
        self.input_map: dict[str, str] = dict(params.get("inputs", {}))
        self.output_map: dict[str, str] = dict(params.get("outputs", {}))
        self.text_input = str(params.get("text_input", "TEXT"))
        self.outputs = [t.name for t in config.outputs]
        self.client = triton.InferenceServerClient(url)
        self._remote: RemoteModel | None = None
        self._lock = threading.Lock()

    # -- remote model -------------------------------------------------------------------

    def remote(self) -> RemoteModel:
        """The remote model's batch limit and input dims, fetched on first use.

        Lazily, so a worker starts while Triton is still loading; a failure is retried on
        the next batch.
        """
        with self._lock:
            if self._remote is None:
                reply = self._call(
                    self.client.get_model_config,
                    self.model_name,
                    self.model_version,
                    client_timeout=self.timeout_s,
                )
                cfg = reply.config
                if cfg.max_batch_size < 1:
                    raise FailedPrecondition(
                        f"Triton model {self.model_name!r} at {self.url} does not batch "
                        "(max_batch_size 0); the triton backend sends batches"
                    )
                self._remote = RemoteModel(
                    max_batch_size=cfg.max_batch_size,
                    input_dims={i.name: tuple(i.dims) for i in cfg.input},
                )
            return self._remote

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Call tritonclient; its errors become RPCError with Triton's status, named once."""
        try:
            return fn(*args, **kwargs)
        except InferenceServerException as exc:
            raise RPCError(f"[triton {self.url}] {exc.message()}", _status(exc)) from None

    # -- batches --------------------------------------------------------------------------

    def execute(self, items: list[Item]) -> list[dict[str, np.ndarray]]:
        remote = self.remote()
        results: list[dict[str, np.ndarray]] = [{} for _ in items]
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(_signature(item), []).append(i)
        for indices in groups.values():
            outputs = self._run_group([items[i] for i in indices], remote)
            for i, out in zip(indices, outputs, strict=True):
                results[i] = out
        return results

    def _run_group(self, items: list[Item], remote: RemoteModel) -> list[dict[str, np.ndarray]]:
        """One signature's items as concatenated rows, sent in chunks, split back per item."""
        rows = [len(item.texts) if item.texts else _rows(item) for item in items]
        columns: dict[str, np.ndarray] = {}
        if items[0].texts:
            columns[self.text_input] = self._text_column(items, remote)
        for name in items[0].inputs:
            columns[self.input_map.get(name, name)] = np.concatenate(
                [item.inputs[name] for item in items]
            )
        total = sum(rows)
        step = remote.max_batch_size
        chunks = [
            self._infer({k: v[start : start + step] for k, v in columns.items()})
            for start in range(0, total, step)
        ]
        merged = {name: np.concatenate([c[name] for c in chunks]) for name in chunks[0]}
        for name, array in merged.items():
            if array.shape[:1] != (total,):
                # Also the symptom of Triton's Python stub running numpy 2: empty outputs.
                raise RPCError(
                    f"[triton {self.url}] output {name!r} of {self.model_name!r} has shape "
                    f"{list(array.shape)} for {total} input rows",
                    grpc.StatusCode.INTERNAL,
                )
        out: list[dict[str, np.ndarray]] = []
        start = 0
        for n in rows:
            out.append({name: array[start : start + n] for name, array in merged.items()})
            start += n
        return out

    def _text_column(self, items: list[Item], remote: RemoteModel) -> np.ndarray:
        dims = remote.input_dims.get(self.text_input)
        if dims is None:
            raise FailedPrecondition(
                f"Triton model {self.model_name!r} has no input {self.text_input!r} for text "
                f"(inputs: {', '.join(remote.input_dims) or 'none'}); set parameters.text_input"
            )
        texts = [t.encode() for item in items for t in item.texts]
        # One string per row, shaped like the remote input (e.g. dims [1] -> [n, 1]).
        shape = (len(texts), *(1 for _ in dims))
        return np.array(texts, dtype=object).reshape(shape)

    def _infer(self, columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        inputs = []
        for name, array in columns.items():
            tensor = triton.InferInput(name, list(array.shape), dtype_name(array.dtype))
            tensor.set_data_from_numpy(np.ascontiguousarray(array))
            inputs.append(tensor)
        wanted = [(name, self.output_map.get(name, name)) for name in self.outputs]
        result = self._call(
            self.client.infer,
            self.model_name,
            inputs,
            model_version=self.model_version,
            outputs=[triton.InferRequestedOutput(remote) for _, remote in wanted] or None,
            client_timeout=self.timeout_s,
        )
        if not wanted:
            # No outputs declared: take all Triton returned, under their infermesh names.
            back = {remote: name for name, remote in self.output_map.items()}
            wanted = [(back.get(o.name, o.name), o.name) for o in result.get_response().outputs]
        out = {}
        for name, remote in wanted:
            array = result.as_numpy(remote)
            if array is None:
                raise RPCError(
                    f"[triton {self.url}] {self.model_name!r} returned no output {remote!r}",
                    grpc.StatusCode.INTERNAL,
                )
            out[name] = array
        return out

    def close(self) -> None:
        self.client.close()


def _signature(item: Item) -> tuple[Any, ...]:
    """Items with equal signatures can be concatenated into one request."""
    return (
        bool(item.texts),
        tuple(sorted((n, a.dtype.str, a.shape[1:]) for n, a in item.inputs.items())),
    )


def _rows(item: Item) -> int:
    shapes: Sequence[int] = [a.shape[0] for a in item.inputs.values()]
    return int(shapes[0]) if shapes else 0


def _status(exc: InferenceServerException) -> grpc.StatusCode:
    """Triton's status string (``StatusCode.NOT_FOUND``) as a gRPC code; INTERNAL if none."""
    name = str(exc.status() or "").rsplit(".", 1)[-1]
    return grpc.StatusCode.__members__.get(name, grpc.StatusCode.INTERNAL)
