"""The infermesh side of the side-by-side benchmark: the real mesh as local processes.

Unlike the other modules here this one runs in the project venv and imports the project:
``LocalMesh`` (nats-server + the services, as ``infermesh up`` runs them) for inference,
and ``bench/retrieval.py``'s own functions (``load``, ``mesh_batched``) for retrieval, so
the numbers are the ones that benchmark would print.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from bench.peers.common import LOGS, RECALL_TARGET, load_data, recall
from shared.cli.supervisor import LocalMesh

ROOT = Path(__file__).resolve().parents[2]
MODEL_CACHE = ROOT / ".infermesh" / "models"
NPROBES = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128]

#: Services without OpenTelemetry spans: no exporter is configured in the benchmark, and
#: the peers trace nothing either.
ENV = {"INFERMESH_TRACING": "false", "INFERMESH_LOG_LEVEL": "WARNING"}
#: The batcher logs each batch policy it reads (a line per change, not per request): the
#: logs are kept in ``.bench/logs/mesh-<run>/``, so a run's tail can be read against what
#: the controller did at the time.
SERVICE_ENV = {"batcher": {"INFERMESH_LOG_LEVEL": "INFO"}}


def versions() -> dict[str, str]:
    """infermesh's own version and the engines under it."""
    from importlib import metadata

    out = {}
    for name in ("infermesh", "onnxruntime", "faiss-gpu", "grpcio", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def model_repository(root: Path) -> Path:
    """The shipped minilm-l6 and echo configs with ``accepts_text`` off, echo at FP32[16].

    Why a copy: for a text model the router's KServe ModelConfig declares an optional TEXT
    input that ModelMetadata does not list, and perf_analyzer refuses such a model ("no
    metadata found for input tensor TEXT"). The benchmark sends token ids, never text, so
    turning text off changes nothing it measures; every other field is as shipped.
    """
    for name, shape in (("minilm-l6", None), ("echo", [16])):
        config = json.loads((ROOT / "models" / name / "config.json").read_text())
        config["accepts_text"] = False
        if shape is not None:
            for tensor in config["inputs"] + config["outputs"]:
                tensor["shape"] = shape
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / "config.json").write_text(json.dumps(config, indent=2))
    return root


@contextmanager
def inference_mesh(models: str = "minilm-l6,echo") -> Iterator[LocalMesh]:
    """A started mesh (nats, router, batcher, inference worker) serving the shipped models."""
    with tempfile.TemporaryDirectory(prefix="bench-compare-") as tmp:
        repo = model_repository(Path(tmp) / "models")
        env = {
            **ENV,
            "INFERMESH_MODELS": models,
            "INFERMESH_MODEL_CACHE": str(MODEL_CACHE),
            "INFERMESH_MODEL_REPOSITORY": str(repo),
        }
        with LocalMesh(
            Path(tmp) / "mesh",
            env=env,
            replicas={"retrieval-worker": 0, "tiering": 0},
            service_env=SERVICE_ENV,
            keep_logs=LOGS / "mesh-inference",
        ) as mesh:
            mesh.start()
            yield mesh


def _rss_anon(pid: int) -> int:
    """A process's anonymous resident memory (heap; not file-backed or mmapped pages)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def _latencies(
    router: str, xq: np.ndarray, nprobe: int, batch: int, budget_s: float, k: int
) -> np.ndarray:
    """Per-request latency (ms) of sequential requests of ``batch`` queries."""
    from shared.client import Client

    lat = []
    with Client(router) as client:
        t0 = time.perf_counter()
        for lo in range(0, len(xq), batch):
            t = time.perf_counter()
            client.infer(
                pipeline="search",
                collection="bench",
                k=k,
                nprobe=nprobe,
                omit_hits=True,
                inputs={"query": xq[lo : lo + batch]},
                timeout=60,
            )
            lat.append((time.perf_counter() - t) * 1000)
            if time.perf_counter() - t0 > budget_s:
                break
    return np.array(lat)


def retrieval(data_dir: Path, budget_s: float, codec: str = "none") -> dict[str, Any]:
    """Build the collection, serve it through the mesh, find the nprobe of equal recall.

    ``codec`` is the retrieval worker's warm codec (``INFERMESH_WARM_CODEC``): ``none`` holds
    the float32 vectors as stored, ``float16`` half the bytes (scores of the float16 values).

    Uses bench/retrieval.py's own steps: ``bulk.build`` of the collection offline with the
    engine into the worker's directory (as that benchmark does: JetStream ingest of 200 k
    rows takes minutes on 2 cores), ``wait_advertised``, ``req_pass`` (one Router.Infer of
    ``batch`` queries at a time, ids only) timed by ``timed_passes``.
    """
    from functools import partial

    from bench import retrieval as rb
    from services.retrieval_worker.manifest import CollectionSpec
    from shared.client import Client

    xb, xq, truth, meta = load_data(data_dir)
    nlist, k, n = int(meta["nlist"]), truth.shape[1], len(xb)
    with tempfile.TemporaryDirectory(prefix="bench-compare-") as tmp:
        t = time.perf_counter()
        spec = CollectionSpec(name=rb.NAME, dim=xb.shape[1], nlist=nlist, metric="ip")
        rb.bulk.build(
            Path(tmp) / "collections" / rb.NAME,
            spec,
            np.arange(n),
            np.ascontiguousarray(xb),
            None,
            stream_seq=0,
        )
        build_s = time.perf_counter() - t
        env = {**ENV, "INFERMESH_WARM_CODEC": codec}
        with LocalMesh(
            Path(tmp),
            env=env,
            replicas={"inference-worker": 0, "tiering": 0},
            keep_logs=LOGS / f"mesh-retrieval-{codec}",
        ) as mesh:
            t = time.perf_counter()
            mesh.start()
            rb.wait_advertised(mesh.router_address, n)
            open_s = time.perf_counter() - t
            mem = _rss_anon(mesh.child("retrieval-worker").pid)
            tried: list[dict[str, Any]] = []
            knob = None
            rows = []
            with Client(mesh.router_address) as client:
                for nprobe in NPROBES:
                    t = time.perf_counter()
                    ids = rb.req_pass(client, xq, k, nprobe, 64)
                    qps = len(xq) / (time.perf_counter() - t)
                    r = recall(ids, truth)
                    tried.append({"knob": nprobe, "recall": round(r, 4), "qps64": round(qps, 1)})
                    if r >= RECALL_TARGET:
                        knob = nprobe
                        break
                for batch in (1, 64) if knob is not None else ():
                    assert knob is not None
                    ids, qps = rb.timed_passes(
                        partial(rb.req_pass, client, xq, k, knob, batch), len(xq), budget_s
                    )
                    lat = _latencies(mesh.router_address, xq, knob, batch, budget_s / 2, k)
                    rows.append(
                        {
                            "batch": batch,
                            "qps": round(qps, 1),
                            "p50_ms": round(float(np.percentile(lat, 50)), 3),
                            "p99_ms": round(float(np.percentile(lat, 99)), 3),
                            "recall": round(recall(ids, truth), 4),
                            "queries": len(ids),
                        }
                    )
    return {
        "engine": "infermesh",
        "index": f"IVF_FLAT nlist={nlist}"
        + (f", {codec} blocks" if codec != "none" else "")
        + ", router+batcher+worker",
        "knob": None if knob is None else f"nprobe={knob}",
        "sweep": tried,
        "build_s": round(build_s, 1),
        "open_s": round(open_s, 1),
        "mem_bytes": mem,
        "rows": rows,
        "note": "build = bulk.build offline with the engine (train, assign, flush), as "
        "bench/retrieval.py does; memory = the retrieval worker's whole anonymous RSS "
        "(its interpreter included)",
    }
