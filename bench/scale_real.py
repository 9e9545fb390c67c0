"""Check the scatter/gather simulation against a real mesh with 1, 2 and 4 retrieval workers.

One run, one machine state: build the synthetic collection (100 k x 128, bulk-built offline),
start nats + router + batcher + one retrieval worker, collect the simulation's profile
(bench/scale_sim.py: overhead, per-part worker latencies of real block covers, rpc and merge
cost, the machine's speedup curve), then measure Router.Infer at concurrency 1 with the
same queries and batch sizes while retrieval workers are added (1 -> 2 -> 4; each on its own
copy of the collection, all holding every block, so the batcher splits every batch over a
cover). Prints measured vs predicted p50/p99 (predicted with the shared-cores model: the
workers compete for this machine's cores) and writes bench/results/scale_real.json
(profile included, so ``python -m bench.scale_sim --profile bench/results/scale_real.json``
reprints the prediction tables).

On 2 cores, 4 workers cannot scan 4x faster; the check is that the model predicts what the
machine does, including that.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from bench.scale_sim import (
    NAME,
    Profile,
    Setup,
    add_worker,
    build_collection,
    collect,
    predict,
    report,
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
            if i >= 2:  # the first calls warm a new worker's channel
                lat.append((time.perf_counter() - t) * 1000.0)
            i += 1
    return lat


async def run(args: argparse.Namespace) -> dict[str, object]:
    """Profile, then the real 1/2/4-worker measurements, then the comparison."""
    s = Setup(n=args.n, dim=args.dim)
    batches = tuple(int(b) for b in args.batches.split(","))
    workers = [int(n) for n in args.workers.split(",")]
    ns = sorted(set(workers) | {int(n) for n in args.ns.split(",")})
    with tempfile.TemporaryDirectory(prefix="scale-real-") as tmp:
        base = Path(tmp) / "base"
        t = time.perf_counter()
        data = build_collection(base, s)
        print(f"data + bulk build {time.perf_counter() - t:.1f}s; load avg "
              f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)
        with LocalMesh(Path(tmp) / "mesh", replicas={"inference-worker": 0, "tiering": 0,
                                                     "retrieval-worker": 0}) as mesh:
            mesh.start()
            first = add_worker(mesh, base, Path(tmp), 0)
            await wait_workers(mesh.router_address, data.xq, s, 1)
            print("collecting the profile on one worker", flush=True)
            prof = await collect(mesh.router_address, mesh.endpoints[first],
                                 mesh.child(first).pid, data, s, batches, ns, args.samples,
                                 args.requests)
            measured: dict[str, dict[str, list[float]]] = {}
            loads: dict[str, list[float]] = {}
            started = 1
            for n in workers:
                while started < n:
                    add_worker(mesh, base, Path(tmp), started)
                    started += 1
                await wait_workers(mesh.router_address, data.xq, s, n)
                loads[str(n)] = list(os.getloadavg())
                measured[str(n)] = {}
                for b in batches:
                    lat = await measure(mesh.router_address, data.xq, s, b, args.seconds,
                                        args.least)
                    measured[str(n)][str(b)] = lat
                    print(f"  N={n} batch {b}: {len(lat)} requests, p50 "
                          f"{np.median(lat):.2f} ms, p99 {np.percentile(lat, 99):.2f} ms",
                          flush=True)
    rows = compare(prof, measured)
    return {"profile": asdict(prof), "measured_ms": measured, "load_avg_by_n": loads,
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
    ap.add_argument("--ns", default="1,2,3,4,6,8,12,16",
                    help="worker counts the profile measures covers for")
    ap.add_argument("--samples", type=int, default=24, help="cover samples at batch 1")
    ap.add_argument("--requests", type=int, default=150, help="overhead requests at batch 1")
    ap.add_argument("--seconds", type=float, default=5.0, help="least time per real cell")
    ap.add_argument("--least", type=int, default=25, help="least requests per real cell")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    result = asyncio.run(run(args))
    out = Path(args.out)
    out.write_text(json.dumps(result, indent=1))
    prof = Profile.load(out)
    report(prof)
    print("\nmeasured vs predicted (shared cores), ms; ratio = measured / predicted")
    print_rows(result["comparison"])  # type: ignore[arg-type]
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
