"""LanceDB (embedded, Rust core): IVF_FLAT and IVF_PQ on the bench collection.

Runs in .bench/venvs/lancedb::

    .bench/venvs/lancedb/bin/python -m bench.peers.lancedb_peer --data DIR --index IVF_FLAT
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.peers.common import emit, load_data, measure, rss_bytes, sweep

NPROBES = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128]
#: (nprobes, refine_factor): PQ alone does not reach recall 0.95 here; refining re-ranks
#: refine_factor * k candidates with the full vectors, as LanceDB recommends.
PQ_KNOBS = [
    (2, 10),
    (4, 10),
    (8, 10),
    (16, 10),
    (16, 20),
    (32, 20),
    (32, 50),
    (64, 50),
    (128, 50),
    (128, 100),
]
PQ_SUB_VECTORS = 48  # 8 dimensions per sub-vector at 384


def main() -> None:
    """Write the table, build one index, find the knob of equal recall, time batch 1/64."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--index", choices=["IVF_FLAT", "IVF_PQ"], required=True)
    ap.add_argument("--budget-s", type=float, default=5.0)
    args = ap.parse_args()

    from importlib import metadata

    import lancedb
    import pyarrow as pa
    from lancedb.index import IvfFlat, IvfPq

    xb, xq, truth, meta = load_data(args.data)
    nlist, dim = int(meta["nlist"]), xb.shape[1]
    tmp = Path(tempfile.mkdtemp(prefix="bench-lancedb-"))
    try:
        base = rss_bytes()
        db = lancedb.connect(str(tmp))
        t = time.perf_counter()
        table = None
        for lo in range(0, len(xb), 100_000):
            chunk = np.ascontiguousarray(xb[lo : lo + 100_000])
            batch = pa.table(
                {
                    "id": pa.array(np.arange(lo, lo + len(chunk), dtype=np.int64)),
                    "vector": pa.FixedSizeListArray.from_arrays(pa.array(chunk.ravel()), dim),
                }
            )
            if table is None:
                table = db.create_table("bench", data=batch)
            else:
                table.add(batch)
        assert table is not None
        insert_s = time.perf_counter() - t
        t = time.perf_counter()
        # Trained like FAISS and infermesh: a 64-per-list sample, FAISS's 25 k-means rounds
        # (LanceDB's defaults, 256 per list and 50 rounds, take tens of minutes at 1 M here).
        train = {"num_partitions": nlist, "sample_rate": 64, "max_iterations": 25}
        config: Any = (
            IvfFlat(distance_type="dot", **train)
            if args.index == "IVF_FLAT"
            else IvfPq(distance_type="dot", num_sub_vectors=PQ_SUB_VECTORS, **train)
        )
        table.create_index("vector", config=config)
        index_s = time.perf_counter() - t
        mem = rss_bytes() - base
        k = truth.shape[1]

        def make(knob: Any):  # type: ignore[no-untyped-def]
            nprobes, refine = knob if isinstance(knob, tuple) else (knob, 0)

            def search(q: np.ndarray) -> np.ndarray:
                query = table.search(q if len(q) > 1 else q[0]).distance_type("dot")
                query = query.nprobes(nprobes).limit(k).select(["id"])
                if refine:
                    query = query.refine_factor(refine)
                res = query.to_arrow()
                out = np.full((len(q), k), -1, dtype=np.int64)
                ids = res["id"].to_numpy()
                rows = (
                    res["query_index"].to_numpy()
                    if "query_index" in res.column_names
                    else np.zeros(len(ids), dtype=np.int64)
                )
                for row in range(len(q)):
                    found = ids[rows == row][:k]
                    out[row, : len(found)] = found
                return out

            return search

        knobs: list[Any] = NPROBES if args.index == "IVF_FLAT" else list(PQ_KNOBS)
        knob, tried = sweep(make, knobs, xq, truth, args.budget_s)
        rows = (
            []
            if knob is None
            else [measure(make(knob), xq, truth, b, args.budget_s) for b in (1, 64)]
        )
        if knob is None:
            desc = None
        elif isinstance(knob, tuple):
            desc = f"nprobes={knob[0]} refine={knob[1]}"
        else:
            desc = f"nprobes={knob}"
        index_desc = (
            f"IVF_FLAT nlist={nlist}"
            if args.index == "IVF_FLAT"
            else f"IVF_PQ nlist={nlist} m={PQ_SUB_VECTORS}"
        )
        emit(
            {
                "engine": "LanceDB",
                "index": index_desc,
                "knob": desc,
                "sweep": tried,
                "build_s": round(insert_s + index_s, 1),
                "insert_s": round(insert_s, 1),
                "index_s": round(index_s, 1),
                "mem_bytes": mem,
                "rows": rows,
                "versions": {
                    n: metadata.version(n) for n in ("lancedb", "pylance", "pyarrow") if _has(n)
                },
            }
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _has(name: str) -> bool:
    from importlib import metadata

    try:
        metadata.version(name)
    except metadata.PackageNotFoundError:
        return False
    return True


if __name__ == "__main__":
    main()
