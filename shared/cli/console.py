"""`infermesh console`: a live web page of the mesh (members, policies, tiers, latency).

One small aiohttp app: ``/`` is a static page that polls ``/api/state`` every second. The
state comes from NATS KV (the same snapshot as `infermesh status`) plus each router's
Prometheus histogram, from which p50/p99 per target over the last few seconds are derived.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from shared.bus import Bus
from shared.cli.status import Snapshot, read

log = logging.getLogger(__name__)
PAGE = Path(__file__).with_name("console.html")
HISTOGRAM = "infermesh_request_duration_seconds"


def quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """Quantile from cumulative (upper bound, count) buckets, interpolated as Prometheus does."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return prev_bound
            span = count - prev_count
            frac = (rank - prev_count) / span if span else 1.0
            return prev_bound + (bound - prev_bound) * frac
        prev_bound, prev_count = bound, count
    return prev_bound


class Latency:
    """Per-target latency and rate over a sliding window of router scrapes."""

    def __init__(self, window_s: float = 10.0) -> None:
        self.window_s = window_s
        self.history: deque[tuple[float, dict[str, dict[float, float]]]] = deque()

    def add(self, at: float, text: str) -> None:
        cumulative: dict[str, dict[float, float]] = {}
        for family in text_string_to_metric_families(text):
            if family.name != HISTOGRAM:
                continue
            for s in family.samples:
                if s.name.endswith("_bucket") and s.labels.get("service") == "router":
                    target = s.labels.get("target") or "(none)"
                    le = float(s.labels["le"])
                    per = cumulative.setdefault(target, {})
                    per[le] = per.get(le, 0.0) + s.value
        self.history.append((at, cumulative))
        while self.history and at - self.history[0][0] > self.window_s:
            self.history.popleft()

    def summary(self) -> list[dict[str, Any]]:
        if len(self.history) < 2:
            return []
        (t0, old), (t1, new) = self.history[0], self.history[-1]
        rows = []
        for target, buckets in sorted(new.items()):
            before = old.get(target, {})
            delta = sorted((le, n - before.get(le, 0.0)) for le, n in buckets.items())
            count = delta[-1][1] if delta else 0.0
            p50, p99 = quantile(delta, 0.5), quantile(delta, 0.99)
            rows.append(
                {
                    "target": target,
                    "rate": round(count / (t1 - t0), 1) if t1 > t0 else 0.0,
                    "p50_ms": None if p50 is None else round(p50 * 1000, 2),
                    "p99_ms": None if p99 is None else round(p99 * 1000, 2),
                }
            )
        return rows


class Console:
    """Polls NATS and the routers' metrics; serves the page and the JSON state."""

    def __init__(self, bus: Bus, period_s: float = 1.0) -> None:
        self.bus = bus
        self.period_s = period_s
        self.snapshot: Snapshot | None = None
        self.latency = Latency()
        self.error = ""

    async def poll(self) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
            while True:
                try:
                    self.snapshot = await read(self.bus)
                    self.error = ""
                except Exception as exc:
                    self.error = f"cannot read mesh state: {exc}"
                await self._scrape(http)
                await asyncio.sleep(self.period_s)

    async def _scrape(self, http: aiohttp.ClientSession) -> None:
        if self.snapshot is None:
            return
        text = []
        for m in self.snapshot.members:
            if m.service != "router" or not m.metrics_port:
                continue
            host = m.endpoint.rsplit(":", 1)[0]
            try:
                async with http.get(f"http://{host}:{m.metrics_port}/metrics") as r:
                    text.append(await r.text())
            except (aiohttp.ClientError, TimeoutError):
                continue
        if text:
            self.latency.add(time.time(), "\n".join(text))

    def state(self) -> dict[str, Any]:
        snap = self.snapshot
        now = time.time()
        return {
            "now": now,
            "error": self.error,
            "members": [
                {**_plain(m), "age_s": round(now - m.heartbeat_unix, 1)}
                for m in (snap.members if snap else [])
            ],
            "models": [_plain(m) for m in (snap.models if snap else [])],
            "policies": [_plain(p) for p in (snap.policies if snap else [])],
            "tiers": [_plain(t) for t in (snap.tiers if snap else [])],
            "latency": self.latency.summary(),
        }

    def app(self) -> web.Application:
        app = web.Application()

        async def index(_: web.Request) -> web.Response:
            return web.Response(text=PAGE.read_text(), content_type="text/html")

        async def state(_: web.Request) -> web.Response:
            return web.json_response(self.state())

        app.router.add_get("/", index)
        app.router.add_get("/api/state", state)
        return app


def _plain(struct: Any) -> dict[str, Any]:
    import msgspec

    out: dict[str, Any] = msgspec.to_builtins(struct)
    out.pop("type", None)
    return out


async def serve(nats_url: str, host: str, port: int, ready: asyncio.Event | None = None) -> None:
    """Run the console until cancelled."""
    bus = await Bus.connect(nats_url, name="infermesh-console", attempts=3)
    console = Console(bus)
    runner = web.AppRunner(console.app())
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    poller = asyncio.ensure_future(console.poll())
    if ready is not None:
        ready.set()
    try:
        await asyncio.Event().wait()
    finally:
        poller.cancel()
        await runner.cleanup()
        await bus.close()
