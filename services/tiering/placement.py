"""Placement of vector blocks in tiers by access frequency, under per-worker byte budgets.

Pure functions, so the policy is tested without NATS. Frequencies decay exponentially with
a half-life, so a shift in what is popular shows within a few half-lives. Each worker's
blocks are ranked by reads per byte (the greedy answer to "most reads served from fast
memory per byte of budget") and fill the hot budget, then the warm budget; the rest is cold.
A block already in a faster tier keeps its place unless a challenger beats it by a margin
(hysteresis), so near-equal blocks do not swap back and forth every round. The margin is a
factor and a few reads: at the budget's edge the frequencies are a read or two, where a
factor alone does not separate noise from popularity (measured with bench/tiering.py on
1024 one-list blocks: ~750 needless moves in 90 s of a steady Zipf stream, 75 ms each).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

TIERS = ("hot", "warm", "cold")
RANK = {t: i for i, t in enumerate(TIERS)}

BlockKey = tuple[str, str, int]  # (worker, collection, block)


@dataclass
class BlockStat:
    """What tiering knows of one block on one worker."""

    worker: str
    collection: str
    block: int
    nbytes: int
    tier: str = "cold"
    frequency: float = 0.0
    updated: float = 0.0

    @property
    def key(self) -> BlockKey:
        return (self.worker, self.collection, self.block)


@dataclass
class Budget:
    """A worker's fast-memory budgets in bytes (hot = GPU, warm = RAM; cold is unbounded)."""

    hot: int = 0
    warm: int = 0


@dataclass
class Frequencies:
    """Exponentially decayed read counts per block."""

    half_life_s: float = 30.0
    stats: dict[BlockKey, BlockStat] = field(default_factory=dict)

    def decay_to(self, stat: BlockStat, now: float) -> None:
        if stat.updated and now > stat.updated:
            stat.frequency *= math.exp(-math.log(2) * (now - stat.updated) / self.half_life_s)
        stat.updated = now

    def observe(
        self,
        worker: str,
        collection: str,
        reads: dict[int, int],
        sizes: dict[int, int],
        tiers: dict[int, str],
        now: float,
    ) -> None:
        """Fold one worker report in: decay every block it holds, add the new reads."""
        for block, nbytes in sizes.items():
            key = (worker, collection, block)
            stat = self.stats.get(key)
            if stat is None:
                stat = self.stats[key] = BlockStat(worker, collection, block, nbytes, updated=now)
            stat.nbytes = nbytes
            stat.tier = tiers.get(block, stat.tier)
            self.decay_to(stat, now)
            stat.frequency += reads.get(block, 0)
        # Blocks the worker no longer holds are forgotten.
        held = set(sizes)
        for key in [k for k in self.stats if k[0] == worker and k[1] == collection]:
            if key[2] not in held:
                del self.stats[key]

    def forget_worker(self, worker: str) -> None:
        for key in [k for k in self.stats if k[0] == worker]:
            del self.stats[key]


def plan(
    stats: Iterable[BlockStat],
    budgets: dict[str, Budget],
    hysteresis: float = 1.25,
    margin_reads: float = 2.0,
) -> dict[BlockKey, str]:
    """The tier every block should be in: per worker, fill hot then warm by reads per byte.

    An incumbent of a faster tier counts ``hysteresis`` times its frequency plus
    ``margin_reads`` (Poisson noise of a count near 1 is about 1).
    """
    by_worker: dict[str, list[BlockStat]] = {}
    for s in stats:
        by_worker.setdefault(s.worker, []).append(s)
    target: dict[BlockKey, str] = {}
    for worker, blocks in by_worker.items():
        budget = budgets.get(worker, Budget())

        def score(s: BlockStat) -> float:
            # Incumbents of a faster tier get a bonus: a challenger must beat them clearly.
            if s.tier == "cold":
                return s.frequency / max(s.nbytes, 1)
            return (s.frequency * hysteresis + margin_reads) / max(s.nbytes, 1)

        ranked = sorted(blocks, key=lambda s: (-score(s), s.collection, s.block))
        free = {"hot": budget.hot, "warm": budget.warm}
        for s in ranked:
            placed = "cold"
            if s.frequency > 0 or s.tier != "cold":
                for tier in ("hot", "warm"):
                    if s.nbytes <= free[tier]:
                        free[tier] -= s.nbytes
                        placed = tier
                        break
            target[s.key] = placed
    return target


def moves(stats: Iterable[BlockStat], target: dict[BlockKey, str]) -> list[tuple[BlockKey, str]]:
    """Blocks whose tier must change, demotions first (they free the memory promotions use)."""
    changes = [(s.key, target[s.key]) for s in stats if s.key in target and target[s.key] != s.tier]
    current = {s.key: s.tier for s in stats}
    # Demotions (to a slower tier) first, then promotions.
    return sorted(changes, key=lambda kt: RANK[kt[1]] < RANK[current[kt[0]]])


def hit_share(stats: Iterable[BlockStat], reads: dict[BlockKey, int]) -> dict[str, float]:
    """Share of the given reads that each tier would serve under the current tiers."""
    tiers = {s.key: s.tier for s in stats}
    total = sum(reads.values()) or 1
    share = dict.fromkeys(TIERS, 0.0)
    for key, n in reads.items():
        share[tiers.get(key, "cold")] += n / total
    return share
