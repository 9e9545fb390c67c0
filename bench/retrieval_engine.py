"""Benchmark of the retrieval engine against raw FAISS IndexIVFFlat: recall@k and QPS.

Data (seeded): ``--centres`` unit centres drawn from N(0, I) and normalised; each point is a
centre plus Gaussian noise whose norm equals the centre's (1.0), then L2-normalised; queries
come from the same mixture. Inner product; exact ground truth from a flat index. Both engines
use the same centroids (trained once through the collection) and the same nprobe.

Goal: recall@10 >= 0.95 at the chosen nprobe; ours >= 0.8x FAISS QPS at batch 1, >= 1.0x at
64, >= 2x at >= 256. The ``grouped``/``faiss`` columns force one path, which is how the
crossover in ``search.DEFAULT_CROSSOVER`` was picked.

Run small: ``python -m bench.retrieval_engine --n 200000 --nlist 512``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from services.retrieval_worker.collection import Collection
from services.retrieval_worker.manifest import CollectionSpec


def mixture(n: int, centres: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Points around the centres: noise with the centre's norm, then normalised."""
    out = np.empty((n, centres.shape[1]), dtype=np.float32)
    for lo in range(0, n, 100_000):
        m = min(100_000, n - lo)
        c = centres[rng.integers(0, len(centres), m)]
        noise = rng.standard_normal(c.shape, dtype=np.float32)
        noise *= (np.linalg.norm(c, axis=1) / np.linalg.norm(noise, axis=1))[:, None]
        x = c + noise
        out[lo : lo + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of the true top-k found."""
    k = truth.shape[1]
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(found, truth, strict=True)]))


def timed(fn, queries: np.ndarray, batch: int, budget_s: float) -> tuple[np.ndarray, float]:  # type: ignore[no-untyped-def]
    """Run ``fn`` over the queries in batches (stopping after ``budget_s``); ids and QPS."""
    ids = []
    done = 0
    t0 = time.perf_counter()
    for lo in range(0, len(queries), batch):
        ids.append(fn(queries[lo : lo + batch]))
        done += len(ids[-1])
        if time.perf_counter() - t0 > budget_s:
            break
    dt = time.perf_counter() - t0
    return np.concatenate(ids), done / dt


def blas_report() -> str:
    """numpy's BLAS library, kernel and threads (threadpoolctl when installed)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "threadpoolctl not installed"
    parts = []
    for info in threadpool_info():
        parts.append(f"{info.get('internal_api')} {info.get('version')} "
                     f"arch={info.get('architecture')} threads={info.get('num_threads')}")
    return "; ".join(parts)


def main() -> None:
    """Build the data and both indexes, then print the recall/QPS table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--centres", type=int, default=1000)
    ap.add_argument("--nlist", type=int, default=1024)
    ap.add_argument("--lists-per-block", type=int, default=8)
    ap.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--nprobe", default="8,16,32,64")
    ap.add_argument("--batches", default="1,64,256,1000")
    ap.add_argument("--budget-s", type=float, default=3.0, help="time cap per cell")
    ap.add_argument("--paths", default="auto", help="ours: comma list of auto,grouped,faiss")
    ap.add_argument("--threads", type=int, default=0, help="faiss OpenMP threads (0 = default)")
    ap.add_argument("--blas-threads", type=int, default=1,
                    help="numpy BLAS threads (threadpoolctl); 0 = leave as is")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", default=None, help="collection directory (default: a temp dir)")
    args = ap.parse_args()
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    if args.blas_threads:
        # as the worker runs: single-threaded BLAS, the engine spreads lists over threads
        # only numpy's OpenBLAS: FAISS's own OpenBLAS is OpenMP-threaded, and limiting it
        # would also cut FAISS's OpenMP threads (the baseline) to one
        from threadpoolctl import ThreadpoolController

        ctl = ThreadpoolController()
        ctl.select(prefix="libscipy_openblas").limit(limits=args.blas_threads)

    print(f"machine: {os.cpu_count()} cpus; faiss {faiss.__version__} "
          f"omp={faiss.omp_get_max_threads()}; numpy {np.__version__}")
    if "OPENBLAS_CORETYPE" in os.environ:
        print(f"OPENBLAS_CORETYPE={os.environ['OPENBLAS_CORETYPE']}: {blas_report()}")
    else:
        print(f"BLAS: {blas_report()}")

    rng = np.random.default_rng(args.seed)
    centres = rng.standard_normal((args.centres, args.dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    t = time.perf_counter()
    xb = mixture(args.n, centres, rng)
    xq = mixture(args.queries, centres, rng)
    flat = faiss.IndexFlatIP(args.dim)
    flat.add(xb)
    _, truth = flat.search(xq, args.k)
    del flat
    print(f"data {args.n} x {args.dim}, {args.queries} queries, truth in "
          f"{time.perf_counter() - t:.1f}s")

    tmp = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench-retrieval-"))
    if (tmp / "c").exists():
        shutil.rmtree(tmp / "c")
    try:
        t = time.perf_counter()
        spec = CollectionSpec(name="bench", dim=args.dim, nlist=args.nlist, dtype=args.dtype,
                              lists_per_block=args.lists_per_block)
        col = Collection.create(tmp / "c", spec, flush_rows=10**9)
        sample = xb[rng.choice(args.n, min(args.n, 64 * args.nlist), replace=False)]
        col.train(sample)
        t_train = time.perf_counter() - t
        for seq, lo in enumerate(range(0, args.n, 100_000), start=1):
            col.upsert(np.arange(lo, min(lo + 100_000, args.n)), xb[lo : lo + 100_000], seq=seq)
        col.flush()
        print(f"collection: train {t_train:.1f}s, ingest+flush "
              f"{time.perf_counter() - t - t_train:.1f}s, {col.describe().blocks} blocks")

        quant = faiss.IndexFlatIP(args.dim)
        quant.add(col.centroids)
        ivf = faiss.IndexIVFFlat(quant, args.dim, args.nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.is_trained = True
        ivf.add(xb.astype(args.dtype).astype(np.float32))
        searcher = col._searcher  # the engine itself, to force a path per column
        assert searcher is not None

        paths = args.paths.split(",")
        head = f"{'nprobe':>6} {'batch':>5} {'q/list':>6} {'recall':>7} {'faiss qps':>10}"
        for p in paths:
            head += f" {p + ' qps':>12} {'x':>5}"
        print(head)
        for nprobe in [int(v) for v in args.nprobe.split(",")]:
            ivf.nprobe = nprobe
            for batch in [int(v) for v in args.batches.split(",")]:
                ids_f, qps_f = timed(lambda q: ivf.search(q, args.k)[1], xq, batch,
                                     args.budget_s)
                _, lists = quant.search(xq[:batch], nprobe)
                per_list = lists.size / np.unique(lists).size  # what picks the path
                line = f"{nprobe:>6} {batch:>5} {per_list:6.1f} " \
                       f"{recall(ids_f, truth[: len(ids_f)]):7.3f} {qps_f:10.0f}"
                for p in paths:
                    def ours(q: np.ndarray, p: str = p, nprobe: int = nprobe) -> np.ndarray:
                        return searcher.search(q, args.k, nprobe, path=p)[1]  # type: ignore[arg-type]
                    ids_o, qps_o = timed(ours, xq, batch, args.budget_s)
                    m = min(len(ids_o), len(ids_f))
                    r_o, r_f = recall(ids_o[:m], truth[:m]), recall(ids_f[:m], truth[:m])
                    line += f" {qps_o:12.0f} {qps_o / qps_f:5.2f}"
                    if abs(r_o - r_f) > 0.005:  # the engines should agree on the same queries
                        line += f" (recall {r_o:.3f} vs {r_f:.3f}!)"
                print(line, flush=True)
        col.close()
    finally:
        if not args.dir:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
