"""Milvus Lite (pymilvus + milvus-lite, embedded): IVF_FLAT and HNSW on the bench collection.

Runs in .bench/venvs/milvus::

    .bench/venvs/milvus/bin/python -m bench.peers.milvus_peer --data DIR --index IVF_FLAT
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
EFS = [10, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256]
HNSW_M = 16
HNSW_EF_CONSTRUCTION = 100


def main() -> None:
    """Insert, build one index, find the search knob of equal recall, time batch 1/64."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--index", choices=["IVF_FLAT", "HNSW"], required=True)
    ap.add_argument("--budget-s", type=float, default=5.0)
    args = ap.parse_args()

    from importlib import metadata

    from pymilvus import DataType, MilvusClient

    xb, xq, truth, meta = load_data(args.data)
    nlist, dim = int(meta["nlist"]), xb.shape[1]
    tmp = Path(tempfile.mkdtemp(prefix="bench-milvus-"))
    try:
        base = rss_bytes()
        client = MilvusClient(str(tmp / "bench.db"))
        schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
        client.create_collection("bench", schema=schema)
        t = time.perf_counter()
        for lo in range(0, len(xb), 10_000):
            chunk = np.asarray(xb[lo : lo + 10_000])
            client.insert("bench", [{"id": lo + i, "vector": v} for i, v in enumerate(chunk)])
        client.flush("bench")
        insert_s = time.perf_counter() - t
        t = time.perf_counter()
        index = client.prepare_index_params()
        # PEERS.md: flat build parameters are silently ignored; they go under "params".
        params: dict[str, Any] = (
            {"nlist": nlist}
            if args.index == "IVF_FLAT"
            else {"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION}
        )
        index.add_index(
            field_name="vector", index_type=args.index, metric_type="IP", params={"params": params}
        )
        try:
            client.create_index("bench", index)
        except Exception as exc:
            # A long build (HNSW at 1 M) outlives the gRPC keepalive; pymilvus retries the
            # call and the retry finds the index the first attempt built.
            if "already exists" not in str(exc):
                raise
        built = client.describe_index("bench", "vector")
        client.load_collection("bench")
        index_s = time.perf_counter() - t
        mem = rss_bytes() - base
        key = "nprobe" if args.index == "IVF_FLAT" else "ef"

        def make(knob: int):  # type: ignore[no-untyped-def]
            def search(q: np.ndarray) -> np.ndarray:
                hits = client.search(
                    "bench",
                    data=q.tolist(),
                    limit=truth.shape[1],
                    search_params={"metric_type": "IP", "params": {key: knob}},
                    output_fields=["id"],
                )
                out = np.full((len(q), truth.shape[1]), -1, dtype=np.int64)
                for row, h in enumerate(hits):
                    ids = [int(x["id"]) for x in h]
                    out[row, : len(ids)] = ids
                return out

            return search

        knobs = NPROBES if args.index == "IVF_FLAT" else EFS
        knob, tried = sweep(make, knobs, xq, truth, args.budget_s)
        rows = (
            []
            if knob is None
            else [measure(make(knob), xq, truth, b, args.budget_s) for b in (1, 64)]
        )
        desc = (
            f"IVF_FLAT nlist={nlist}"
            if args.index == "IVF_FLAT"
            else f"HNSW M={HNSW_M} efC={HNSW_EF_CONSTRUCTION}"
        )
        emit(
            {
                "engine": "Milvus Lite",
                "index": desc,
                "knob": None if knob is None else f"{key}={knob}",
                "sweep": tried,
                "built": {k: str(v) for k, v in built.items()},
                "build_s": round(insert_s + index_s, 1),
                "insert_s": round(insert_s, 1),
                "index_s": round(index_s, 1),
                "mem_bytes": mem,
                "rows": rows,
                "versions": {n: metadata.version(n) for n in ("pymilvus", "milvus-lite")},
            }
        )
        client.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
