"""The worker's side of tiering: report block reads, apply moves, recover placement.

Every ``access_period_s`` the worker publishes one ``BlockAccess`` per collection it holds on
``infermesh.tiering.access.<instance>``: the reads since the last report (drained from the
collection's counters, summed over tiers), the bytes and tier of every block, and its hot and
warm budgets. The tiering service answers with ``TierMove`` on
``infermesh.tiering.move.<instance>``; each move runs ``collection.place`` in a thread (the
engine builds the new copy first and swaps, so searches never stop) and is confirmed with
``TierMoved`` (ok or the error, and how long it took). Moves run one at a time, so two copies
of at most one block exist at once.

Placement of record is the KV ``infermesh_placement`` (key ``<instance>.<collection>.<block>``):
before a collection is first reported, its blocks are placed as the KV says, so a restarted
worker comes back in the tiers it had and its first report agrees with the tiering service
(no moves back and forth).

A promotion that would take a tier over this worker's budget is refused (``TierMoved`` with
ok false) and re-planned: the tiering service plans with the tiers it last heard of, while
moves it published earlier wait here to be applied one at a time, so two rounds can spend
the same freed bytes (measured with bench/tiering.py: 80 MB warm under a 62 MB budget while
moves queued). The check is against what is placed now, so the budget is a hard bound.

Default tier of a block nobody placed (a new collection, a new block, no KV entry): warm
while this worker's warm allowance lasts, then cold (:class:`WarmAllowance`). A small
collection is served from RAM with no tiering service at all, and a large one never
overcommits RAM before the tiering service ranks its blocks. With the tiering service down,
the current placement simply stays.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time

from services.retrieval_worker.blocks import Tier
from services.retrieval_worker.holdings import Holdings
from shared import metrics
from shared.bus import Bus
from shared.errors import FailedPrecondition, InfermeshError
from shared.events import (
    PLACEMENT_BUCKET,
    TIERING_ACCESS,
    TIERING_MOVE,
    TIERING_MOVED,
    BlockAccess,
    TierMove,
    TierMoved,
    block_placed_decoder,
    tier_move_decoder,
    worker_key,
)

log = logging.getLogger(__name__)


def physical_ram() -> int:
    """Bytes of physical RAM of this machine."""
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


class WarmAllowance:
    """Default tier of unplaced blocks: warm until ``budget`` bytes are granted, then cold.

    It counts only first placements; from then on the tiering service keeps each worker's
    warm bytes under the budget it reports (``BlockAccess.warm_budget``).
    """

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.granted = 0
        self._lock = threading.Lock()  # collections load blocks in their own threads

    def __call__(self, nbytes: int) -> Tier:
        with self._lock:
            if self.granted + nbytes <= self.budget:
                self.granted += nbytes
                return Tier.WARM
            return Tier.COLD


class TierAgent:
    """Publishes this worker's block reads and applies the tiering service's moves."""

    def __init__(
        self,
        bus: Bus,
        holdings: Holdings,
        instance: str,
        *,
        period_s: float,
        hot_budget: int,
        warm_budget: int,
    ) -> None:
        self.bus = bus
        self.holdings = holdings
        self.instance = instance
        self.token = worker_key(instance)
        self.period_s = period_s
        self.hot_budget = hot_budget
        self.warm_budget = warm_budget
        self.recovered: set[str] = set()
        self._moving = asyncio.Lock()
        self._last = time.time()

    async def run(self) -> None:
        """Take moves and report reads every period until cancelled."""
        await self.bus.subscribe(f"{TIERING_MOVE}.{self.token}", tier_move_decoder, self.on_move)
        while True:
            if self.bus.connected:
                await self.recover()
                await self.report()
            await asyncio.sleep(self.period_s)

    async def recover(self) -> int:
        """Place the blocks of collections not yet reported as the placement KV says."""
        new = [n for n in self.holdings.held if n not in self.recovered]
        if not new:
            return 0
        decided: list[tuple[str, int, Tier]] = []
        for key, value in (await self.bus.kv_items(PLACEMENT_BUCKET)).items():
            token, _, rest = key.partition(".")
            name, _, block_token = rest.rpartition(".")
            if token != self.token or name not in new:
                continue
            placed = block_placed_decoder.decode(value)
            decided.append((name, int(block_token), Tier(placed.tier)))
        applied = 0
        async with self._moving:
            for name, block, tier in decided:
                held = self.holdings.held.get(name)
                if held is None:
                    continue
                try:
                    await asyncio.to_thread(held.collection.place, block, tier)
                    applied += 1
                except InfermeshError as exc:
                    log.warning("cannot restore %s/%d to %s: %s", name, block, tier, exc)
        self.recovered.update(new)
        if applied:
            log.info("restored the placement of %d blocks from KV", applied)
        return applied

    def accesses(self) -> list[BlockAccess]:
        """One report per held collection with blocks: reads since the last call, sizes, tiers."""
        now = time.time()
        period = now - self._last
        self._last = now
        out = []
        reads_by_tier: dict[str, int] = {}
        bytes_by_tier = {t.value: 0 for t in Tier}
        for name, held in list(self.holdings.held.items()):
            col = held.collection
            sizes = col.block_bytes()
            if not sizes:
                continue
            tiers = {b: t.value for b, t in col.placement().items()}
            reads: dict[int, int] = {}
            for block, by_tier in col.read_counts(drain=True).items():
                reads[block] = sum(by_tier.values())
                for tier, n in by_tier.items():
                    reads_by_tier[tier] = reads_by_tier.get(tier, 0) + n
            for block, n in sizes.items():
                bytes_by_tier[tiers[block]] += n
            # what each block would take in each fast tier (a tier may hold it compressed)
            bytes_in = {t.value: col.bytes_in(t) for t in (Tier.HOT, Tier.WARM)
                        if t in col.tier_codecs()}
            out.append(BlockAccess(
                worker=self.instance, collection=name, reads=reads, block_bytes=sizes,
                tiers=tiers, hot_budget=self.hot_budget, warm_budget=self.warm_budget,
                period_s=period, at_unix=now, bytes_in=bytes_in,
            ))
        for tier, n in bytes_by_tier.items():
            metrics.TIER_BYTES.labels(self.instance, tier).set(n)
        for tier, n in reads_by_tier.items():
            metrics.TIER_READS.labels(self.instance, tier).inc(n)
        return out

    async def report(self) -> None:
        """Publish this period's reports."""
        for event in self.accesses():
            await self.bus.publish(f"{TIERING_ACCESS}.{self.token}", event)

    def check_budget(self, collection: str, block: int, tier: Tier) -> None:
        """Raise FailedPrecondition if moving the block would take ``tier`` over budget."""
        if tier is Tier.WARM:
            budget = self.warm_budget
        elif tier is Tier.HOT and self.hot_budget > 0:
            budget = self.hot_budget  # 0: no GPU, and place() says so itself
        else:
            return
        used = size = 0
        for name, held in list(self.holdings.held.items()):
            col = held.collection
            sizes = col.block_bytes()
            for b, t in col.placement().items():
                if name == collection and b == block:
                    if t is tier:
                        return  # already there: it takes nothing more
                    # its size in the tier it goes to (which may hold it compressed)
                    size = col.bytes_in(tier).get(b, sizes[b])
                elif t is tier:
                    used += sizes[b]
        if used + size > budget:
            raise FailedPrecondition(
                f"{tier.value} budget: {used} bytes placed + {size} of {collection}/{block} > "
                f"{budget}; re-planned once the demotions ahead of it have landed"
            )

    async def on_move(self, move: TierMove) -> None:
        """Apply one move in a thread and confirm it (or say why it failed)."""
        start = time.perf_counter()
        error = ""
        over_budget = False
        async with self._moving:
            try:
                held = self.holdings.get(move.collection)
                try:
                    self.check_budget(move.collection, move.block, Tier(move.tier))
                except FailedPrecondition:
                    over_budget = True
                    raise
                await asyncio.to_thread(held.collection.place, move.block, Tier(move.tier))
            except (InfermeshError, ValueError, MemoryError, RuntimeError, OSError) as exc:
                # torch reports CUDA out-of-memory as a RuntimeError; the reason goes back to
                # the tiering service, which logs it and re-plans
                error = f"{type(exc).__name__}: {exc}"
        seconds = time.perf_counter() - start
        if error:
            # a refusal over budget is routine while moves queue: not worth a warning
            log.log(logging.INFO if over_budget else logging.WARNING,
                    "move of %s/%d to %s failed: %s", move.collection, move.block, move.tier,
                    error)
        await self.bus.publish(f"{TIERING_MOVED}.{self.token}", TierMoved(
            worker=self.instance, collection=move.collection, block=move.block, tier=move.tier,
            revision=move.revision, ok=not error, error=error, seconds=seconds,
        ))
