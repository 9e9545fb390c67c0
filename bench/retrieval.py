"""Retrieval through the mesh vs raw FAISS IndexIVFFlat in-process: recall@k and QPS per nprobe.

Data (``--data``):
- ``synthetic``: the seeded mixture of ``bench/retrieval_engine.py`` (1 000 unit centres,
  noise with the centre's norm, L2-normalised; queries from the same mixture);
- ``stdlib``: the demo corpus (stdlib docstrings, ``shared/cli/demo.py``) embedded with
  minilm-l6 in-process; every 10th document is held aside and its text is a query.
Inner product; exact truth from a flat index.

The collection is bulk-built offline with the engine (``services/retrieval_worker/bulk.py``)
into the worker's collections directory before the mesh starts (JetStream ingest of 200 k
rows took > 9 minutes); the worker opens it, declares it and advertises it. Raw FAISS is an
``IndexIVFFlat`` over the collection's own centroids, so both probe the same lists and
recall must agree at equal nprobe.

"batch b" = b query vectors in flight, two ways, both reported (throughput in queries/s):
- ``req``: one Router.Infer carrying b queries (a [b, dim] ``query`` tensor), one at a time;
- ``conc``: b single-query requests in flight at once, each a unary Router.Infer (the router
  and the batcher merge them into one Search per worker);
- ``strm``: the same b single-query requests in flight on one Router.InferStream.
Raw FAISS runs ``index.search`` on b queries at a time. Mesh requests set ``omit_hits``
(ids and scores only, as raw FAISS returns). The mesh is nats + router + batcher + one
retrieval worker as local processes; the client runs in this process.

``--codecs`` (default ``none,float16``): one mesh per warm codec of the worker
(``INFERMESH_WARM_CODEC``), started in turn over the same collection, raw FAISS measured
again beside each cell. ``float16`` holds warm blocks at half the bytes (FAISS scans them as
``QT_fp16``); its recall is printed beside raw FAISS's, and "equal" means within 0.005.

Goals: recall@10 >= 0.95 at the chosen nprobe; through the mesh at equal recall >= 0.8x raw
QPS at batch 1, >= 1.0x at 64, >= 2x at >= 256.
Quick run: ``python -m bench.retrieval --n 200000``; the issue's run: ``--n 1000000``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import faiss
import numpy as np

from bench.loadgen import machine
from bench.retrieval_engine import mixture, recall
from services.retrieval_worker import bulk
from services.retrieval_worker.manifest import CENTROIDS_NAME, CollectionSpec
from shared.cli.ingest import Ingester
from shared.cli.supervisor import LocalMesh
from shared.client import AsyncClient, Client

NAME = "bench"
#: warm codec, nprobe, batch, recalls (raw, req, conc, strm), then QPS of raw, req, conc, strm.
Row = tuple[str, int, int, list[float], float, float, float, float]


@dataclass
class Data:
    """Base vectors (ids 0..n-1), queries, exact top-k, optional payloads."""

    xb: np.ndarray
    xq: np.ndarray
    truth: np.ndarray
    payloads: list[dict[str, object] | None] | None = None


def synthetic(n: int, dim: int, centres: int, queries: int, k: int, seed: int) -> Data:
    """The seeded Gaussian mixture of the issue's benchmark."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, dim), dtype=np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    xb = mixture(n, c, rng)
    xq = mixture(queries, c, rng)
    return Data(xb, xq, exact(xb, xq, k))


def stdlib(cache: Path, k: int) -> Data:
    """The demo corpus embedded with minilm-l6; every 10th document's text is a query."""
    from services.inference_worker.backends import Item
    from services.inference_worker.backends.factory import make_backend
    from services.inference_worker.repository import load_model
    from shared.cli.demo import build_file

    path = build_file(cache / "stdlib-4000.jsonl", 4000)
    docs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    texts = [str(d["text"]) for d in docs]
    cached = cache / f"stdlib-{len(docs)}-minilm-l6.npy"  # embedding takes minutes on 2 cores
    if cached.exists():
        emb = np.load(cached)
    else:
        backend = make_backend(
            load_model(Path("models/minilm-l6")),
            Path("models/minilm-l6"),
            cache / "models",
            threads=0,
        )
        emb = np.concatenate(
            [
                backend.execute([Item(texts=texts[lo : lo + 64])])[0]["embedding"]
                for lo in range(0, len(texts), 64)
            ]
        ).astype(np.float32)
        np.save(cached, emb)
    held = np.arange(len(docs)) % 10 == 0
    xb, xq = np.ascontiguousarray(emb[~held]), np.ascontiguousarray(emb[held])
    base_docs = [d for d, h in zip(docs, held, strict=True) if not h]
    payloads: list[dict[str, object] | None] = [
        {"text": d["text"], "metadata": d.get("metadata")} for d in base_docs
    ]
    return Data(xb, xq, exact(xb, xq, k), payloads)


def exact(xb: np.ndarray, xq: np.ndarray, k: int) -> np.ndarray:
    """Exact inner-product top-k ids."""
    flat = faiss.IndexFlatIP(xb.shape[1])
    flat.add(xb)
    return flat.search(xq, k)[1]


def timed_passes(run: Callable[[], np.ndarray], nq: int, min_s: float) -> tuple[np.ndarray, float]:
    """Whole passes over the queries until ``min_s``; ids of the first pass and QPS."""
    t = time.perf_counter()
    first = run()
    passes = 1
    while time.perf_counter() - t < min_s:
        run()
        passes += 1
    return first, passes * nq / (time.perf_counter() - t)


def raw_pass(ivf: faiss.IndexIVFFlat, xq: np.ndarray, k: int, batch: int) -> np.ndarray:
    """Raw FAISS over all queries, ``batch`` at a time."""
    return np.concatenate(
        [ivf.search(xq[lo : lo + batch], k)[1] for lo in range(0, len(xq), batch)]
    )


def req_pass(client: Client, xq: np.ndarray, k: int, nprobe: int, batch: int) -> np.ndarray:
    """Requests of ``batch`` queries each, one after another."""
    return np.concatenate(
        [
            client.infer(
                pipeline="search",
                collection=NAME,
                k=k,
                nprobe=nprobe,
                omit_hits=True,
                inputs={"query": xq[lo : lo + batch]},
                timeout=60,
            ).outputs["ids"]
            for lo in range(0, len(xq), batch)
        ]
    )


#: One single-query search: query [1, dim] -> ids [k].
Search1 = Callable[[np.ndarray], Awaitable[np.ndarray]]


async def conc_pass(search: Search1, xq: np.ndarray, k: int, inflight: int) -> np.ndarray:
    """``inflight`` single-query requests in flight at once; ids in query order."""
    ids = np.full((len(xq), k), -1, dtype=np.int64)
    queue = iter(range(len(xq)))

    async def lane() -> None:
        for i in queue:
            ids[i] = await search(xq[i : i + 1])

    await asyncio.gather(*(lane() for _ in range(min(inflight, len(xq)))))
    return ids


async def conc_timed(
    router: str, xq: np.ndarray, k: int, nprobe: int, inflight: int, min_s: float, stream: bool
) -> tuple[np.ndarray, float]:
    """Concurrent single queries (unary Infer calls, or one InferStream): whole passes until
    ``min_s``; first-pass ids and QPS."""
    async with AsyncClient(router) as client:
        multiplexed = client.stream() if stream else None

        async def search(q: np.ndarray) -> np.ndarray:
            result = await (multiplexed or client).infer(
                pipeline="search",
                collection=NAME,
                k=k,
                nprobe=nprobe,
                omit_hits=True,
                inputs={"query": q},
                timeout=60,
            )
            return result.outputs["ids"][0]

        await conc_pass(search, xq[:inflight], k, inflight)  # warm the channel
        t = time.perf_counter()
        first = await conc_pass(search, xq, k, inflight)
        passes = 1
        while time.perf_counter() - t < min_s:
            await conc_pass(search, xq, k, inflight)
            passes += 1
        qps = passes * len(xq) / (time.perf_counter() - t)
        if multiplexed is not None:
            await multiplexed.close()
        return first, qps


def load() -> str:
    """The 1/5/15-minute load averages (the machine is shared)."""
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def main() -> None:
    """Build data, the collection and raw FAISS; start the mesh; print the table and goals."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", choices=["synthetic", "stdlib"], default="synthetic")
    ap.add_argument("--n", type=int, default=200_000, help="synthetic rows (issue: 1000000)")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--centres", type=int, default=1000)
    ap.add_argument("--nlist", type=int, default=0, help="0: 1024 synthetic, 32 stdlib")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--nprobe", default="", help="default: 1,2,4,8")
    ap.add_argument("--batches", default="1,64,256,1024")
    ap.add_argument("--min-s", type=float, default=2.0, help="least time per cell")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", default=".infermesh/bench", help="stdlib corpus and model cache")
    ap.add_argument("--env", default="", help="extra mesh env, KEY=VALUE,KEY=VALUE")
    ap.add_argument("--codecs", default="none,float16",
                    help="the worker's warm codecs to measure, one mesh each (none,float16,sq8)")
    args = ap.parse_args()
    stdlib_data = args.data == "stdlib"
    nlist = args.nlist or (32 if stdlib_data else 1024)  # >= 39 training points per list
    nprobes = [int(v) for v in (args.nprobe or "1,2,4,8").split(",")]
    batches = [int(v) for v in args.batches.split(",")]
    codecs = [c for c in args.codecs.split(",") if c]

    print(f"machine: {machine()}; faiss {faiss.__version__} omp={faiss.omp_get_max_threads()}")
    print(f"load average at start: {load()}")
    t = time.perf_counter()
    data = (
        stdlib(Path(args.cache), args.k)
        if stdlib_data
        else synthetic(args.n, args.dim, args.centres, args.queries, args.k, args.seed)
    )
    n, dim = data.xb.shape
    print(
        f"data {args.data}: {n} x {dim}, {len(data.xq)} queries, truth in "
        f"{time.perf_counter() - t:.1f}s"
    )

    with tempfile.TemporaryDirectory(prefix="bench-mesh-") as tmp:
        root = Path(tmp) / "collections" / NAME
        t = time.perf_counter()
        spec = CollectionSpec(name=NAME, dim=dim, nlist=nlist, metric="ip")
        bulk.build(root, spec, np.arange(n), data.xb, data.payloads, stream_seq=0)
        print(
            f"bulk build (train on {min(n, bulk.TRAIN_PER_LIST * nlist)} sampled rows, "
            f"assign, flush) {time.perf_counter() - t:.1f}s"
        )
        quant = faiss.IndexFlatIP(dim)
        quant.add(np.load(root / CENTROIDS_NAME))
        ivf = faiss.IndexIVFFlat(quant, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.is_trained = True  # the collection's centroids: same lists probed
        ivf.add(data.xb)

        env = dict(kv.split("=", 1) for kv in args.env.split(",") if kv)
        rows: list[Row] = []
        for codec in codecs:
            rows += measure(
                Path(tmp), {**env, "INFERMESH_WARM_CODEC": codec}, data, ivf, nprobes,
                batches, args.k, args.min_s,
            )
    print(f"load average at end: {load()}")
    for codec in codecs:
        report([r for r in rows if r[0] == codec], codec)


def measure(
    root: Path, env: dict[str, str], data: Data, ivf: faiss.IndexIVFFlat, nprobes: list[int],
    batches: list[int], k: int, min_s: float,
) -> list[Row]:
    """One mesh over the bulk-built collection; raw FAISS and the mesh, cell by cell."""
    codec = env["INFERMESH_WARM_CODEC"]
    n = len(data.xb)
    rows: list[Row] = []
    with LocalMesh(root, env=env, replicas={"inference-worker": 0, "tiering": 0}) as mesh:
        t = time.perf_counter()
        mesh.start()
        wait_advertised(mesh.router_address, n)
        print(f"mesh up (warm codec {codec}), collection advertised in "
              f"{time.perf_counter() - t:.1f}s")
        print(
            f"{'codec':>7} {'nprobe':>6} {'batch':>5} {'R raw':>6} {'raw qps':>8} {'R req':>6} "
            f"{'req qps':>8} {'x':>5} {'R conc':>6} {'conc qps':>8} {'x':>5} "
            f"{'R strm':>6} {'strm qps':>8} {'x':>5}",
            flush=True,
        )
        with Client(mesh.router_address) as client:
            for nprobe in nprobes:
                ivf.nprobe = nprobe
                for batch in batches:
                    raw_ids, raw_qps = timed_passes(
                        partial(raw_pass, ivf, data.xq, k, batch), len(data.xq), min_s
                    )
                    req_ids, req_qps = timed_passes(
                        partial(req_pass, client, data.xq, k, nprobe, batch),
                        len(data.xq),
                        min_s,
                    )
                    conc_ids, conc_qps = asyncio.run(conc_timed(
                        mesh.router_address, data.xq, k, nprobe, batch, min_s, stream=False
                    ))
                    strm_ids, strm_qps = asyncio.run(conc_timed(
                        mesh.router_address, data.xq, k, nprobe, batch, min_s, stream=True
                    ))
                    r = [recall(i, data.truth) for i in (raw_ids, req_ids, conc_ids, strm_ids)]
                    rows.append((codec, nprobe, batch, r, raw_qps, req_qps, conc_qps, strm_qps))
                    print(
                        f"{codec:>7} {nprobe:>6} {batch:>5} {r[0]:6.3f} {raw_qps:8.0f} "
                        f"{r[1]:6.3f} {req_qps:8.0f} {req_qps / raw_qps:5.2f} {r[2]:6.3f} "
                        f"{conc_qps:8.0f} {conc_qps / raw_qps:5.2f} {r[3]:6.3f} "
                        f"{strm_qps:8.0f} {strm_qps / raw_qps:5.2f}",
                        flush=True,
                    )
    return rows


def wait_advertised(router: str, n: int, timeout: float = 300.0) -> None:
    """Until the router describes the collection with all rows and a serving worker."""
    ing = Ingester(router)
    deadline = time.monotonic() + timeout
    try:
        while True:
            info = ing.describe(NAME)
            if info is not None and info.count == n and info.workers:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"collection not advertised after {timeout:.0f}s: {info}")
            time.sleep(0.2)
    finally:
        ing.close()


def report(rows: list[Row], codec: str) -> None:
    """Goals at the chosen nprobe (the smallest whose raw recall reaches 0.95)."""
    ok = [r for r in rows if r[3][0] >= 0.95]
    if not ok:
        print("recall goal missed: no nprobe reaches recall@10 0.95 on raw FAISS")
        return
    chosen = min(r[1] for r in ok)
    print(f"warm codec {codec}: chosen nprobe {chosen} (smallest with raw recall@10 >= 0.95)")
    for _codec, nprobe, batch, r, raw, req, conc, strm in rows:
        if nprobe != chosen:
            continue
        same = all(abs(m - r[0]) <= 0.005 for m in r[1:])
        goal = 0.8 if batch == 1 else (1.0 if batch < 256 else 2.0)
        best = max(req, conc, strm) / raw
        print(
            f"batch {batch:>4}: recall raw {r[0]:.3f} mesh {r[1]:.3f}/{r[2]:.3f}/{r[3]:.3f} "
            f"({'equal' if same else 'DIFFERENT'}); best mesh {best:.2f}x raw, goal "
            f"{goal}x: {'met' if best >= goal else 'MISSED'}"
        )


if __name__ == "__main__":
    main()
