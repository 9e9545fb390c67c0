"""Scatter/gather simulation: predicted search p50/p99 vs retrieval workers N and batch size.

The model (docs/scale.md, "Simulation"): one search batch through the mesh costs

    latency = overhead + worker phase + (N - 1) * rpc + merge(N)

- ``overhead``: router + batcher + client hops at N = 1, sampled from a real one-worker mesh
  (client latency minus the retrieve step's ``exec_ms``, minus the mean batcher -> worker
  hop, which moves into each worker's branch);
- ``worker phase``: the max over the N workers of each one's hop + ``exec_ms`` for its part
  of a real block cover (``services.batcher.scatter.cover``) of the collection, measured per query
  batch by sending each part as its own Search to the worker and timing it at the client
  (so the N parts of one sample come from the same queries: a part that drew more probed
  lists is slower, as in the mesh; and each branch carries its own hop);
- ``rpc``: the batcher's CPU for one more Search RPC (it issues and decodes them one after
  another on its event loop), measured as client process CPU per Search;
- ``merge(N)``: ``shared.topk.merge_topk`` of N (batch, k) answers, measured.

Two hardware cases: ``dedicated`` (every worker has its own cores or GPU, the Kubernetes
case) and ``shared`` (all N workers on this machine's cores). For ``shared`` the worker phase
is stretched by the processor-sharing slowdown of N concurrent scans, each using ``u`` cores
(measured), read off a measured speedup curve S(P) of P busy processes on this machine
(other tenants' load included): slowdown = (D / S(D)) / (u / S(u)) with D = N * u.

``python -m bench.scale_sim --collect`` builds the synthetic collection, starts a one-worker
mesh, measures everything above and writes bench/results/scale_profile.json (plus the merge
cost table); ``python -m bench.scale_sim`` prints the prediction tables from that file.
bench/scale_real.py collects the same profile and checks the prediction against a real mesh
with 1, 2 and 4 workers in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from bench.loadgen import machine
from bench.retrieval import Data, synthetic
from services.batcher.scatter import cover
from services.retrieval_worker import bulk
from services.retrieval_worker.manifest import CollectionSpec
from shared.client import AsyncClient
from shared.topk import merge_topk

NAME = "bench"
PROFILE = Path("bench/results/scale_profile.json")


@dataclass
class Setup:
    """The small collection and search parameters a profile was measured with."""

    n: int = 100_000
    dim: int = 128
    centres: int = 1000
    nlist: int = 256
    lists_per_block: int = 8
    nprobe: int = 16
    k: int = 10
    queries: int = 1024
    seed: int = 0


@dataclass
class Profile:
    """Measured latency samples and costs the simulation draws from (all times in ms).

    Keys of the dicts are batch sizes (and N) as strings, so the profile round-trips JSON.
    """

    setup: Setup
    machine: str = ""
    load_avg: list[float] = field(default_factory=list)
    recall: float = 0.0
    overhead_ms: dict[str, list[float]] = field(default_factory=dict)
    parts_ms: dict[str, dict[str, list[list[float]]]] = field(default_factory=dict)
    parts_wall_ms: dict[str, dict[str, list[list[float]]]] = field(default_factory=dict)
    """Same calls as ``parts_ms``, client wall time: the hop to the worker and back included."""
    merge_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    rpc_cpu_ms: dict[str, float] = field(default_factory=dict)
    worker_cores: dict[str, float] = field(default_factory=dict)
    speedup: dict[str, float] = field(default_factory=dict)

    def save(self, path: Path) -> None:
        """Write the profile as JSON."""
        path.write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: Path) -> Profile:
        """Read a profile written by ``save`` (or the ``profile`` key of scale_real.json)."""
        raw = json.loads(path.read_text())
        raw = raw.get("profile", raw)
        raw["setup"] = Setup(**raw["setup"])
        return cls(**raw)


# ---------------------------------------------------------------------------------------
# Measuring


def build_collection(root: Path, s: Setup, data: Data | None = None, name: str = NAME
                     ) -> Data:
    """The seeded synthetic mixture, bulk-built offline into ``root`` (a collections dir)."""
    data = data or synthetic(s.n, s.dim, s.centres, s.queries, s.k, s.seed)
    spec = CollectionSpec(name=name, dim=s.dim, nlist=s.nlist, metric="ip",
                          lists_per_block=s.lists_per_block)
    bulk.build(root / name, spec, np.arange(s.n), data.xb, stream_seq=0)
    return data


def _spin(seconds: float, out: mp.Queue) -> None:  # type: ignore[type-arg]
    """Count pure-Python loop iterations for ``seconds`` (one CPU-bound process)."""
    end = time.perf_counter() + seconds
    count = 0
    while time.perf_counter() < end:
        for _ in range(10_000):
            count += 1
    out.put(count)


def speedup_curve(procs: tuple[int, ...] = (1, 2, 3, 4, 6, 8), seconds: float = 0.7
                  ) -> dict[str, float]:
    """S(P): work of P concurrent busy processes relative to one, on this machine now.

    Measures the cores this run can actually get (other tenants' load included), which is
    what N retrieval workers on one machine compete for.
    """
    work = spin_work(procs, seconds)
    return {str(p): work[p] / work[procs[0]] for p in procs}


def spin_work(procs: tuple[int, ...], seconds: float) -> dict[int, int]:
    """Loop iterations done by P concurrent busy processes in ``seconds``, per P."""
    ctx = mp.get_context("fork")
    work: dict[int, int] = {}
    for p in procs:
        q: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
        ps = [ctx.Process(target=_spin, args=(seconds, q)) for _ in range(p)]
        for proc in ps:
            proc.start()
        work[p] = sum(q.get() for _ in ps)
        for proc in ps:
            proc.join()
    return work


def merge_table(ns: Sequence[int], batches: tuple[int, ...], k: int, reps: int = 30
                ) -> dict[str, dict[str, float]]:
    """Median ``merge_topk`` time (ms) of N answers of shape (batch, k), per batch and N."""
    rng = np.random.default_rng(0)
    out: dict[str, dict[str, float]] = {}
    for b in batches:
        row: dict[str, float] = {}
        for n in ns:
            parts = [(np.sort(rng.random((b, k), dtype=np.float32))[:, ::-1].copy(),
                      rng.integers(0, 1 << 40, (b, k))) for _ in range(n)]
            times = []
            for _ in range(reps):
                t = time.perf_counter()
                merge_topk(parts, k, "ip")
                times.append((time.perf_counter() - t) * 1000.0)
            # N = 1 is not merged (the batcher returns the one answer as it is)
            row[str(n)] = 0.0 if n == 1 else float(np.median(times))
        out[str(b)] = row
    return out


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure_overhead(router: str, xq: np.ndarray, s: Setup, batch: int, count: int,
                           collection: str = NAME) -> tuple[list[float], list[float]]:
    """Router.Infer at concurrency 1: client latencies and the part not spent on the worker."""
    total: list[float] = []
    over: list[float] = []
    async with AsyncClient(router) as client:
        for i in range(count + 3):
            lo = (i * batch) % (len(xq) - batch + 1)
            t = time.perf_counter()
            r = await client.infer(pipeline="search", collection=collection, k=s.k,
                                   nprobe=s.nprobe, omit_hits=True,
                                   inputs={"query": xq[lo : lo + batch]}, timeout=60)
            ms = (time.perf_counter() - t) * 1000.0
            if i < 3:  # warm the channel and the worker's caches
                continue
            step = next(x for x in r.timings if x.step == "retrieve")
            total.append(ms)
            over.append(ms - step.exec_ms)
    return total, over


async def measure_parts(worker: str, worker_pid: int, xq: np.ndarray, s: Setup, batch: int,
                        ns: Sequence[int], samples: int, collection: str = NAME,
                        offset: int = 0
                        ) -> tuple[dict[str, list[list[float]]], dict[str, list[list[float]]],
                                   float, float]:
    """Per N: samples of the N part latencies (worker ``exec_ms``) of a real block cover.

    Also the client CPU per Search RPC (what one more worker costs the batcher's event loop)
    and the cores one worker uses while serving a Search (its CPU time over the calls' wall
    time: exec_ms leaves out the RPC handling, which at batch 1 costs more than the scan).
    """
    import grpc

    from shared.pb.infermesh.v1 import retrieval_worker_pb2, retrieval_worker_pb2_grpc
    from shared.tensors import from_numpy

    nblocks = -(-s.nlist // s.lists_per_block)
    allb = frozenset(range(nblocks))
    plans = {n: list(cover({f"w{i}": allb for i in range(n)}).values()) for n in ns}
    out: dict[str, list[list[float]]] = {str(n): [] for n in ns}
    walls: dict[str, list[list[float]]] = {str(n): [] for n in ns}
    calls, wall_total = 0, 0.0
    async with grpc.aio.insecure_channel(
        worker, options=[("grpc.max_receive_message_length", 64 << 20),
                         ("grpc.max_send_message_length", 64 << 20)]
    ) as ch:
        stub = retrieval_worker_pb2_grpc.RetrievalWorkerStub(ch)

        async def search(q: np.ndarray, blocks: list[int]) -> tuple[float, float]:
            t = time.perf_counter()
            r = await stub.Search(retrieval_worker_pb2.SearchRequest(
                collection=collection, queries=from_numpy("queries", q), k=s.k, nprobe=s.nprobe,
                blocks=blocks, omit_hits=True), timeout=60)
            return float(r.exec_ms), (time.perf_counter() - t) * 1000.0

        for _ in range(3):  # warm-up
            await search(xq[:batch], sorted(allb))
        cpu0, wcpu0 = time.process_time(), _cpu_s(worker_pid)
        for j in range(offset, offset + samples):
            lo = (j * batch * 7) % (len(xq) - batch + 1)
            q = np.ascontiguousarray(xq[lo : lo + batch])
            for n in ns:
                t = time.perf_counter()
                ms = [await search(q, part) for part in plans[n]]
                wall_total += time.perf_counter() - t
                out[str(n)].append([e for e, _ in ms])
                walls[str(n)].append([w for _, w in ms])
                calls += len(ms)
        cpu1, wcpu1 = time.process_time(), _cpu_s(worker_pid)
    rpc_cpu_ms = (cpu1 - cpu0) * 1000.0 / calls
    cores = (wcpu1 - wcpu0) / wall_total if wall_total else 1.0
    return out, walls, rpc_cpu_ms, cores


async def collect(router: str, worker: str, worker_pid: int, data: Data, s: Setup,
                  batches: tuple[int, ...], ns: Sequence[int], samples: int, requests: int
                  ) -> Profile:
    """Measure a profile against a running one-worker mesh (collection ``NAME`` loaded)."""
    from bench.retrieval_engine import recall

    prof = Profile(setup=s, machine=machine(), load_avg=list(os.getloadavg()))
    prof.speedup = speedup_curve()
    for b in batches:
        _, over = await measure_overhead(router, data.xq, s, b, max(requests // max(b // 16, 1),
                                                                      12))
        prof.overhead_ms[str(b)] = over
        parts, walls, rpc, cores = await measure_parts(worker, worker_pid, data.xq, s, b, ns,
                                                       max(samples // max(b // 32, 1), 8))
        prof.parts_ms[str(b)] = parts
        prof.parts_wall_ms[str(b)] = walls
        prof.rpc_cpu_ms[str(b)] = rpc
        prof.worker_cores[str(b)] = cores
        print(f"  batch {b}: overhead p50 {np.median(over):.2f} ms, one part of N=1 p50 "
              f"{np.median([x[0] for x in parts['1']]):.2f} ms, rpc cpu {rpc:.3f} ms, "
              f"worker uses {cores:.2f} cores", flush=True)
    prof.merge_ms = merge_table(ns, batches, s.k)
    async with AsyncClient(router) as client:
        r = await client.infer(pipeline="search", collection=NAME, k=s.k, nprobe=s.nprobe,
                               omit_hits=True, inputs={"query": data.xq}, timeout=120)
    prof.recall = recall(r.outputs["ids"], data.truth)
    return prof


def bytes_per_vector(tmp: Path, dims: tuple[int, ...] = (384, 1024), n: int = 20_000
                     ) -> dict[str, dict[str, float]]:
    """On-disk bytes per vector of the engine's block files, and FAISS codes for comparison.

    Bulk-builds n rows per (dim, dtype) and sums the committed block files (vectors, ids,
    list offsets, tombstones) and the centroids; FAISS rows add 8 id bytes to the code size
    of IVF-Flat (fp32), IVF-SQfp16 and IVF-SQ8.
    """
    import faiss

    rng = np.random.default_rng(0)
    out: dict[str, dict[str, float]] = {}
    for dim in dims:
        xb = rng.standard_normal((n, dim), dtype=np.float32)
        xb /= np.linalg.norm(xb, axis=1, keepdims=True)
        for dtype in ("float32", "float16"):
            root = tmp / f"c{dim}{dtype}"
            spec = CollectionSpec(name="b", dim=dim, nlist=64, metric="ip", dtype=dtype)
            bulk.build(root, spec, np.arange(n), xb, stream_seq=0)
            blocks = sum(f.stat().st_size for f in (root / "blocks").rglob("*.npy"))
            total = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
            out[f"{dim}/{dtype}"] = {"blocks_B_per_vec": blocks / n,
                                     "collection_B_per_vec": total / n,
                                     "raw_vector_B": dim * np.dtype(dtype).itemsize}
            shutil.rmtree(root)
        for name, qt in (("faiss_sq8", faiss.ScalarQuantizer.QT_8bit),
                         ("faiss_sqfp16", faiss.ScalarQuantizer.QT_fp16)):
            ivf = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(dim), dim, 64, qt)
            out[f"{dim}/{name}"] = {"code_B": float(ivf.code_size),
                                    "with_id_B_per_vec": float(ivf.code_size + 8)}
    return out


def scan_rates(s: Setup, batches: tuple[int, ...] = (1, 64, 256, 1000), nprobe: int = 16
               ) -> dict[str, dict[str, float]]:
    """Engine scan rate in vectors x queries per CPU-second, per path and batch size.

    CPU seconds (process_time, all threads) rather than wall time: the machine is shared, and
    per-core work is what the capacity model multiplies out. Also recall@k vs nprobe.
    """
    from bench.retrieval_engine import recall
    from services.retrieval_worker.collection import Collection

    data = synthetic(s.n, s.dim, s.centres, s.queries, s.k, s.seed)
    out: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="scale-scan-") as tmp:
        spec = CollectionSpec(name="b", dim=s.dim, nlist=s.nlist, metric="ip",
                              lists_per_block=s.lists_per_block)
        bulk.build(Path(tmp) / "b", spec, np.arange(s.n), data.xb, stream_seq=0)
        col = Collection.open(Path(tmp) / "b")
        searcher = col._searcher  # the engine itself, to force a path
        assert searcher is not None
        scanned = s.n * nprobe / s.nlist  # vectors per query (balanced lists)
        out["recall_vs_nprobe"] = {
            str(p): recall(searcher.search(data.xq, s.k, p)[1], data.truth)
            for p in (1, 2, 4, 8, 16, 32, 64) if p <= s.nlist}
        for path in ("faiss", "grouped"):
            row: dict[str, float] = {}
            for b in batches:
                done, c0, t0 = 0, time.process_time(), time.perf_counter()
                while time.perf_counter() - t0 < 2.0 or done < 2 * b:
                    lo = (done % len(data.xq)) // b * b
                    q = data.xq[lo : lo + b]
                    searcher.search(q, s.k, nprobe, path=path)  # type: ignore[arg-type]
                    done += len(q)
                cpu = time.process_time() - c0
                row[str(b)] = done * scanned / cpu
            out[f"{path}_vecq_per_cpu_s"] = row
        col.close()
    return out


def constants(out: Path) -> None:
    """Measure the capacity model's per-byte, per-core and merge constants into ``out``."""
    s = Setup(n=100_000, dim=384, nlist=256)
    res: dict[str, object] = {"machine": machine(), "load_avg": list(os.getloadavg())}
    with tempfile.TemporaryDirectory(prefix="scale-bytes-") as tmp:
        res["bytes_per_vector"] = bytes_per_vector(Path(tmp))
    print(json.dumps(res["bytes_per_vector"], indent=1), flush=True)
    res["merge_ms"] = {f"k={k}": merge_table((2, 4, 8, 12, 16), (1, 64, 256, 1000), k)
                       for k in (10, 100)}
    print(json.dumps(res["merge_ms"], indent=1), flush=True)
    res["scan"] = {"setup": asdict(s), "nprobe": 16, **scan_rates(s)}
    print(json.dumps(res["scan"], indent=1), flush=True)
    res["load_avg_end"] = list(os.getloadavg())
    out.write_text(json.dumps(res, indent=1))
    print(f"wrote {out}")


# ---------------------------------------------------------------------------------------
# Predicting


def _interp(curve: dict[str, float], x: float) -> float:
    """Piecewise-linear S(x) through the measured points (S(0) = 0, flat past the last)."""
    xs = [0.0, *(float(k) for k in curve)]
    ys = [0.0, *curve.values()]
    return float(np.interp(x, xs, ys))


def slowdown(prof: Profile, n: int, batch: int) -> float:
    """How much longer each of N concurrent scans takes than one alone, on shared cores."""
    u = max(prof.worker_cores.get(str(batch), 1.0), 0.05)
    d = n * u

    def per_proc_time(p: float) -> float:
        return p / max(_interp(prof.speedup, p), 1e-9)

    return max(per_proc_time(d) / per_proc_time(u), 1.0)


def predict(prof: Profile, n: int, batch: int, shared: bool, draws: int = 20_000,
            seed: int = 0) -> np.ndarray:
    """Simulated request latencies (ms) for N workers and this batch size."""
    rng = np.random.default_rng(seed)
    key = str(batch)
    over = np.asarray(prof.overhead_ms[key])
    parts = prof.parts_ms[key][str(n)]
    walls = prof.parts_wall_ms.get(key, {}).get(str(n))
    if walls:
        # The hop to each worker is part of that worker's branch: the request waits for the
        # slowest (hop + exec) of N, not one hop plus the slowest exec. On a loaded machine a
        # worker's wake-up alone varies by milliseconds, so this matters most at batch 1.
        hop = float(np.mean([w - e for wp, ep in zip(prof.parts_wall_ms[key]["1"],
                                                       prof.parts_ms[key]["1"], strict=True)
                             for w, e in zip(wp, ep, strict=True)]))
        over = over - hop
        parts = walls
    phase = np.asarray([max(p) for p in parts])
    lat = over[rng.integers(0, len(over), draws)] + phase[rng.integers(0, len(phase), draws)] \
        * (slowdown(prof, n, batch) if shared else 1.0)
    return lat + (n - 1) * prof.rpc_cpu_ms[key] + prof.merge_ms[key][str(n)]


def table(prof: Profile, shared: bool) -> str:
    """Markdown table of predicted p50/p99 per N (rows) and batch (columns)."""
    batches = list(prof.overhead_ms)
    ns = [int(x) for x in next(iter(prof.parts_ms.values()))]
    head = "| N | " + " | ".join(f"b={b} p50 | b={b} p99 | b={b} QPS" for b in batches) + " |"
    lines = [head, "|" + "---|" * (1 + 3 * len(batches))]
    for n in ns:
        cells = []
        for b in batches:
            lat = predict(prof, n, int(b), shared)
            p50, p99 = np.percentile(lat, [50, 99])
            cells += [f"{p50:.2f}", f"{p99:.2f}", f"{int(b) * 1000.0 / float(np.mean(lat)):.0f}"]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(prof: Profile) -> None:
    """Print the profile's headline numbers and both prediction tables."""
    s = prof.setup
    print(f"profile: {s.n} x {s.dim}, nlist {s.nlist}, {s.lists_per_block} lists/block, "
          f"nprobe {s.nprobe}, k {s.k}, recall@{s.k} {prof.recall:.3f}; {prof.machine}; "
          f"load avg {' '.join(f'{x:.1f}' for x in prof.load_avg)}")
    print("speedup S(P) of P busy processes: "
          + ", ".join(f"{p}: {v:.2f}" for p, v in prof.speedup.items()))
    for b in prof.overhead_ms:
        print(f"batch {b}: overhead p50 {np.median(prof.overhead_ms[b]):.2f} ms / p99 "
              f"{np.percentile(prof.overhead_ms[b], 99):.2f}; rpc cpu {prof.rpc_cpu_ms[b]:.3f} ms;"
              f" worker cores {prof.worker_cores[b]:.2f}; merge ms by N "
              + " ".join(f"{n}:{v:.3f}" for n, v in prof.merge_ms[b].items() if n in
                         ("2", "4", "8", "16")))
    print("\npredicted, dedicated hardware per worker (latency ms, QPS at concurrency 1)")
    print(table(prof, shared=False))
    print("\npredicted, all workers sharing this machine's cores")
    print(table(prof, shared=True))


def main() -> None:
    """Collect a profile (``--collect``) or print predictions from the stored one."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--collect", action="store_true", help="measure a new profile first")
    ap.add_argument("--profile", default=str(PROFILE))
    ap.add_argument("--ns", default="1,2,3,4,6,8,12,16", help="worker counts to measure")
    ap.add_argument("--batches", default="1,64,256")
    ap.add_argument("--samples", type=int, default=40, help="cover samples per (batch, N)")
    ap.add_argument("--requests", type=int, default=200, help="overhead requests at batch 1")
    ap.add_argument("--n", type=int, default=Setup.n, help="collection rows")
    ap.add_argument("--dim", type=int, default=Setup.dim)
    ap.add_argument("--constants", action="store_true",
                    help="measure bytes/vector, scan rate per CPU-second and merge cost into "
                         "bench/results/scale_constants.json, then stop")
    args = ap.parse_args()
    if args.constants:
        constants(Path("bench/results/scale_constants.json"))
        return
    path = Path(args.profile)
    if args.collect:
        prof = asyncio.run(collect_with_mesh(Setup(n=args.n, dim=args.dim), tuple(int(b) for b in
                                                          args.batches.split(",")),
                                             [int(x) for x in args.ns.split(",")], args.samples,
                                             args.requests))
        prof.save(path)
        print(f"wrote {path}")
    report(Profile.load(path))


async def collect_with_mesh(s: Setup, batches: tuple[int, ...], ns: Sequence[int], samples: int,
                            requests: int) -> Profile:
    """Build the collection, start a one-worker mesh and collect a profile."""
    from shared.cli.supervisor import LocalMesh

    with tempfile.TemporaryDirectory(prefix="scale-sim-") as tmp:
        base = Path(tmp) / "base"
        t = time.perf_counter()
        data = build_collection(base, s)
        print(f"data + bulk build {time.perf_counter() - t:.1f}s")
        with LocalMesh(Path(tmp) / "mesh", replicas={"inference-worker": 0, "tiering": 0,
                                                     "retrieval-worker": 0}) as mesh:
            mesh.start()
            child = add_worker(mesh, base, Path(tmp) / "worker-0", 0)
            await wait_workers(mesh.router_address, data.xq, s, 1)
            return await collect(mesh.router_address, mesh.endpoints[child], mesh.child(child).pid,
                                 data, s, batches, ns, samples, requests)


def add_worker(mesh: object, base: Path, own: Path, i: int) -> str:
    """Start retrieval worker ``i`` on its own copy of the collections dir; its child name.

    Every worker holds every collection; a private copy keeps the replicas' files apart, as
    on separate machines.
    """
    from shared.cli.supervisor import LocalMesh

    assert isinstance(mesh, LocalMesh)
    shutil.copytree(base, own)
    mesh.service_env["retrieval-worker"] = {"INFERMESH_COLLECTIONS_DIR": str(own)}
    mesh.add("retrieval-worker", f"-{i}", timeout=120)
    return f"retrieval-worker-{i}"


async def wait_workers(router: str, xq: np.ndarray, s: Setup, n: int, timeout: float = 180.0,
                       collection: str = NAME) -> None:
    """Until a search of ``collection`` through the router fans out to ``n`` workers."""
    deadline = time.monotonic() + timeout
    async with AsyncClient(router) as client:
        while True:
            try:
                r = await client.infer(pipeline="search", collection=collection, k=s.k,
                                       nprobe=s.nprobe, omit_hits=True, inputs={"query": xq[:1]},
                                       timeout=10)
                step = next(x for x in r.timings if x.step == "retrieve")
                if len(step.worker.split(",")) == n:
                    return
            except Exception as exc:  # not yet declared/advertised: keep waiting
                last = exc
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no search over {n} workers: {last}") from exc
            if time.monotonic() > deadline:
                raise TimeoutError(f"searches did not fan out to {n} workers")
            await asyncio.sleep(0.3)


if __name__ == "__main__":
    main()
