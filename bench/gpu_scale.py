"""Search QPS through the mesh with 1, 2, ... retrieval workers, one per GPU (issue 11).

Runs on a multi-GPU machine: nats-server (carried gzip'd), router + batcher + tiering and N
retrieval workers, worker i on GPU i (CUDA_VISIBLE_DEVICES), each on its own copy of one
collection bulk-built offline. The tiering service promotes the blocks searches read into
the hot (GPU) tier; once every worker serves its reads from the GPU, a closed loop of
requests carrying many query vectors measures QPS. Workers are added one at a time in the
same run, so the scaling ratio compares like with like. Prints a table and writes JSON.

Needs on the GPU host, besides torch and numpy: the wheels in the carried folder (faiss-cpu,
grpcio, protobuf, msgspec, nats-py, opentelemetry-*, prometheus-client, grpcio-health-checking,
grpcio-reflection, threadpoolctl, tritonclient, wrapt, packaging) and nats-server.gz.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.gpu_mesh import install_nats, services_pythonpath  # noqa: E402
from bench.loadgen import closed_loop, machine, table  # noqa: E402
from bench.scale_sim import NAME, Setup, build_collection, wait_workers  # noqa: E402
from shared.cli.status import collect  # noqa: E402
from shared.cli.supervisor import LocalMesh  # noqa: E402
from shared.client import AsyncClient  # noqa: E402


def add_gpu_worker(mesh: LocalMesh, base: Path, tmp: Path, i: int) -> str:
    """Retrieval worker i on GPU i, with its own copy of the collections dir."""
    own = tmp / f"worker-{i}"
    shutil.copytree(base, own)
    mesh.service_env["retrieval-worker"] = {
        "INFERMESH_COLLECTIONS_DIR": str(own),
        "CUDA_VISIBLE_DEVICES": str(i),
    }
    mesh.add("retrieval-worker", f"-{i}", timeout=300)
    return f"retrieval-worker-{i}"


async def warm_until_hot(
    mesh: LocalMesh, xq: np.ndarray, s: Setup, n: int, timeout: float
) -> dict[str, float]:
    """Search until every worker reports >= 99 % of its reads from the hot tier."""
    deadline = time.monotonic() + timeout
    shares: dict[str, float] = {}
    async with AsyncClient(mesh.router_address) as client:
        while time.monotonic() < deadline:
            for lo in range(0, len(xq), 256):
                await client.infer(
                    pipeline="search",
                    collection=NAME,
                    k=s.k,
                    nprobe=s.nprobe,
                    omit_hits=True,
                    inputs={"query": xq[lo : lo + 256]},
                    timeout=60,
                )
            snap = await collect(mesh.nats_url)
            shares = {t.worker: t.hit_share.get("hot", 0.0) for t in snap.tiers}
            if len(shares) >= n and all(v >= 0.99 for v in shares.values()):
                return shares
    return shares


async def measure(
    mesh: LocalMesh, xq: np.ndarray, s: Setup, batch: int, concurrency: int, seconds: float
) -> dict[str, Any]:
    """QPS (query vectors per second) and latency of requests carrying `batch` queries."""
    async with AsyncClient(mesh.router_address) as client:
        starts = list(range(0, len(xq) - batch + 1, batch)) or [0]
        cursor = {"i": 0}

        async def call() -> object:
            lo = starts[cursor["i"] % len(starts)]
            cursor["i"] += 1
            return await client.infer(
                pipeline="search",
                collection=NAME,
                k=s.k,
                nprobe=s.nprobe,
                omit_hits=True,
                inputs={"query": xq[lo : lo + batch]},
                timeout=120,
            )

        run = await closed_loop(f"batch {batch}", call, concurrency, seconds, warmup_s=2.0)
    return {
        "batch": batch,
        "concurrency": concurrency,
        "qps": round(run.throughput * batch, 1),
        "p50_ms": round(run.pct(50), 2),
        "p99_ms": round(run.pct(99), 2),
        "errors": run.errors,
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    notes: list[str] = []
    tmp = Path(tempfile.mkdtemp(prefix="gpu-scale-"))
    nats = install_nats(args.nats_server, tmp)
    os.environ["PYTHONPATH"] = services_pythonpath(tmp, notes)
    s = Setup(
        n=args.n,
        dim=args.dim,
        nlist=args.nlist,
        nprobe=args.nprobe,
        lists_per_block=args.lists_per_block,
        queries=args.queries,
    )
    t = time.perf_counter()
    data = build_collection(tmp / "base", s)
    print(f"data + bulk build {time.perf_counter() - t:.1f}s ({args.n} x {args.dim})", flush=True)
    rows: list[dict[str, Any]] = []
    env = {
        "INFERMESH_TIERING_PERIOD_S": "1",
        "INFERMESH_MAX_MOVES_PER_ROUND": "512",
        "INFERMESH_ACCESS_PERIOD_S": "1",
        "INFERMESH_TRACING": "false",
    }
    if args.cpu_hot_budget:
        # Test mode on a machine without GPUs: the "hot" tier is torch on the CPU.
        env.update(
            {"INFERMESH_HOT_ON_CPU": "true", "INFERMESH_HOT_BUDGET_BYTES": str(args.cpu_hot_budget)}
        )
    with LocalMesh(
        tmp / "mesh", env=env, replicas={"inference-worker": 0, "retrieval-worker": 0}
    ) as mesh:
        mesh.start()
        for n in range(1, args.gpus + 1):
            add_gpu_worker(mesh, tmp / "base", tmp, n - 1)
            await wait_workers(mesh.router_address, data.xq, s, n, timeout=300)
            shares = await warm_until_hot(mesh, data.xq, s, n, timeout=args.warm_s)
            print(f"N={n}: hot read share per worker {shares}", flush=True)
            for batch in args.batches:
                profilers = []
                if args.profile and n == args.gpus and batch == args.batches[-1]:
                    profilers = start_profilers(mesh, args.profile, args.seconds)
                row = await measure(mesh, data.xq, s, batch, args.concurrency, args.seconds)
                for proc in profilers:
                    proc.wait(timeout=60)
                row.update({"gpus": n, "hot_share_min": round(min(shares.values(), default=0), 3)})
                rows.append(row)
                print(row, flush=True)
    for row in rows:
        base = next(r for r in rows if r["gpus"] == 1 and r["batch"] == row["batch"])
        row["speedup"] = round(row["qps"] / base["qps"], 2) if base["qps"] else 0.0
    return {
        "machine": machine(),
        "nats": nats,
        "setup": vars(args),
        "rows": rows,
        "notes": notes,
        "gpu": _gpu_names(),
    }


def start_profilers(mesh: LocalMesh, out: Path, seconds: float) -> list[subprocess.Popen[bytes]]:
    """py-spy (folded stacks) on the router, batcher and first worker during a measurement."""
    spy = shutil.which("py-spy")
    if spy is None:
        print("py-spy not found: no profile", flush=True)
        return []
    out.mkdir(parents=True, exist_ok=True)
    procs = []
    for name in ("router", "batcher", "retrieval-worker-0"):
        pid = mesh.child(name).pid
        procs.append(
            subprocess.Popen(
                [
                    spy,
                    "record",
                    "-p",
                    str(pid),
                    "-d",
                    str(int(seconds)),
                    "-r",
                    "67",
                    "-f",
                    "raw",
                    "--nonblocking",
                    "-o",
                    str(out / f"{name}.folded"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    return procs


def _gpu_names() -> list[str]:
    try:
        import torch

        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:
        return []


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--nlist", type=int, default=1024)
    parser.add_argument("--nprobe", type=int, default=32)
    parser.add_argument("--lists-per-block", type=int, default=8)
    parser.add_argument("--queries", type=int, default=4096)
    parser.add_argument("--batches", type=lambda v: [int(x) for x in v.split(",")], default=[1024])
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warm-s", type=float, default=90.0)
    parser.add_argument("--nats-server", default=None)
    parser.add_argument(
        "--cpu-hot-budget",
        type=int,
        default=0,
        help="test on CPU: bytes of a torch-on-CPU 'hot' tier per worker",
    )
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="py-spy folded stacks of router/batcher/worker 0 in the last stage",
    )
    args = parser.parse_args()
    result = asyncio.run(run(args))
    print(
        f"\nsearch through the mesh, {args.n} x {args.dim}, nprobe {args.nprobe}, "
        f"GPUs: {', '.join(result['gpu']) or 'none'}; {result['machine']}"
    )
    print(table(result["rows"]))
    for note in result["notes"]:
        print(note)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
