"""The tiering loop: access reports in, placement decisions out (KV + move events).

Workers report block reads (``infermesh.tiering.access.<worker>``); every period the loop
recomputes placement (services/tiering/placement.py), writes each decision to the KV bucket
``infermesh_placement`` (key ``<worker>.<collection>.<block>``), and publishes moves on
``infermesh.tiering.move.<worker>``. Workers confirm on ``...moved``. A restarted tiering
service seeds its state from the KV (tiers and frequencies), so it resumes where it was; while
it is down, workers keep the current placement and searches are unaffected.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

from nats.errors import ConnectionClosedError, NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from opentelemetry import trace

from services.tiering.config import TieringConfig
from services.tiering.placement import (
    TIERS,
    BlockStat,
    Budget,
    Frequencies,
    hit_share,
    moves,
    plan,
)
from shared.bus import Bus
from shared.events import (
    PLACEMENT_BUCKET,
    TIER_STATUS_BUCKET,
    TIERING_ACCESS,
    TIERING_MOVE,
    TIERING_MOVED,
    BlockAccess,
    BlockPlaced,
    TierMove,
    TierMoved,
    TierStatus,
    block_access_decoder,
    block_placed_decoder,
    encode,
    placement_key,
    tier_moved_decoder,
    worker_key,
)

__all__ = ["TieringController", "placement_key", "worker_key"]

log = logging.getLogger(__name__)
tracer = trace.get_tracer("infermesh.tiering")


class TieringController:
    """Keeps frequencies, budgets and decisions; one instance per tiering service."""

    def __init__(self, bus: Bus, config: TieringConfig) -> None:
        self.bus = bus
        self.cfg = config
        self.freq = Frequencies(
            half_life_s=config.half_life_s, fast_half_life_s=config.fast_half_life_s,
            change_z=config.change_z, gap_reads=config.gap_reads,
        )
        self.budgets: dict[str, Budget] = {}
        self.gpu: dict[str, bool] = {}
        self.last_report: dict[str, float] = {}
        self.recent_reads: dict[str, deque[dict[tuple[str, str, int], int]]] = {}
        self.recent_moves: dict[str, deque[str]] = {}
        self.pending: dict[tuple[str, str, int], tuple[str, float]] = {}
        self.revision = 0
        self.rounds = 0
        """Planning rounds run since start (tests and status wait on it)."""

    async def recover(self) -> None:
        """Seed tiers and frequencies from the placement KV (after a restart)."""
        items = await self.bus.kv_items(PLACEMENT_BUCKET)
        now = time.time()
        for value in items.values():
            placed: BlockPlaced = block_placed_decoder.decode(value)
            stat = self.freq.stats[(placed.worker, placed.collection, placed.block)] = BlockStat(
                placed.worker,
                placed.collection,
                placed.block,
                nbytes=0,
                tier=placed.tier,
                updated=now,
            )
            self.freq.seed(stat, placed.frequency)
            self.revision = max(self.revision, placed.revision)
        log.info("recovered placement of %d blocks from KV", len(items))

    async def on_access(self, event: BlockAccess) -> None:
        now = time.time()
        self.freq.observe(
            event.worker, event.collection, event.reads, event.block_bytes, event.tiers, now,
            tier_sizes=event.bytes_in, period_s=event.period_s,
        )
        self.budgets[event.worker] = Budget(hot=event.hot_budget, warm=event.warm_budget)
        self.gpu[event.worker] = event.hot_budget > 0
        self.last_report[event.worker] = now
        window = self.recent_reads.setdefault(event.worker, deque(maxlen=10))
        window.append({(event.worker, event.collection, b): n for b, n in event.reads.items()})

    async def on_moved(self, event: TierMoved) -> None:
        key = (event.worker, event.collection, event.block)
        self.pending.pop(key, None)
        stat = self.freq.stats.get(key)
        text = f"{event.collection}/{event.block} ->{event.tier} {event.seconds:.2f}s"
        if not event.ok:
            text += f" FAILED: {event.error}"
            log.warning(
                "move of %s/%s to %s failed on %s: %s",
                event.collection,
                event.block,
                event.tier,
                event.worker,
                event.error,
            )
        elif stat is not None:
            stat.tier = event.tier
        self.recent_moves.setdefault(event.worker, deque(maxlen=10)).appendleft(text)

    async def step(self) -> int:
        """One round: forget silent workers, plan, publish moves, write KV; returns moves."""
        now = time.time()
        self.rounds += 1
        for worker, seen in list(self.last_report.items()):
            if now - seen > self.cfg.worker_silence_s:
                self.freq.forget_worker(worker)
                del self.last_report[worker]
        # A move unconfirmed for long is re-planned (the worker may have restarted).
        for key, (_, asked) in list(self.pending.items()):
            if now - asked > 10 * self.cfg.tiering_period_s:
                del self.pending[key]
        stats = [s for s in self.freq.stats.values() if s.worker in self.last_report]
        for s in stats:
            self.freq.decay_to(s, now)
        target = plan(stats, self.budgets, self.cfg.hysteresis, self.cfg.margin_reads)
        todo = [(k, t) for k, t in moves(stats, target) if k not in self.pending]
        todo = todo[: self.cfg.max_moves_per_round]
        if todo:
            with tracer.start_as_current_span(
                "tiering.plan", attributes={"infermesh.moves": len(todo)}
            ):
                kv = await self.bus.kv(PLACEMENT_BUCKET)
                for (worker, collection, block), tier in todo:
                    self.revision += 1
                    stat = self.freq.stats[(worker, collection, block)]
                    await kv.put(
                        placement_key(worker, collection, block),
                        encode(
                            BlockPlaced(
                                collection=collection,
                                block=block,
                                worker=worker,
                                tier=tier,
                                frequency=self.freq.steady_count(stat),
                                revision=self.revision,
                            )
                        ),
                    )
                    await self.bus.publish(
                        f"{TIERING_MOVE}.{worker_key(worker)}",
                        TierMove(
                            collection=collection, block=block, tier=tier, revision=self.revision
                        ),
                    )
                    self.pending[(worker, collection, block)] = (tier, now)
        await self._write_status(stats, now)
        return len(todo)

    async def _write_status(self, stats: list[BlockStat], now: float) -> None:
        kv = await self.bus.kv(TIER_STATUS_BUCKET)
        for worker in self.last_report:
            mine = [s for s in stats if s.worker == worker]
            tier_bytes = {t: sum(s.nbytes for s in mine if s.tier == t) for t in TIERS}
            reads: dict[tuple[str, str, int], int] = {}
            for window in self.recent_reads.get(worker, ()):
                for k, n in window.items():
                    reads[k] = reads.get(k, 0) + n
            status = TierStatus(
                worker=worker,
                tier_bytes=tier_bytes,
                hit_share=hit_share(mine, reads),
                recent_moves=tuple(self.recent_moves.get(worker, ())),
                gpu=self.gpu.get(worker, False),
                updated_unix=now,
            )
            await kv.put(worker_key(worker), encode(status))

    async def run(self) -> None:
        """Subscribe and plan every period until cancelled."""
        await self.recover()
        await self.bus.subscribe(f"{TIERING_ACCESS}.>", block_access_decoder, self.on_access)
        await self.bus.subscribe(f"{TIERING_MOVED}.>", tier_moved_decoder, self.on_moved)
        while True:
            await asyncio.sleep(self.cfg.tiering_period_s)
            if not self.bus.connected:
                continue  # decisions wait for NATS; workers keep the current placement
            try:
                await self.step()
            except (NatsTimeoutError, ConnectionClosedError, NoRespondersError) as exc:
                # NATS went away mid-round: the next round redoes what was not written.
                log.warning("tiering round interrupted by NATS (%s); retrying", type(exc).__name__)
