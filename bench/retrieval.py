"""Retrieval through the mesh vs raw FAISS IndexIVFFlat in-process: recall@k and QPS per nprobe.

Data: the seeded mixture of ``bench/retrieval_engine.py`` (1 000 unit centres, noise with the
centre's norm, L2-normalised; queries from the same mixture; inner product; exact truth from
a flat index). The mesh (nats + router + batcher + one retrieval worker, as local processes)
gets the vectors through Collections.Upsert, i.e. through the durable JetStream ingest.

"batch" means two things, both reported:
- ``req``: one request carries ``batch`` query vectors (Router.Infer with a [batch, dim]
  ``query`` tensor), requests sent one after another;
- ``conc``: ``batch`` single-query requests in flight at once (the batcher forms batches).
Raw FAISS runs ``index.search`` on ``batch`` queries at a time.

Goals: recall@10 >= 0.95 at the chosen nprobe; mesh >= 0.8x raw QPS at batch 1, >= 1.0x at
64, >= 2x at >= 256. Quick run: ``python -m bench.retrieval --n 200000 --nlist 512``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from bench.retrieval_engine import mixture, recall
from shared.cli.ingest import Batch, Ingester
from shared.cli.supervisor import LocalMesh
from shared.client import AsyncClient, Client


def load(router: str, xb: np.ndarray, nlist: int) -> float:
    """Create the collection and upsert every vector through the router; seconds taken."""
    ing = Ingester(router)
    t = time.perf_counter()
    ing.ensure("bench", xb.shape[1], nlist, "ip", "float32")
    for lo in range(0, len(xb), 20_000):
        ing.upsert("bench", Batch(ids=np.arange(lo, min(lo + 20_000, len(xb))),
                                  vectors=xb[lo : lo + 20_000]))
    while True:
        info = ing.describe("bench")
        if info is not None and info.count == len(xb) and info.workers:
            break
        time.sleep(0.5)
    ing.close()
    return time.perf_counter() - t


def mesh_batched(router: str, xq: np.ndarray, k: int, nprobe: int, batch: int, budget: float
                 ) -> tuple[np.ndarray, float]:
    """Sequential requests of ``batch`` queries each; ids and QPS."""
    out, done = [], 0
    with Client(router) as client:
        t = time.perf_counter()
        for lo in range(0, len(xq), batch):
            r = client.infer(pipeline="search", collection="bench", k=k, nprobe=nprobe,
                             inputs={"query": xq[lo : lo + batch]}, timeout=60)
            out.append(r.outputs["ids"])
            done += len(out[-1])
            if time.perf_counter() - t > budget:
                break
        dt = time.perf_counter() - t
    return np.concatenate(out), done / dt


async def mesh_concurrent(router: str, xq: np.ndarray, k: int, nprobe: int, inflight: int,
                          budget: float) -> tuple[np.ndarray, float]:
    """``inflight`` single-query requests in flight at once; ids (in query order) and QPS."""
    ids = np.full((len(xq), k), -1, dtype=np.int64)
    next_q = 0
    done = 0
    async with AsyncClient(router) as client:
        t = time.perf_counter()

        async def lane() -> None:
            nonlocal next_q, done
            while next_q < len(xq) and time.perf_counter() - t < budget:
                i = next_q
                next_q += 1
                r = await client.infer(pipeline="search", collection="bench", k=k,
                                       nprobe=nprobe, inputs={"query": xq[i : i + 1]},
                                       timeout=60)
                ids[i] = r.outputs["ids"][0]
                done += 1

        await asyncio.gather(*(lane() for _ in range(inflight)))
        dt = time.perf_counter() - t
    return ids[:done] if done == next_q else ids[: next_q], done / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--centres", type=int, default=1000)
    ap.add_argument("--nlist", type=int, default=1024)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--nprobe", default="8,16,32")
    ap.add_argument("--batches", default="1,64,256")
    ap.add_argument("--budget-s", type=float, default=5.0, help="time cap per cell")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    print(f"machine: {os.cpu_count()} cpus; faiss {faiss.__version__} "
          f"omp={faiss.omp_get_max_threads()}")
    rng = np.random.default_rng(args.seed)
    centres = rng.standard_normal((args.centres, args.dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    xb = mixture(args.n, centres, rng)
    xq = mixture(args.queries, centres, rng)
    flat = faiss.IndexFlatIP(args.dim)
    flat.add(xb)
    _, truth = flat.search(xq, args.k)
    del flat

    quant = faiss.IndexFlatIP(args.dim)
    ivf = faiss.IndexIVFFlat(quant, args.dim, args.nlist, faiss.METRIC_INNER_PRODUCT)
    ivf.train(xb[rng.choice(args.n, min(args.n, 64 * args.nlist), replace=False)])
    ivf.add(xb)

    with tempfile.TemporaryDirectory(prefix="bench-mesh-") as tmp, LocalMesh(
        Path(tmp), replicas={"inference-worker": 0, "tiering": 0}
    ) as mesh:
        mesh.start()
        secs = load(mesh.router_address, xb, args.nlist)
        print(f"data {args.n} x {args.dim}; mesh ingest (JetStream -> worker, indexed) {secs:.1f}s")
        print(f"{'nprobe':>6} {'batch':>5} {'R raw':>6} {'raw qps':>8} "
              f"{'R req':>6} {'req qps':>8} {'x':>5} {'R conc':>6} {'conc qps':>8} {'x':>5}")
        missed = []
        for nprobe in [int(v) for v in args.nprobe.split(",")]:
            ivf.nprobe = nprobe
            for batch in [int(v) for v in args.batches.split(",")]:
                raw_ids, done, t = [], 0, time.perf_counter()
                for lo in range(0, len(xq), batch):
                    raw_ids.append(ivf.search(xq[lo : lo + batch], args.k)[1])
                    done += len(raw_ids[-1])
                    if time.perf_counter() - t > args.budget_s:
                        break
                raw_qps = done / (time.perf_counter() - t)
                r_raw = recall(np.concatenate(raw_ids), truth[:done])
                req_ids, req_qps = mesh_batched(mesh.router_address, xq, args.k, nprobe,
                                                batch, args.budget_s)
                conc_ids, conc_qps = asyncio.run(mesh_concurrent(
                    mesh.router_address, xq, args.k, nprobe, batch, args.budget_s))
                r_req = recall(req_ids, truth[: len(req_ids)])
                r_conc = recall(conc_ids, truth[: len(conc_ids)])
                print(f"{nprobe:>6} {batch:>5} {r_raw:6.3f} {raw_qps:8.0f} {r_req:6.3f} "
                      f"{req_qps:8.0f} {req_qps / raw_qps:5.2f} {r_conc:6.3f} {conc_qps:8.0f} "
                      f"{conc_qps / raw_qps:5.2f}", flush=True)
                goal = 0.8 if batch == 1 else (1.0 if batch < 256 else 2.0)
                best = max(req_qps, conc_qps) / raw_qps
                if best < goal:
                    missed.append(f"nprobe {nprobe} batch {batch}: {best:.2f}x < {goal}x")
        print("missed QPS goals: " + ("; ".join(missed) if missed else "none"))


if __name__ == "__main__":
    main()
