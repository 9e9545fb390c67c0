"""Side by side with the peers: one command, one table (issue 10).

Runs the same workloads against infermesh and against Triton, Ray Serve, Milvus Lite,
LanceDB and raw FAISS, each peer installed into its own pinned venv under ``.bench/venvs/``
(never the project's ``.venv``), one system running at a time:

1. inference: all-MiniLM-L6-v2 on 32 pre-tokenized tokens, KServe v2 gRPC, concurrency
   1/8/32, driven by NVIDIA's perf_analyzer (infermesh router, Triton) and by one Python
   grpc.aio closed-loop client (bench/loadgen.py) common to infermesh, Triton and Ray Serve;
   every system runs each concurrency for ``settle_s`` before either client measures it
   (infermesh's batch controller needs a few 1-s decisions after a step in load; static
   batching does not, and loses nothing by the wait);
2. overhead: a trivial model, FP32[16] (y = 2x on Triton and Ray; infermesh's shipped
   ``echo`` model, y = x, the same cost class), same clients and concurrencies;
3. retrieval: the collection of bench/retrieval_engine.py (1 M x 384; 200 k with --quick),
   every engine at its cheapest setting reaching recall@10 >= 0.95: QPS at batch 1 and 64,
   p99, build time, memory. infermesh goes through bench/retrieval.py's own functions
   (bulk build, then Router.Infer requests of 1 or 64 queries through router + batcher +
   retrieval worker); each peer runs in its own process, so its memory is its own.

Writes ``bench/results/<date>.json`` and ``.md``, PNG plots, and regenerates the "Side by
side" section of README.md between its marker comments. A peer that cannot run gets a row
saying why. Prints the machine and every version first. Logs stay in ``.bench/logs/``:
perf_analyzer's output per run, and the mesh's service logs (``mesh-inference/``,
``mesh-retrieval-<codec>/``) with the batcher's policy trace, to read a row's tail against.

    python bench/compare.py                 # full run (make bench)
    python bench/compare.py --quick         # smoke run: shorter windows, 200 k vectors
    python bench/compare.py --only retrieval
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.loadgen import machine
from bench.peers import common, perf_analyzer, ray_peer, triton_peer
from bench.peers import mesh as infermesh
from bench.peers.client import Target, infer_once, load
from bench.peers.common import PeerUnavailable, free_port, spawn, venv

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
README = ROOT / "README.md"
BEGIN, END = "<!-- side-by-side:begin -->", "<!-- side-by-side:end -->"
ONNX = ROOT / ".infermesh" / "models" / "minilm-l6" / "model.onnx"
TOKENIZER = ROOT / ".infermesh" / "models" / "minilm-l6" / "tokenizer.json"
LEVELS = (1, 8, 32)
WORKLOADS = ("inference", "overhead", "retrieval")
SENTENCE = (
    "A man is playing a guitar on a crowded street corner while people walk past, "
    "some stopping to listen and drop coins into the open case at his feet."
)


def log(msg: str) -> None:
    """Progress on stderr with a timestamp, so stdout stays the report."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- inputs and checks ----------------------------------------------------------------------


def minilm_inputs() -> dict[str, np.ndarray]:
    """One sentence tokenized to exactly 32 tokens (truncated), as input_ids/attention_mask."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(TOKENIZER))
    tok.no_padding()  # the saved tokenizer pads to 128
    tok.enable_truncation(32)
    enc = tok.encode(SENTENCE)
    if len(enc.ids) != 32:
        raise RuntimeError(f"the sentence gives {len(enc.ids)} tokens, not 32")
    return {
        "input_ids": np.array([enc.ids], dtype=np.int64),
        "attention_mask": np.array([enc.attention_mask], dtype=np.int64),
    }


def reference_embedding(inputs: dict[str, np.ndarray]) -> np.ndarray:
    """The embedding ONNX Runtime computes in-process, to check every system's output."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(ONNX), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, dict(inputs))[0], dtype=np.float32)


def check(system: str, got: np.ndarray, want: np.ndarray, cosine: bool) -> str:
    """Raise unless the output matches; a one-line note of what was checked."""
    if got.size != want.size:
        raise PeerUnavailable(
            f"{system} returned {got.size} values, expected {want.size} "
            "(empty outputs: numpy 2 in Triton's stub venv? see PEERS.md)"
        )
    got, want = got.reshape(-1), want.reshape(-1)
    if cosine:
        cos = float(got @ want / (np.linalg.norm(got) * np.linalg.norm(want)))
        if cos < 0.999:
            raise PeerUnavailable(f"{system}: embedding cosine {cos:.4f} to the reference")
        return f"cos={cos:.6f}"
    if not np.allclose(got, want):
        raise PeerUnavailable(f"{system}: output {got[:4]} != expected {want[:4]}")
    return "exact"


# -- serving workloads (inference, overhead) -----------------------------------------------


class Serving:
    """Collects the rows of the two serving workloads, one system at a time."""

    def __init__(self, workloads: list[str], quick: bool, work: Path) -> None:
        self.workloads = workloads
        self.seconds = 4.0 if quick else 10.0
        #: Load at each level before it is measured (as bench/inference.py does).
        self.settle_s = 2.0 if quick else 10.0
        self.window_ms = 2000 if quick else 5000
        self.work = work
        self.rows: list[dict[str, Any]] = []
        self.unavailable: list[dict[str, str]] = []
        self.checks: dict[str, str] = {}
        self.minilm = minilm_inputs()
        self.embedding = reference_embedding(self.minilm)
        self.x = np.arange(16, dtype=np.float32).reshape(1, 16)
        self.perf_ok = ""
        self.minilm_data = perf_analyzer.write_input(
            work / "minilm.json", {k: v[0].tolist() for k, v in self.minilm.items()}
        )
        self.double_data = {
            name: perf_analyzer.write_input(work / f"{name}.json", {name: self.x[0].tolist()})
            for name in ("x", "INPUT0")
        }

    def skip(self, system: str, workload: str, client: str, why: str) -> None:
        """A row saying why a system/client pair did not run."""
        log(f"{system} / {workload} / {client}: cannot run: {why}")
        self.unavailable.append(
            {"workload": workload, "system": system, "client": client, "reason": why}
        )

    def measure(
        self,
        system: str,
        workload: str,
        target: Target,
        inputs: dict[str, np.ndarray],
        expect: np.ndarray,
        cosine: bool,
        perf: tuple[Path, dict[str, int]] | None,
        note: str = "",
    ) -> None:
        """Check one real output, then perf_analyzer (when given) and the Python client."""
        try:
            got = asyncio.run(infer_once(target, inputs))
            self.checks[f"{system}/{workload}"] = check(system, got, expect, cosine)
        except Exception as exc:  # any failure of the peer is reported, not fatal
            self.skip(system, workload, "all", f"output check failed: {exc}")
            return
        log(f"{system} / {workload}: output checked ({self.checks[f'{system}/{workload}']})")
        if perf is not None and not self.perf_ok:
            for c in LEVELS:
                asyncio.run(load(target, inputs, c, self.settle_s, warmup_s=0.0))
                try:
                    r = perf_analyzer.run(
                        target.model,
                        target.address,
                        c,
                        perf[0],
                        perf[1],
                        self.window_ms,
                        system.split()[0].lower(),
                    )
                except (PeerUnavailable, subprocess.TimeoutExpired) as exc:
                    self.skip(system, workload, f"perf_analyzer c={c}", str(exc))
                    continue
                self._row(system, workload, "perf_analyzer", r, note)
        for c in LEVELS:
            run = asyncio.run(load(target, inputs, c, self.seconds, warmup_s=self.settle_s))
            row = run.row()
            row.pop("label")
            self._row(system, workload, "python grpc.aio", row, note)

    def _row(self, system: str, workload: str, client: str, r: dict[str, Any], note: str) -> None:
        if r.pop("stable", True) is False:
            note = (note + "; " if note else "") + "perf_analyzer: windows not within 50%"
        row = {"workload": workload, "system": system, "client": client, **r, "note": note}
        log(
            f"  {system:10} {workload:9} {client:15} c={r['concurrency']:>2} "
            f"{r['throughput']:>8} /s p50 {r['p50_ms']} p99 {r['p99_ms']} ms"
        )
        self.rows.append(row)

    def run_infermesh(self) -> None:
        """The mesh as `infermesh up` runs it (one router, batcher, worker), KServe v2."""
        log("infermesh: starting the local mesh (nats, router, batcher, inference worker)")
        with infermesh.inference_mesh() as mesh:
            addr = mesh.router_address
            if "inference" in self.workloads:
                self.measure(
                    "infermesh",
                    "inference",
                    Target("infermesh", addr, "minilm-l6"),
                    self.minilm,
                    self.embedding,
                    True,
                    (self.minilm_data, {"input_ids": 32, "attention_mask": 32}),
                )
            if "overhead" in self.workloads:
                self.measure(
                    "infermesh",
                    "overhead",
                    Target("infermesh", addr, "echo"),
                    {"INPUT0": self.x},
                    self.x,
                    False,
                    (self.double_data["INPUT0"], {"INPUT0": 16}),
                    note="echo model (y = x), same cost class as y = 2x",
                )

    def run_triton(self) -> None:
        """tritonserver (Python backend: ORT MiniLM, y = 2x), dynamic batching on."""
        try:
            triton_peer.ensure()
            repo = triton_peer.write_repository(self.work / "triton-models", ONNX)
            port = free_port()
            log("triton: starting tritonserver")
            proc = triton_peer.start(repo, port)
        except PeerUnavailable as exc:
            for w in self.workloads:
                self.skip("Triton", w, "all", str(exc))
            return
        try:
            addr = f"127.0.0.1:{port}"
            if "inference" in self.workloads:
                self.measure(
                    "Triton",
                    "inference",
                    Target("Triton", addr, "minilm-l6"),
                    self.minilm,
                    self.embedding,
                    True,
                    (self.minilm_data, {"input_ids": 32, "attention_mask": 32}),
                    note="Python backend, ORT 2 threads, dynamic batching 5 ms",
                )
            if "overhead" in self.workloads:
                self.measure(
                    "Triton",
                    "overhead",
                    Target("Triton", addr, "double"),
                    {"x": self.x},
                    2 * self.x,
                    False,
                    (self.double_data["x"], {"x": 16}),
                    note="Python backend y = 2x, dynamic batching 500 us",
                )
        finally:
            proc.stop()

    def run_ray(self) -> None:
        """Ray Serve behind its gRPC ingress (KServe v2 proto), @serve.batch."""
        why_no_perf = (
            "perf_analyzer cannot speak Ray's gRPC ingress (it routes by an "
            "'application' metadata header and answers no metadata/config calls)"
        )
        try:
            ray_peer.ensure()
            port = free_port()
            log("ray: starting Ray (2 CPUs) and Serve with the gRPC ingress")
            proc = spawn(
                "ray-serve",
                [
                    str(venv("ray").python),
                    "-m",
                    "bench.peers.ray_peer",
                    "--grpc-port",
                    str(port),
                    "--http-port",
                    str(free_port()),
                    "--onnx",
                    str(ONNX),
                ],
            )
            proc.wait_for_line("READY", 240)
        except PeerUnavailable as exc:
            for w in self.workloads:
                self.skip("Ray Serve", w, "all", str(exc))
            return
        try:
            addr = f"127.0.0.1:{port}"
            if "inference" in self.workloads:
                self.skip("Ray Serve", "inference", "perf_analyzer", why_no_perf)
                self.measure(
                    "Ray Serve",
                    "inference",
                    Target("Ray Serve", addr, "minilm-l6", (("application", "minilm"),)),
                    self.minilm,
                    self.embedding,
                    True,
                    None,
                    note="@serve.batch(64, 5 ms), ORT 2 threads",
                )
            if "overhead" in self.workloads:
                self.skip("Ray Serve", "overhead", "perf_analyzer", why_no_perf)
                self.measure(
                    "Ray Serve",
                    "overhead",
                    Target("Ray Serve", addr, "double", (("application", "double"),)),
                    {"x": self.x},
                    2 * self.x,
                    False,
                    None,
                    note="@serve.batch(64, 0.5 ms) y = 2x",
                )
        finally:
            proc.stop()

    def run(self) -> None:
        """perf_analyzer first (so a missing one is said once), then each system in turn."""
        try:
            perf_analyzer.ensure()
        except PeerUnavailable as exc:
            self.perf_ok = str(exc)
            for w in self.workloads:
                self.skip("all", w, "perf_analyzer", str(exc))
        self.run_infermesh()
        self.run_triton()
        self.run_ray()


# -- retrieval -----------------------------------------------------------------------------


def retrieval_data(n: int, dim: int, nlist: int, queries: int) -> Path:
    """The bench collection (bench/retrieval.py's generator and seed), cached under .bench/."""
    from bench.retrieval_engine import mixture

    out = common.BENCH_DIR / "data" / f"retrieval-{n}x{dim}"
    meta = {
        "n": n,
        "dim": dim,
        "nlist": nlist,
        "queries": queries,
        "seed": 0,
        "centres": 1000,
        "k": common.K,
    }
    if (out / "meta.json").is_file() and json.loads((out / "meta.json").read_text()) == meta:
        return out
    import faiss

    log(f"retrieval: generating {n} x {dim} (+ {queries} queries) and the exact top-10")
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((1000, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    xb = mixture(n, centres, rng)
    xq = mixture(queries, centres, rng)
    flat = faiss.IndexFlatIP(dim)
    flat.add(xb)
    _, truth = flat.search(xq, common.K)
    np.save(out / "xb.npy", xb)
    np.save(out / "xq.npy", xq)
    np.save(out / "truth.npy", truth)
    (out / "meta.json").write_text(json.dumps(meta))
    return out


def run_peer(
    label: str, python: Path, module: str, args: list[str], timeout: float
) -> dict[str, Any]:
    """One retrieval engine in its own process (its memory is its own); its RESULT."""
    log(f"retrieval: {label}")
    slug = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
    proc = spawn(f"retrieval-{slug}", [str(python), "-m", module, *args])
    try:
        proc.popen.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.stop()
        raise PeerUnavailable(f"{label} did not finish within {timeout:.0f}s") from None
    finally:
        proc.stop()
    text = proc.log_path.read_text(errors="replace")
    if proc.popen.returncode != 0:
        raise PeerUnavailable(
            f"{label} failed ({proc.popen.returncode}): "
            + " / ".join(text.strip().splitlines()[-2:])[-300:]
        )
    return common.parse_result(text)


def run_retrieval(quick: bool) -> dict[str, Any]:
    """Every engine on the same data; rows and the engines that could not run."""
    n, nlist = (200_000, 512) if quick else (1_000_000, 1024)
    budget = 2.0 if quick else 5.0
    timeout = 1800.0 if quick else 5400.0
    data = retrieval_data(n, 384, nlist, 1000)
    args = ["--data", str(data), "--budget-s", str(budget)]
    engines: list[dict[str, Any]] = []
    unavailable: list[dict[str, str]] = []
    # float32 blocks first: the goals read the first infermesh row; float16 blocks (the
    # worker's INFERMESH_WARM_CODEC) are the option a Milvus user knows as a lighter index
    for codec in ("none", "float16"):
        try:
            log(f"retrieval: infermesh, warm codec {codec} (bulk build, then served by the mesh)")
            engines.append(infermesh.retrieval(data, budget, codec))
        except Exception as exc:
            unavailable.append(
                {"engine": "infermesh", "reason": f"{type(exc).__name__}: {exc}"}
            )
    jobs: list[tuple[str, str, Callable[[], Path], str, list[str]]] = [
        (
            "FAISS (raw)",
            "project .venv",
            lambda: Path(sys.executable),
            "bench.peers.faiss_peer",
            [],
        ),
        (
            "Milvus Lite IVF_FLAT",
            "milvus",
            lambda: venv("milvus").ensure(),
            "bench.peers.milvus_peer",
            ["--index", "IVF_FLAT"],
        ),
        (
            "Milvus Lite HNSW",
            "milvus",
            lambda: venv("milvus").ensure(),
            "bench.peers.milvus_peer",
            ["--index", "HNSW"],
        ),
        (
            "LanceDB IVF_FLAT",
            "lancedb",
            lambda: venv("lancedb").ensure(),
            "bench.peers.lancedb_peer",
            ["--index", "IVF_FLAT"],
        ),
        (
            "LanceDB IVF_PQ",
            "lancedb",
            lambda: venv("lancedb").ensure(),
            "bench.peers.lancedb_peer",
            ["--index", "IVF_PQ"],
        ),
    ]
    for label, _venv, python, module, extra in jobs:
        try:
            engines.append(run_peer(label, python(), module, args + extra, timeout))
        except PeerUnavailable as exc:
            unavailable.append({"engine": label, "reason": str(exc)})
    for e in engines:
        log(
            f"  {e['engine']:12} {e['index']:32} {e.get('knob')} build {e['build_s']}s "
            + " ".join(
                f"b{r['batch']}={r['qps']}qps/p99 {r['p99_ms']}ms/R{r['recall']}" for r in e["rows"]
            )
        )
    return {
        "n": n,
        "dim": 384,
        "nlist": nlist,
        "queries": 1000,
        "recall_target": common.RECALL_TARGET,
        "engines": engines,
        "unavailable": unavailable,
    }


# -- verdicts, report ----------------------------------------------------------------------


def _find(
    rows: list[dict[str, Any]], workload: str, system: str, client: str, c: int
) -> dict[str, Any] | None:
    return next(
        (
            r
            for r in rows
            if r["workload"] == workload
            and r["system"] == system
            and r["client"] == client
            and r["concurrency"] == c
        ),
        None,
    )


def goals(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's goals as ratios of this run, each with OK/MISS and by how much."""
    out: list[dict[str, Any]] = []
    rows = result.get("serving", {}).get("rows", [])

    def ratio(name: str, value: float | None, goal: float, higher: bool) -> None:
        if value is None:
            out.append({"goal": name, "ratio": None, "verdict": "not measured"})
            return
        ok = value >= goal if higher else value <= goal
        miss = (
            ""
            if ok
            else (
                f" (short by {(goal - value) / goal:.1%})"
                if higher
                else f" (over by {(value - goal) / goal:.1%})"
            )
        )
        out.append(
            # Three places: at two, 0.996 read "1.0x, MISS (short by 0%)".
            {"goal": name, "ratio": round(value, 3), "verdict": ("OK" if ok else "MISS") + miss}
        )

    for client in ("perf_analyzer", "python grpc.aio"):
        m = _find(rows, "inference", "infermesh", client, 32)
        t = _find(rows, "inference", "Triton", client, 32)
        tput = p99 = None
        if m is not None and t is not None and t["throughput"] and t["p99_ms"]:
            tput, p99 = m["throughput"] / t["throughput"], m["p99_ms"] / t["p99_ms"]
        ratio(f"MiniLM c=32 throughput vs Triton >= 1.0x ({client})", tput, 1.0, True)
        ratio(f"MiniLM c=32 p99 vs Triton <= 0.7x ({client})", p99, 0.7, False)
        m = _find(rows, "overhead", "infermesh", client, 32)
        t = _find(rows, "overhead", "Triton", client, 32)
        ratio(
            f"trivial model c=32 throughput vs Triton >= 1.0x ({client})",
            m["throughput"] / t["throughput"] if m and t and t["throughput"] else None,
            1.0,
            True,
        )
    for workload in ("inference", "overhead"):
        for c in LEVELS:
            m = _find(rows, workload, "infermesh", "python grpc.aio", c)
            r = _find(rows, workload, "Ray Serve", "python grpc.aio", c)
            ratio(
                f"{workload} c={c} throughput vs Ray Serve >= 1.0x",
                m["throughput"] / r["throughput"] if m and r and r["throughput"] else None,
                1.0,
                True,
            )
    engines = result.get("retrieval", {}).get("engines", [])
    mine = next((e for e in engines if e["engine"] == "infermesh"), None)
    embedded = [e for e in engines if e["engine"] in ("Milvus Lite", "LanceDB") and e["rows"]]
    for batch in (1, 64):

        def qps(e: dict[str, Any], b: int = batch) -> float:
            return next((r["qps"] for r in e["rows"] if r["batch"] == b), 0.0)

        best = max(embedded, key=qps, default=None)
        value = qps(mine) / qps(best) if mine and mine["rows"] and best and qps(best) else None
        name = f"retrieval batch {batch} QPS vs best embedded engine >= 1.5x"
        if best is not None:
            name += f" ({best['engine']} {best['index']})"
        ratio(name, value, 1.5, True)
    return out


def markdown(result: dict[str, Any]) -> str:
    """The report as markdown (what README embeds)."""
    lines = [
        f"Measured {result['date']} by `python bench/compare.py"
        f"{' --quick' if result['quick'] else ''}`"
        f"{' (smoke run: short windows, 200 k vectors)' if result['quick'] else ''}.",
        "",
        f"Machine: {result['machine']}.",
        "",
    ]
    lines.append(
        "Versions: "
        + "; ".join(
            f"{sys_}: " + ", ".join(f"{k} {v}" for k, v in vs.items())
            for sys_, vs in result["versions"].items()
        )
        + "."
    )
    serving = result.get("serving")
    if serving:
        for workload, title in (
            ("inference", "MiniLM-L6, 32 tokens, KServe v2 gRPC"),
            ("overhead", "Trivial model, FP32[16]"),
        ):
            rows = [r for r in serving["rows"] if r["workload"] == workload]
            skipped = [u for u in serving["unavailable"] if u["workload"] == workload]
            if not rows and not skipped:
                continue
            lines += [
                "",
                f"**{title}** (closed loop; throughput in requests/s)",
                "",
                "| system | client | c | throughput | p50 ms | p99 ms | note |",
                "|---|---|---|---|---|---|---|",
            ]
            for r in rows:
                lines.append(
                    f"| {r['system']} | {r['client']} | {r['concurrency']} | "
                    f"{r['throughput']} | {r['p50_ms']} | {r['p99_ms']} | "
                    f"{r['note']} |"
                )
            for u in skipped:
                lines.append(
                    f"| {u['system']} | {u['client']} | - | - | - | - | not run: {u['reason']} |"
                )
        if serving["checks"]:
            lines += [
                "",
                "Outputs checked before timing: "
                + ", ".join(f"{k} {v}" for k, v in serving["checks"].items())
                + ".",
            ]
    ret = result.get("retrieval")
    if ret:
        lines += [
            "",
            f"**Retrieval**, {ret['n']:,} x {ret['dim']} (inner product), "
            f"{ret['queries']} queries, each engine at its cheapest setting with "
            f"recall@10 >= {ret['recall_target']}; p99 per call",
            "",
            "| engine | index | setting | recall | QPS b=1 | p99 ms b=1 | QPS b=64 | "
            "p99 ms b=64 | build s | memory MiB |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for e in ret["engines"]:
            by = {r["batch"]: r for r in e["rows"]}
            if not by:
                lines.append(
                    f"| {e['engine']} | {e['index']} | none reached the target "
                    f"(best {max(t['recall'] for t in e['sweep']):.3f}) | - | - | - | - "
                    f"| - | {e['build_s']} | {e['mem_bytes'] / 2**20:.0f} |"
                )
                continue
            lines.append(
                f"| {e['engine']} | {e['index']} | {e['knob']} | {by[64]['recall']} | "
                f"{by[1]['qps']} | {by[1]['p99_ms']} | {by[64]['qps']} | "
                f"{by[64]['p99_ms']} | {e['build_s']} | {e['mem_bytes'] / 2**20:.0f} |"
            )
        for u in ret["unavailable"]:
            lines.append(f"| {u['engine']} | - | not run: {u['reason']} | | | | | | | |")
    lines += [
        "",
        "**Goals** (ratios of this run)",
        "",
        "| goal | ratio | verdict |",
        "|---|---|---|",
    ]
    lines += [
        f"| {g['goal']} | {g['ratio'] if g['ratio'] is not None else '-'} | {g['verdict']} |"
        for g in result["goals"]
    ]
    for png in result.get("plots", []):
        lines += ["", f"![{Path(png).stem}](bench/results/{Path(png).name})"]
    return "\n".join(lines) + "\n"


def update_readme(section: str) -> None:
    """Replace what is between the README's side-by-side markers."""
    text = README.read_text()
    if BEGIN not in text or END not in text:
        log("README.md has no side-by-side markers; not updated")
        return
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    README.write_text(f"{head}{BEGIN}\n{section}{END}{tail}")


def plots(json_path: Path) -> list[str]:
    """PNG plots drawn by bench/peers/plots.py in the plot venv; their paths."""
    try:
        python = venv("plot").ensure(log)
    except PeerUnavailable as exc:
        log(f"no plots: {exc}")
        return []
    out = subprocess.run(
        [str(python), "-m", "bench.peers.plots", str(json_path), str(RESULTS / "batching.json")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        log(f"plots failed: {out.stderr.strip()[-300:]}")
        return []
    return [line for line in out.stdout.split() if line.endswith(".png")]


def versions(workloads: list[str]) -> dict[str, dict[str, str]]:
    """Every version that matters, per system (peers' from their venvs)."""
    out: dict[str, dict[str, str]] = {"infermesh": infermesh.versions()}
    serving = any(w in workloads for w in ("inference", "overhead"))
    for name, system, needed in (
        ("triton", "Triton", serving),
        ("perf", "perf_analyzer", serving),
        ("ray", "Ray Serve", serving),
        ("milvus", "Milvus Lite", "retrieval" in workloads),
        ("lancedb", "LanceDB", "retrieval" in workloads),
        ("plot", "plots", True),
    ):
        if needed and venv(name).python.exists():
            out[system] = venv(name).versions()
    if "Triton" in out:
        out["Triton"]["tritonserver"] = "2.51.0 (in nvidia-pytriton 0.7.0)"
    return out


def machine_line() -> str:
    """Cores, CPU model, memory and OS, for every table."""
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{machine()}, {mem:.0f} GiB RAM, no GPU used, {os.uname().sysname} "
        f"{os.uname().release}; clients run on the same cores as the servers"
    )


def main() -> int:
    """Parse the options, run the chosen workloads, write the results and the README section."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: short windows, 200 k")
    ap.add_argument(
        "--only", default=",".join(WORKLOADS), help="comma list of " + ", ".join(WORKLOADS)
    )
    ap.add_argument("--no-readme", action="store_true", help="leave README.md as it is")
    ns = ap.parse_args()
    workloads = [w for w in ns.only.split(",") if w]
    bad = [w for w in workloads if w not in WORKLOADS]
    if bad:
        ap.error(f"unknown workload(s) {bad}; choose from {', '.join(WORKLOADS)}")
    if not ONNX.is_file():
        ap.error(f"{ONNX} missing: run `.venv/bin/infermesh models build` (make model) first")

    started = time.time()
    result: dict[str, Any] = {
        "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "quick": ns.quick,
        "machine": machine_line(),
        "workloads": workloads,
    }
    print(f"machine: {result['machine']}", flush=True)
    serving_w = [w for w in workloads if w in ("inference", "overhead")]
    with tempfile.TemporaryDirectory(prefix="bench-compare-") as tmp:
        if serving_w:
            serving = Serving(serving_w, ns.quick, Path(tmp))
            serving.run()
            result["serving"] = {
                "rows": serving.rows,
                "unavailable": serving.unavailable,
                "checks": serving.checks,
                "seconds_per_level": serving.seconds,
                "perf_window_ms": serving.window_ms,
            }
        if "retrieval" in workloads:
            result["retrieval"] = run_retrieval(ns.quick)
    result["versions"] = versions(workloads)
    for system, vs in result["versions"].items():
        print(f"{system}: " + ", ".join(f"{k} {v}" for k, v in vs.items()), flush=True)
    result["goals"] = goals(result)
    result["duration_s"] = round(time.time() - started)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = dt.date.today().isoformat() + ("-quick" if ns.quick else "")
    json_path = RESULTS / f"{stem}.json"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    result["plots"] = plots(json_path)
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    report = markdown(result)
    (RESULTS / f"{stem}.md").write_text(report)
    if not ns.no_readme:
        update_readme(report)
    print(report)
    print(f"wrote {json_path.relative_to(ROOT)} and {stem}.md in {result['duration_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
