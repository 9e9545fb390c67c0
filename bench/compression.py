"""Compression per tier: memory and recall@10 of float32, float16 and SQ8 codes on one IVF.

The seed's claim to check: float16 storage "halves memory at ~98 % accuracy". Data is the
tiering/retrieval benchmarks' synthetic mixture (``--centres`` unit centres in ``--dim`` d,
each point a centre plus noise of the centre's norm, L2-normalised; inner product), with exact
ground truth from a flat index. One set of coarse centroids (spherical k-means, the
collection's seed) and the same lists and nprobe for every format, so only the codes differ:

- float32: FAISS ``IndexIVFFlat`` (what the engine's float32 blocks hand to FAISS);
- float16: FAISS ``IndexIVFScalarQuantizer`` ``QT_fp16`` without residual -- byte for byte
  the engine's float16 storage (its warm blocks are these codes; its hot tier keeps float16
  tensors; cold files are the same dtype); ``--engine`` also searches a real float16
  Collection to show the engine gets the same recall;
- SQ8: ``QT_8bit`` (per-dimension min/max, 1 byte a dimension) on the raw vectors, and on
  the residuals to the list centroid (``sq8-residual``), one range for the collection;
- the engine's warm codecs (``--engine``): a float32 Collection whose warm blocks are held
  as float16 (``INFERMESH_WARM_CODEC=float16``) or SQ8 with ranges per block (``sq8``, FAISS
  ``QT_8bit`` codes trained on each block's own rows; tiers.SQ8).

Memory is what a tier holds per vector: the code plus the 8-byte id (the engine's
``BlockView.nbytes``). "vs float32" is the share of float32 IVF's top-10 that a format finds
(accuracy of the compression alone, apart from IVF's own misses).

Run: ``python -m bench.compression`` (200 k, about a minute on 2 cores); ``--n 1000000``.
Results go to bench/results/compression.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from threadpoolctl import ThreadpoolController

from bench.loadgen import machine
from bench.retrieval_engine import recall
from bench.tiering import mixture
from services.retrieval_worker.blocks import Codec
from services.retrieval_worker.collection import Collection
from services.retrieval_worker.manifest import CollectionSpec


def ivf(kind: str, quantizer: faiss.IndexFlat, dim: int, nlist: int) -> faiss.IndexIVF:
    """An empty IVF index of one code format over the shared (trained) quantizer."""
    ip = faiss.METRIC_INNER_PRODUCT
    if kind == "float32":
        return faiss.IndexIVFFlat(quantizer, dim, nlist, ip)
    qt = faiss.ScalarQuantizer.QT_fp16 if kind == "float16" else faiss.ScalarQuantizer.QT_8bit
    return faiss.IndexIVFScalarQuantizer(quantizer, dim, nlist, qt, ip, kind == "sq8-residual")


def main() -> None:
    """Build the data and one index per format; print memory and recall per nprobe."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000, help="vectors (1000000 for the 1 M run)")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--centres", type=int, default=1000)
    ap.add_argument("--nlist", type=int, default=1024)
    ap.add_argument("--nprobe", default="1,2,4", help="comma list; 1 is the tiering run's")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--engine", action=argparse.BooleanOptionalAction, default=True,
                    help="also search the engine's Collections (float16, warm codecs)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/results/compression.json")
    args = ap.parse_args()
    # one FAISS thread and one BLAS thread: the machine is shared and recall needs no speed
    faiss.omp_set_num_threads(1)
    limiter = ThreadpoolController().select(prefix="libscipy_openblas").limit(limits=1)
    load0 = os.getloadavg()
    print(f"machine: {machine()}; load average {load0[0]:.1f} {load0[1]:.1f} {load0[2]:.1f}")
    rng = np.random.default_rng(args.seed)
    centres = rng.standard_normal((args.centres, args.dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    xb = mixture(args.n, centres, rng)
    xq = mixture(args.queries, centres, np.random.default_rng(99))
    flat = faiss.IndexFlatIP(args.dim)
    flat.add(xb)
    _, truth = flat.search(xq, args.k)
    del flat
    # the collection's training: spherical k-means, its default seed, 40 points a list
    spec = CollectionSpec(name="bench", dim=args.dim, nlist=args.nlist, dtype="float16")
    km = faiss.Kmeans(args.dim, args.nlist, niter=20, seed=spec.seed, spherical=True)
    km.train(xb[rng.choice(args.n, min(args.n, 40 * args.nlist), replace=False)])
    centroids = np.ascontiguousarray(km.centroids, dtype=np.float32)
    quantizer = faiss.IndexFlatIP(args.dim)
    quantizer.add(centroids)
    nprobes = [int(v) for v in args.nprobe.split(",")]
    rows: list[dict[str, Any]] = []
    found32: dict[int, np.ndarray] = {}
    for kind in ("float32", "float16", "sq8", "sq8-residual"):
        index = ivf(kind, quantizer, args.dim, args.nlist)
        index.train(xb[:100_000])  # SQ8's per-dimension ranges; a no-op for the others
        index.add(xb)
        code = int(index.code_size)
        row: dict[str, Any] = {"format": kind, "bytes_per_vector": code + 8,
                               "mb": args.n * (code + 8) / 1e6}
        for nprobe in nprobes:
            index.nprobe = nprobe
            _, ids = index.search(xq, args.k)
            if kind == "float32":
                found32[nprobe] = ids
            row[f"recall@{args.k} nprobe {nprobe}"] = recall(ids, truth)
            row[f"vs float32 nprobe {nprobe}"] = recall(ids, found32[nprobe])
        rows.append(row)
        del index
    if args.engine:
        tmp = Path(tempfile.mkdtemp(prefix="bench-compression-"))
        try:
            spec32 = CollectionSpec(name="bench32", dim=args.dim, nlist=args.nlist)
            engines = [("float16 (engine Collection)", spec, Codec.NONE),
                       ("float16 warm codec (engine)", spec32, Codec.FLOAT16),
                       ("sq8 warm codec, ranges per block (engine)", spec32, Codec.SQ8)]
            for name, sp, codec in engines:
                col = Collection.create(tmp / sp.name / codec.value, sp, flush_rows=10**9,
                                        warm_codec=codec)
                # the same centroids: the engine trains the same k-means on the same sample,
                # but handing them over keeps the lists identical whatever the thread count
                col.train(centroids)
                for seq, lo in enumerate(range(0, args.n, 100_000), start=1):
                    col.upsert(np.arange(lo, min(lo + 100_000, args.n)), xb[lo : lo + 100_000],
                               seq=seq)
                col.flush()
                nbytes = sum(col.block_bytes().values())
                row = {"format": name, "bytes_per_vector": nbytes / args.n, "mb": nbytes / 1e6}
                for nprobe in nprobes:
                    ids = col.search(xq, args.k, nprobe)[1]
                    row[f"recall@{args.k} nprobe {nprobe}"] = recall(ids, truth)
                    row[f"vs float32 nprobe {nprobe}"] = recall(ids, found32[nprobe])
                rows.append(row)
                col.close()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    base = rows[0]["mb"]
    load1 = os.getloadavg()
    print(f"data {args.n} x {args.dim}, {args.queries} queries, nlist {args.nlist}, "
          f"exact truth; same centroids and lists for every format")
    head = "| format | bytes/vector | MB | vs float32 memory |"
    head += "".join(f" recall@{args.k} np={p} | found of f32 top-{args.k} np={p} |"
                    for p in nprobes)
    print(head)
    print("|---" * (4 + 2 * len(nprobes)) + "|")
    for r in rows:
        line = (f"| {r['format']} | {r['bytes_per_vector']:.0f} | {r['mb']:.0f} | "
                f"{r['mb'] / base:.2f}x |")
        line += "".join(f" {r[f'recall@{args.k} nprobe {p}']:.3f} | "
                        f"{r[f'vs float32 nprobe {p}']:.3f} |" for p in nprobes)
        print(line)
    print(f"load average after: {load1[0]:.1f} {load1[1]:.1f} {load1[2]:.1f}")
    del limiter
    out = {"machine": machine(), "load_before": load0, "load_after": load1,
           "args": vars(args), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
