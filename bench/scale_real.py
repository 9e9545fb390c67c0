"""Check the scatter/gather simulation against a real mesh with 1, 2 and 4 retrieval workers.

Build the synthetic collection (100 k x 128, bulk-built offline) and start three meshes side
by side (nats + router + batcher each) with 1, 2 and 4 retrieval workers (each worker on its
own copy of the collection, all holding every block, so a batcher splits every batch over a
block cover). Then, in short interleaved rounds (the machine is shared and its load drifts by
3x within minutes: a profile taken a minute earlier predicts nothing), for each batch size:

- Router.Infer on the 1-worker mesh at concurrency 1, b queries per request: the N = 1
  measurement, and the model's overhead samples (client latency minus exec_ms) from the
  same calls;
- Router.Infer on the 2- and 4-worker meshes, same queries: the N = 2, 4 measurements;
- the N cover parts (N = 1, 2, 4) sent directly to the 1-worker mesh's worker: the model's
  per-part worker latencies;
- plus, once, the merge cost and the machine's speedup curve.

The idle meshes cost a few heartbeats. Prints measured vs predicted p50/p99
(bench/scale_sim.py's model, shared-cores variant: the workers compete for this machine's
cores; the dedicated-hardware prediction is listed too) and writes bench/results/scale_real.json.

On 2 cores, 4 workers cannot scan 4x faster; the check is that the model predicts what the
machine does, including that.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path

import numpy as np

from bench.loadgen import machine
from bench.retrieval_engine import recall
from bench.scale_sim import (
    NAME,
    Profile,
    Setup,
    add_worker,
    build_collection,
    measure_overhead,
    measure_parts,
    merge_table,
    predict,
    report,
    spin_work,
    wait_workers,
)
from shared.cli.supervisor import LocalMesh
from shared.client import AsyncClient

OUT = Path("bench/results/scale_real.json")


async def measure(router: str, xq: np.ndarray, s: Setup, batch: int, seconds: float,
                  least: int) -> list[float]:
    """Router.Infer latencies (ms) at concurrency 1, ``batch`` queries per request."""
    lat: list[float] = []
    async with AsyncClient(router) as client:
        t_end = time.perf_counter() + seconds
        i = 0
        while time.perf_counter() < t_end or len(lat) < least:
            lo = (i * batch * 7) % (len(xq) - batch + 1)
            t = time.perf_counter()
            await client.infer(pipeline="search", collection=NAME, k=s.k, nprobe=s.nprobe,
                               omit_hits=True, inputs={"query": xq[lo : lo + batch]},
                               timeout=60)
            lat.append((time.perf_counter() - t) * 1000.0)
            i += 1
    return lat


async def run(args: argparse.Namespace) -> dict[str, object]:
    """Meshes of 1, 2 and 4 workers side by side, measured and profiled in interleaved rounds."""
    s = Setup(n=args.n, dim=args.dim)
    batches = tuple(int(b) for b in args.batches.split(","))
    workers = [int(n) for n in args.workers.split(",")]
    if workers[0] != 1:
        raise SystemExit("--workers must start with 1: that mesh is the profile's")
    measured: dict[str, dict[str, list[float]]] = {str(n): {str(b): [] for b in batches}
                                                   for n in workers}
    with tempfile.TemporaryDirectory(prefix="scale-real-") as tmp, ExitStack() as stack:
        base = Path(tmp) / "base"
        t = time.perf_counter()
        data = build_collection(base, s)
        print(f"data + bulk build {time.perf_counter() - t:.1f}s; load avg "
              f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)
        meshes: dict[int, LocalMesh] = {}
        for n in workers:
            mesh = stack.enter_context(LocalMesh(
                Path(tmp) / f"mesh{n}",
                replicas={"inference-worker": 0, "tiering": 0, "retrieval-worker": 0}))
            mesh.start()
            for i in range(n):
                add_worker(mesh, base, Path(tmp) / f"mesh{n}-worker{i}", i)
            meshes[n] = mesh
        for n, mesh in meshes.items():
            await wait_workers(mesh.router_address, data.xq, s, n)
        one = meshes[1]
        worker, pid = one.endpoints["retrieval-worker-0"], one.child("retrieval-worker-0").pid
        print(f"meshes of {workers} workers up; load avg "
              f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)
        prof = Profile(setup=s, machine=machine(), load_avg=list(os.getloadavg()))
        procs = (1, 2, 3, 4, 6)
        spun = dict.fromkeys(procs, 0)
        prof.merge_ms = merge_table(workers, batches, s.k)
        for b in batches:  # warm every mesh's channels and caches
            for mesh in meshes.values():
                await measure(mesh.router_address, data.xq, s, b, 0.0, 3)
        rpc: dict[str, list[float]] = {str(b): [] for b in batches}
        cores: dict[str, list[float]] = {str(b): [] for b in batches}
        est: dict[str, float] = {}
        for r in range(args.rounds):
            for b in batches:
                key = str(b)
                # N = 1: the measurement and the overhead samples come from the same calls
                # as many calls as fit in chunk_s at the last round's median latency, so
                # every N gets about the same time and sample count
                count = max(int(args.chunk_s * 1000.0 / est.get(key, 10.0)), 3)
                total, over = await measure_overhead(one.router_address, data.xq, s, b, count)
                est[key] = float(np.median(total))
                measured["1"][key] += total
                prof.overhead_ms.setdefault(key, []).extend(over)
                for n, mesh in meshes.items():
                    if n > 1:
                        measured[str(n)][key] += await measure(mesh.router_address, data.xq, s,
                                                               b, args.chunk_s, 3)
                parts, walls, rpc_ms, used = await measure_parts(
                    worker, pid, data.xq, s, b, workers, max(8 // max(b // 32, 1), 2),
                    offset=r * 8)
                for nk, samples in parts.items():
                    prof.parts_ms.setdefault(key, {}).setdefault(nk, []).extend(samples)
                    prof.parts_wall_ms.setdefault(key, {}).setdefault(nk, []).extend(walls[nk])
                rpc[key].append(rpc_ms)
                cores[key].append(used)
            # the speedup curve too is sampled every round (load drifts within a minute)
            for p, w in spin_work(procs, 0.25).items():
                spun[p] += w
            print(f"  round {r + 1}/{args.rounds} done; load avg {os.getloadavg()[0]:.1f}",
                  flush=True)
        prof.speedup = {str(p): spun[p] / spun[1] for p in procs}
        # answers must not depend on the number of workers: recall of every mesh, all queries
        recalls = {}
        for n, mesh in meshes.items():
            async with AsyncClient(mesh.router_address) as client:
                res = await client.infer(pipeline="search", collection=NAME, k=s.k,
                                         nprobe=s.nprobe, omit_hits=True,
                                         inputs={"query": data.xq}, timeout=120)
            recalls[str(n)] = recall(res.outputs["ids"], data.truth)
        prof.recall = recalls["1"]
        prof.rpc_cpu_ms = {b: float(np.mean(v)) for b, v in rpc.items()}
        prof.worker_cores = {b: float(np.mean(v)) for b, v in cores.items()}
        prof.load_avg = [(a + b) / 2 for a, b in zip(prof.load_avg, os.getloadavg(),
                                                       strict=True)]
    rows = compare(prof, measured)
    print("recall@10 by workers: " + ", ".join(f"{n}: {r:.4f}" for n, r in recalls.items()))
    return {"profile": asdict(prof), "recall_by_workers": recalls, "measured_ms": measured,
            "comparison": rows}


def compare(prof: Profile, measured: dict[str, dict[str, list[float]]]
            ) -> list[dict[str, float | int]]:
    """Measured vs predicted (shared cores and dedicated) p50/p99 per N and batch."""
    rows: list[dict[str, float | int]] = []
    for n, by_batch in measured.items():
        for b, lat in by_batch.items():
            shared = predict(prof, int(n), int(b), shared=True)
            dedicated = predict(prof, int(n), int(b), shared=False)
            m50, m99 = np.percentile(lat, [50, 99])
            p50, p99 = np.percentile(shared, [50, 99])
            d50, d99 = np.percentile(dedicated, [50, 99])
            rows.append({"workers": int(n), "batch": int(b), "requests": len(lat),
                         "measured_p50": round(float(m50), 2),
                         "predicted_p50": round(float(p50), 2),
                         "measured_p99": round(float(m99), 2),
                         "predicted_p99": round(float(p99), 2),
                         "p50_ratio": round(float(m50 / p50), 2),
                         "p99_ratio": round(float(m99 / p99), 2),
                         "dedicated_p50": round(float(d50), 2),
                         "dedicated_p99": round(float(d99), 2)})
    return rows


def print_rows(rows: list[dict[str, float | int]]) -> None:
    """The comparison as a markdown table (ratio = measured / predicted)."""
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r[k]) for k in keys) + " |")


def main() -> None:
    """Run the check, print the comparison, write the JSON."""
    import json

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=Setup.n)
    ap.add_argument("--dim", type=int, default=Setup.dim)
    ap.add_argument("--batches", default="1,64,256")
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--rounds", type=int, default=10, help="interleaved rounds")
    ap.add_argument("--chunk-s", type=float, default=1.0,
                    help="seconds of real searches per mesh, batch and round")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    result = asyncio.run(run(args))
    out = Path(args.out)
    out.write_text(json.dumps(result, indent=1))
    report(Profile.load(out))
    print("\nmeasured vs predicted (shared cores), ms; ratio = measured / predicted")
    print_rows(result["comparison"])  # type: ignore[arg-type]
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
