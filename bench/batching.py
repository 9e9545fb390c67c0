"""Dynamic batching held to a latency SLO: no batching vs static caps vs the controller.

Runs the mesh as processes (nats-server, router, batcher, inference worker; ``LocalMesh``)
once per configuration, against a model whose batch cost is ``base_ms + per_item_ms·n``
(the echo backend's synthetic cost, in a temporary model repository) or ``minilm-l6``.
An open-loop generator sends Poisson arrivals at a rate that varies 10x over time (a step
up, a step down, a ramp), so queueing shows when a configuration falls behind.

Reported per configuration: goodput (requests answered within the SLO per second, over
the whole trace) and the share of 5-s windows (sliding by 1 s, after the first 10 s) whose
client-side p99 is within the SLO; a request that failed counts as over the SLO. The SLO is
checked end to end at the client, which is stricter than what the controller bounds (the
latency at the batcher). The policy the controller wrote over time goes to a JSON file.

    python -m bench.batching                       # ~5 min on 2 cores
    python -m bench.batching --duration 30 --static 16
    python -m bench.batching --model minilm-l6 --base-rate 5 --slo-ms 300
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from nats.js.errors import KeyNotFoundError

from bench.loadgen import machine, table
from shared.bus import Bus
from shared.cli.supervisor import LocalMesh, MeshError
from shared.client import AsyncClient
from shared.errors import RPCError
from shared.events import POLICY_BUCKET, batch_policy_decoder

ROOT = Path(__file__).resolve().parent.parent
MODEL_MAX_BATCH = 128


@dataclass
class Config:
    """One configuration under test."""

    label: str
    max_batch_size: int
    controller: str = ""  # "" = off (static), else the law's name
    max_delay_ms: float = 2.0


@dataclass
class Outcome:
    """What one configuration did under the trace."""

    config: Config
    sent_at: np.ndarray  # seconds since the trace started
    latency_ms: np.ndarray  # inf = failed
    policy: list[dict[str, Any]] = field(default_factory=list)


def rate_at(t: float, duration: float, base: float, peak: float) -> float:
    """The load trace: base, a step to peak, back to base, a ramp to peak, peak."""
    f = t / duration
    if f < 0.25:
        return base
    if f < 0.45:
        return peak
    if f < 0.55:
        return base
    if f < 0.85:
        return base + (peak - base) * (f - 0.55) / 0.30
    return peak


def arrivals(duration: float, base: float, peak: float, seed: int) -> list[float]:
    """Poisson arrival times for the trace (thinning of a peak-rate process)."""
    rng = random.Random(seed)
    t, out = 0.0, list[float]()
    while True:
        t += rng.expovariate(peak)
        if t >= duration:
            return out
        if rng.random() < rate_at(t, duration, base, peak) / peak:
            out.append(t)


def model_repository(root: Path, args: argparse.Namespace, cfg: Config) -> str:
    """A model folder for this run; returns the model's name."""
    if args.model == "minilm-l6":
        config = json.loads((ROOT / "models" / "minilm-l6" / "config.json").read_text())
        name = "minilm-l6"
    else:
        config = {
            "backend": "echo",
            "description": "echo with a synthetic per-batch cost (bench/batching.py)",
            "accepts_text": True,
            "inputs": [{"name": "INPUT0", "dtype": "FP32", "shape": [-1]}],
            "outputs": [{"name": "OUTPUT0", "dtype": "FP32", "shape": [-1]}],
            "parameters": {"base_ms": args.base_ms, "per_item_ms": args.per_item_ms},
        }
        name = "echo-costly"
    config.update(
        max_batch_size=cfg.max_batch_size, max_delay_ms=cfg.max_delay_ms, slo_ms=args.slo_ms,
        max_queue=4096,
    )
    (root / name).mkdir(parents=True)
    (root / name / "config.json").write_text(json.dumps(config, indent=2))
    return name


async def watch_policy(nats_url: str, target: str, t0: float, out: list[dict[str, Any]],
                       stop: asyncio.Event) -> None:
    """Sample the policy in KV twice a second (the trace for the plot)."""
    bus = await Bus.connect(nats_url, name="bench-policy", attempts=5)
    try:
        kv = await bus.kv(POLICY_BUCKET)
        while not stop.is_set():
            try:
                entry = await kv.get(target)
            except KeyNotFoundError:  # not written yet; keep sampling
                entry = None
            if entry is not None and entry.value:
                p = batch_policy_decoder.decode(entry.value)
                out.append({
                    "t": round(time.monotonic() - t0, 2), "max_batch_size": p.max_batch_size,
                    "max_delay_ms": p.max_delay_ms, "p99_ms": p.p99_ms,
                    "revision": p.revision, "reason": p.reason,
                })
            await asyncio.sleep(0.5)
    finally:
        await bus.close()


async def drive(router: str, model: str, times: list[float], timeout: float
                ) -> tuple[np.ndarray, np.ndarray]:
    """Send one request at each arrival time (open loop); latencies in ms, inf = failed."""
    latency = np.full(len(times), math.inf)
    async with AsyncClient(router) as client:

        async def one(i: int) -> None:
            start = time.perf_counter()
            try:
                await client.infer(model, texts=["the quick brown fox"], timeout=timeout)
            except RPCError:
                return
            latency[i] = (time.perf_counter() - start) * 1000.0

        tasks = []
        t0 = time.perf_counter()
        for i, at in enumerate(times):
            delay = t0 + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)  # pacing the open-loop arrivals
            tasks.append(asyncio.get_running_loop().create_task(one(i)))
        await asyncio.gather(*tasks)
    return np.asarray(times), latency


def start_mesh(tmp: Path, env: dict[str, str], batcher: dict[str, str]) -> LocalMesh:
    """A started LocalMesh; retried because a free port picked for one child can be taken
    by another process before the child binds it."""
    for attempt in range(3):
        mesh = LocalMesh(tmp / f"mesh{attempt}", env=env,
                         replicas={"tiering": 0, "retrieval-worker": 0},
                         service_env={"batcher": batcher})
        try:
            mesh.start(timeout=180)
            return mesh
        except MeshError:
            mesh.stop()
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def run_one(args: argparse.Namespace, cfg: Config, times: list[float]) -> Outcome:
    """Start a fresh mesh for cfg, warm it, play the trace, stop it."""
    tmp = Path(tempfile.mkdtemp(prefix="infermesh-bench-"))
    try:
        model = model_repository(tmp / "models", args, cfg)
        env = {"INFERMESH_MODEL_REPOSITORY": str(tmp / "models"), "INFERMESH_MODELS": model,
               "INFERMESH_LOG_LEVEL": "WARNING", "INFERMESH_TRACING": "false"}
        cache = ROOT / ".infermesh" / "models"
        if cache.is_dir():
            env["INFERMESH_MODEL_CACHE"] = str(cache)
        batcher = {"INFERMESH_BATCH_CONTROLLER": "true" if cfg.controller else "false"}
        if cfg.controller:
            batcher["INFERMESH_BATCH_CONTROLLER_LAW"] = cfg.controller
        mesh = start_mesh(tmp, env, batcher)
        with mesh:
            policy: list[dict[str, Any]] = []

            async def play() -> tuple[np.ndarray, np.ndarray]:
                async with AsyncClient(mesh.router_address) as client:
                    for _ in range(50):  # until the worker is visible end to end
                        try:
                            await client.infer(model, texts=["warm"], timeout=5)
                            break
                        except RPCError:
                            await asyncio.sleep(0.2)
                stop = asyncio.Event()
                watcher = asyncio.get_running_loop().create_task(
                    watch_policy(mesh.nats_url, model, time.monotonic(), policy, stop))
                try:
                    return await drive(mesh.router_address, model, times, args.timeout_s)
                finally:
                    stop.set()
                    await watcher

            sent, latency = asyncio.run(play())
        return Outcome(cfg, sent, latency, policy)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def p99(latency_ms: np.ndarray) -> float:
    """The 99th percentile, with failed requests (inf) ranked above every answer."""
    return float(np.percentile(latency_ms, 99, method="higher"))


def score(o: Outcome, duration: float, slo_ms: float) -> dict[str, Any]:
    """Goodput and the share of 5-s windows (after 10 s) whose p99 is within the SLO."""
    good = int(np.sum(o.latency_ms <= slo_ms))
    windows, ok = 0, 0
    for start in np.arange(10.0, duration - 5.0 + 1e-9, 1.0):
        mask = (o.sent_at >= start) & (o.sent_at < start + 5.0)
        if not mask.any():
            continue
        windows += 1
        ok += bool(p99(o.latency_ms[mask]) <= slo_ms)
    finite = o.latency_ms[np.isfinite(o.latency_ms)]
    return {
        "config": o.config.label,
        "goodput_rps": round(good / duration, 1),
        "sent": len(o.latency_ms),
        "failed": int(np.sum(~np.isfinite(o.latency_ms))),
        "p50_ms": round(float(np.percentile(finite, 50)), 1) if len(finite) else "-",
        "p99_ms": round(p99(o.latency_ms), 1) if p99(o.latency_ms) < math.inf else "failed",
        "windows_ok": f"{ok}/{windows}",
        "windows_ok_share": round(ok / windows, 3) if windows else 0.0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("echo-costly", "minilm-l6"), default="echo-costly")
    ap.add_argument("--duration", type=float, default=32.0, help="trace length, s")
    ap.add_argument("--base-rate", type=float, default=30.0, help="requests/s at the low level")
    ap.add_argument("--peak-factor", type=float, default=10.0)
    ap.add_argument("--slo-ms", type=float, default=100.0)
    ap.add_argument("--base-ms", type=float, default=20.0, help="echo-costly: cost per batch")
    ap.add_argument("--per-item-ms", type=float, default=0.5, help="echo-costly: per item")
    ap.add_argument("--static", default="4,16,64", help="static caps to sweep (comma list)")
    ap.add_argument("--laws", default="fitted,aimd", help="controller laws (comma list)")
    ap.add_argument("--no-baseline", action="store_true", help="skip max_batch_size=1")
    ap.add_argument("--timeout-s", type=float, default=2.0, help="per-request deadline")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "batching.json")
    args = ap.parse_args()

    configs = [] if args.no_baseline else [Config("no batching (max 1)", 1)]
    configs += [Config(f"static max {n}", int(n)) for n in args.static.split(",") if n]
    configs += [Config(f"adaptive ({law})", MODEL_MAX_BATCH, controller=law)
                for law in args.laws.split(",") if law]
    times = arrivals(args.duration, args.base_rate, args.base_rate * args.peak_factor, args.seed)
    print(f"# batching under a {args.slo_ms:g} ms SLO — {machine()}")
    cost = (f"echo-costly: {args.base_ms:g} + {args.per_item_ms:g}·n ms per batch"
            if args.model == "echo-costly" else "minilm-l6 (onnx, CPU)")
    print(f"model {cost}; trace {args.duration:g} s, {args.base_rate:g} -> "
          f"{args.base_rate * args.peak_factor:g} req/s ({len(times)} requests), open loop\n")
    outcomes = []
    for cfg in configs:
        o = run_one(args, cfg, times)
        outcomes.append(o)
        print(f"  done: {cfg.label}", flush=True)
    rows = [score(o, args.duration, args.slo_ms) for o in outcomes]
    print()
    print(table(rows))
    verdict(rows, configs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine": machine(), "args": {k: str(v) for k, v in vars(args).items()},
        "rows": rows,
        "rate": [[round(t, 1), rate_at(t, args.duration, args.base_rate,
                                       args.base_rate * args.peak_factor)]
                 for t in np.arange(0, args.duration, 0.5)],
        "policy": {o.config.label: o.policy for o in outcomes if o.config.controller},
    }, indent=1))
    print(f"\npolicy trace: {args.out}")


def verdict(rows: list[dict[str, Any]], configs: list[Config]) -> None:
    """Say which goals were met and which missed."""
    by = dict(zip((c.label for c in configs), rows, strict=True))
    static = [r for c, r in zip(configs, rows, strict=True)
              if not c.controller and c.max_batch_size > 1]
    best = max(static, key=lambda r: r["goodput_rps"]) if static else None
    base = by.get("no batching (max 1)")
    for c, r in zip(configs, rows, strict=True):
        if not c.controller:
            continue
        checks = []
        if best is not None:
            checks.append((f"goodput >= best static ({best['config']}: {best['goodput_rps']})",
                           r["goodput_rps"] >= best["goodput_rps"]))
        if base is not None:
            checks.append((f"goodput >= 3x no batching ({3 * base['goodput_rps']:.1f})",
                           r["goodput_rps"] >= 3 * base["goodput_rps"]))
        checks.append(("p99 <= SLO in >= 99% of windows", r["windows_ok_share"] >= 0.99))
        marks = "; ".join(f"{'met' if ok else 'MISSED'}: {what}" for what, ok in checks)
        print(f"{c.label}: {marks}")


if __name__ == "__main__":
    main()
