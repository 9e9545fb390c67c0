"""Tiering under Zipf-skewed queries: hot/warm share of block reads, latency, re-convergence.

Driven in-process over a real nats-server: one Collection (the retrieval benchmark's
synthetic data, bench/retrieval_engine.py's generator), the worker's TierAgent (publishes
BlockAccess, applies TierMove, confirms TierMoved) and the tiering service's
TieringController, exactly as the services wire them, without gRPC in between. Queries are
drawn around the mixture centres with Zipf skew (``--zipf``, rank r has weight r^-s); the
warm budget is ``--warm-share`` of the data, the rest cold. Cold means disk: after every
round the pages of cold blocks' files are dropped (posix_fadvise DONTNEED), so a cold read
pays the disk, not the page cache.

Reported: share of block reads served from hot/warm after warm-up; p50/p99 of a search
(``--batch`` queries) vs the same stream with every block warm (all in RAM); recall of the
tiered run against the all-RAM run on fixed probe queries (must be identical); and the time to
re-converge after the popular set shifts (the Zipf ranking is permuted mid-run; time until the
hot/warm share of the last second is back over 90 %). Goals: >= 90 % hot/warm, p99 <= 1.5x.

Run: ``python -m bench.tiering`` (200 k x 384, a few minutes on 2 cores); ``--n 1000000``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

import numpy as np
from threadpoolctl import ThreadpoolController

from bench.loadgen import machine
from bench.retrieval_engine import mixture
from services.retrieval_worker.blocks import Tier, block_dir
from services.retrieval_worker.collection import Collection
from services.retrieval_worker.holdings import Held, Holdings
from services.retrieval_worker.manifest import CollectionSpec
from services.retrieval_worker.tiering import TierAgent
from services.tiering.config import TieringConfig
from services.tiering.controller import TieringController
from shared.bus import Bus
from shared.cli.procs import free_port, start_nats


def drop_cold_pages(col: Collection) -> None:
    """Evict cold blocks' files from the page cache, so cold reads go to the disk."""
    for b, tier in col.placement().items():
        if tier is not Tier.COLD:
            continue
        for p in block_dir(col.root, b).glob("*.npy"):
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


class Stream:
    """Zipf-skewed queries around the centres; the ranking can be shifted."""

    def __init__(self, centres: np.ndarray, s: float, seed: int) -> None:
        self.centres = centres
        self.rng = np.random.default_rng(seed)
        w = np.arange(1, len(centres) + 1, dtype=np.float64) ** -s
        self.p = w / w.sum()
        self.rank = self.rng.permutation(len(centres))

    def shift(self) -> None:
        """A new popular set: a fresh permutation of the ranking."""
        self.rank = self.rng.permutation(len(self.centres))

    def batch(self, n: int) -> np.ndarray:
        chosen = self.centres[self.rank[self.rng.choice(len(self.centres), n, p=self.p)]]
        return mixture(n, chosen, self.rng)


class Runner:
    """Searches in a thread, recording latency and block reads by tier per search."""

    def __init__(self, col: Collection, k: int, nprobe: int, batch: int) -> None:
        self.col, self.k, self.nprobe, self.batch = col, k, nprobe, batch
        self.log: deque[tuple[float, float, int, int]] = deque()  # t, ms, fast, all

    def once(self, q: np.ndarray) -> None:
        searcher = self.col._searcher  # the engine: it also returns the reads by tier
        assert searcher is not None
        t0 = time.perf_counter()
        _, _, reads = searcher.search(q, self.k, self.nprobe)
        ms = (time.perf_counter() - t0) * 1000
        self.col.reads.add(reads)  # what Collection.search does: the agent reports these
        fast = sum(n for (_, tier), n in reads.items() if tier is not Tier.COLD)
        self.log.append((time.monotonic(), ms, fast, sum(reads.values())))

    def share(self, since: float) -> float:
        rows = [r for r in self.log if r[0] >= since]
        total = sum(r[3] for r in rows)
        return sum(r[2] for r in rows) / total if total else 0.0

    def latencies(self, since: float) -> np.ndarray:
        return np.array([r[1] for r in self.log if r[0] >= since])


async def tiered_run(args: argparse.Namespace, col: Collection, stream: Stream,
                     nats_url: str) -> dict[str, float]:
    """Warm up, measure, shift the popular set and time the re-convergence."""
    bus = await Bus.connect(nats_url, name="bench-tiering")
    holdings = Holdings(col.root.parent, flush_rows=10**9)
    holdings.held[col.spec.name] = Held(col)
    total = sum(col.block_bytes().values())
    agent = TierAgent(bus, holdings, "bench", period_s=args.period,
                      hot_budget=0, warm_budget=int(args.warm_share * total))
    controller = TieringController(bus, TieringConfig(
        tiering_period_s=args.period, half_life_s=args.half_life, max_moves_per_round=64))
    tasks = [asyncio.create_task(agent.run()), asyncio.create_task(controller.run())]
    runner = Runner(col, args.k, args.nprobe, args.batch)
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            runner.once(stream.batch(args.batch))

    async def evict() -> None:
        while True:
            await asyncio.to_thread(drop_cold_pages, col)
            await asyncio.sleep(args.period)

    tasks.append(asyncio.create_task(evict()))
    thread = asyncio.create_task(asyncio.to_thread(load))
    out: dict[str, float] = {}
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < args.warmup_s:
            await asyncio.sleep(1.0)
            if time.monotonic() - t0 > 10 and runner.share(time.monotonic() - 2) >= 0.95:
                break
        out["warmup_s"] = time.monotonic() - t0
        m0 = time.monotonic()
        await asyncio.sleep(args.measure_s)
        out["share"] = runner.share(m0)
        lat = runner.latencies(m0)
        out["p50"], out["p99"] = float(np.percentile(lat, 50)), float(np.percentile(lat, 99))
        out["searches"] = float(lat.size)
        stream.shift()
        s0 = time.monotonic()
        out["reconverge_s"] = float("nan")
        while time.monotonic() - s0 < args.reconverge_max_s:
            await asyncio.sleep(0.25)
            if time.monotonic() - s0 > 1.0 and runner.share(time.monotonic() - 1.0) >= 0.9:
                out["reconverge_s"] = time.monotonic() - s0
                break
        out["warm_bytes"] = float(sum(n for b, n in col.block_bytes().items()
                                      if col.placement()[b] is Tier.WARM))
        out["budget"] = float(agent.warm_budget)
    finally:
        stop.set()
        await thread
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await bus.close()
    return out


def all_ram_run(args: argparse.Namespace, col: Collection, stream: Stream) -> dict[str, float]:
    """The same stream with every block warm."""
    for b in col.placement():
        col.place(b, Tier.WARM)
    runner = Runner(col, args.k, args.nprobe, args.batch)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 2.0:
        runner.once(stream.batch(args.batch))
    m0 = time.monotonic()
    while time.monotonic() - m0 < args.measure_s:
        runner.once(stream.batch(args.batch))
    lat = runner.latencies(m0)
    return {"p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)),
            "searches": float(lat.size)}


def main() -> None:
    """Build the collection, run tiered and all-RAM, print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--centres", type=int, default=1000)
    ap.add_argument("--nlist", type=int, default=512)
    ap.add_argument("--lists-per-block", type=int, default=4)
    ap.add_argument("--nprobe", type=int, default=16)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--batch", type=int, default=16, help="queries per search")
    ap.add_argument("--zipf", type=float, default=1.1)
    ap.add_argument("--warm-share", type=float, default=0.2, help="warm budget / data bytes")
    ap.add_argument("--period", type=float, default=1.0, help="report and planning period")
    ap.add_argument("--half-life", type=float, default=10.0)
    ap.add_argument("--warmup-s", type=float, default=60.0)
    ap.add_argument("--measure-s", type=float, default=20.0)
    ap.add_argument("--reconverge-max-s", type=float, default=90.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    # as the worker runs (app.limit_blas): numpy's BLAS single-threaded, else its spinning
    # threads fight FAISS's OpenMP threads for the two cores
    limiter = ThreadpoolController().select(prefix="libscipy_openblas").limit(limits=1)
    print(f"machine: {machine()}")
    print("driven in-process: Collection + worker TierAgent + TieringController over a real "
          "nats-server; cold block pages dropped (posix_fadvise DONTNEED) every period")
    rng = np.random.default_rng(args.seed)
    centres = rng.standard_normal((args.centres, args.dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    xb = mixture(args.n, centres, rng)
    tmp = Path(tempfile.mkdtemp(prefix="bench-tiering-"))
    port = free_port()
    server = start_nats(tmp / "nats", port, tmp / "nats" / "logs", "")
    try:
        spec = CollectionSpec(name="bench", dim=args.dim, nlist=args.nlist,
                              lists_per_block=args.lists_per_block)
        # every block starts cold: the tiering service has to find the popular ones
        col = Collection.create(tmp / "c" / "bench", spec, default_tier=Tier.COLD,
                                flush_rows=10**9)
        col.train(xb[rng.choice(args.n, min(args.n, 40 * args.nlist), replace=False)])
        for seq, lo in enumerate(range(0, args.n, 100_000), start=1):
            col.upsert(np.arange(lo, min(lo + 100_000, args.n)), xb[lo : lo + 100_000],
                       seq=seq)
        col.flush()
        del xb
        total = sum(col.block_bytes().values())
        print(f"data {args.n} x {args.dim}: {spec.nblocks} blocks, {total / 1e6:.0f} MB; "
              f"warm budget {args.warm_share:.0%}; zipf s={args.zipf}; nprobe {args.nprobe}; "
              f"batch {args.batch}")
        probe = mixture(200, centres, np.random.default_rng(99))
        stream = Stream(centres, args.zipf, args.seed)
        tiered = asyncio.run(tiered_run(args, col, stream, f"nats://127.0.0.1:{port}"))
        ids_tiered = col.search(probe, args.k, args.nprobe)[1]
        ram = all_ram_run(args, col, stream)
        ids_ram = col.search(probe, args.k, args.nprobe)[1]
        same = float(np.mean(np.sort(ids_tiered, 1) == np.sort(ids_ram, 1)))
        print()
        print("| run | hot+warm share of reads | p50 ms | p99 ms | p99 vs all-RAM | "
              "same ids as all-RAM | re-converge after shift |")
        print("|---|---|---|---|---|---|---|")
        print(f"| tiered (warm {args.warm_share:.0%}, rest cold) | {tiered['share']:.1%} | "
              f"{tiered['p50']:.2f} | {tiered['p99']:.2f} | {tiered['p99'] / ram['p99']:.2f}x | "
              f"{same:.1%} | {tiered['reconverge_s']:.1f} s |")
        print(f"| all in RAM | 100% | {ram['p50']:.2f} | {ram['p99']:.2f} | 1.00x | - | - |")
        print(f"\nwarm-up to >=95% took {tiered['warmup_s']:.0f} s; warm bytes at the end "
              f"{tiered['warm_bytes'] / 1e6:.1f} MB of a {tiered['budget'] / 1e6:.1f} MB budget")
        col.close()
        del limiter
    finally:
        server.stop(10)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
