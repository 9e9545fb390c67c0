"""Raw FAISS (IndexIVFFlat, in-process): the retrieval floor every engine is built on.

Runs in the project venv (it already pins faiss-gpu, which runs on CPU); imports nothing of
the project, so its memory is FAISS's alone::

    .venv/bin/python -m bench.peers.faiss_peer --data .bench/data/retrieval-200000
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from bench.peers.common import emit, load_data, measure, rss_bytes, sweep

NPROBES = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128]


def main() -> None:
    """Build IVF_FLAT on the collection, find the nprobe of equal recall, time batch 1/64."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--budget-s", type=float, default=5.0)
    args = ap.parse_args()

    import faiss

    xb, xq, truth, meta = load_data(args.data)
    nlist = int(meta["nlist"])
    base = rss_bytes()
    t = time.perf_counter()
    quant = faiss.IndexFlatIP(xb.shape[1])
    ivf = faiss.IndexIVFFlat(quant, xb.shape[1], nlist, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(0)
    ivf.train(
        np.ascontiguousarray(
            xb[np.sort(rng.choice(len(xb), min(len(xb), 64 * nlist), replace=False))]
        )
    )
    for lo in range(0, len(xb), 100_000):
        ivf.add(np.ascontiguousarray(xb[lo : lo + 100_000]))
    build_s = time.perf_counter() - t
    mem = rss_bytes() - base

    def make(nprobe: int):  # type: ignore[no-untyped-def]
        def search(q: np.ndarray) -> np.ndarray:
            ivf.nprobe = nprobe
            return ivf.search(q, truth.shape[1])[1]

        return search

    knob, tried = sweep(make, NPROBES, xq, truth, args.budget_s)
    rows = (
        [] if knob is None else [measure(make(knob), xq, truth, b, args.budget_s) for b in (1, 64)]
    )
    emit(
        {
            "engine": "FAISS (raw)",
            "index": f"IVF_FLAT nlist={nlist}",
            "knob": None if knob is None else f"nprobe={knob}",
            "sweep": tried,
            "build_s": round(build_s, 1),
            "mem_bytes": mem,
            "rows": rows,
            "versions": {"faiss": faiss.__version__, "numpy": np.__version__},
            "threads": faiss.omp_get_max_threads(),
        }
    )


if __name__ == "__main__":
    main()
