"""Placement of vector blocks in tiers by access frequency, under per-worker byte budgets.

Pure functions, so the policy is tested without NATS.

**What is estimated.** Each block's read *rate*: reads counted over exponentially decayed
time, divided by the decayed time it was watched (``rate = count / exposure``, both decayed
with the same half-life). Dividing by the exposure makes the estimate unbiased from the
first report on (a raw decayed count is not a rate until a few half-lives have passed, and
ranks by it are meaningless during that time).

**Why two time scales.** At the edge of a budget the blocks are read rarely: with Zipf
s = 1.1 over 1000 lists and a budget of 40 % of them, the edge block gets 0.02 % of the
reads, one read in ~4000. Ranking 1024 blocks to within a point of the best share takes
~13 000-25 000 reads (simulated; bench/tiering.py measured 90 % of reads warm after ~13 000),
so the slow estimate (``half_life_s``, 120 s by default) should span that many at the query
rates of a small worker (~130 a second at 8 batches of 16). A shift of the popular set must
not wait minutes, though, and need not: a block whose popularity changed a lot shows it in
a few seconds. So each block also keeps a fast estimate (``fast_half_life_s``, 10 s); when
the fast count is statistically incompatible with the slow rate (a Poisson z-test, with one
read of slack for near-zero rates), or the block went unread while its share of the
worker's reads said ``gap_reads`` were due, the slow estimate restarts from the recent
evidence. Blocks whose reads change a lot (the ones that decide the share) follow in
seconds; blocks near the budget's edge, where a wrong rank costs little, keep the long,
precise average. Both tests judge a block's *share* of its worker's reads, never its reads
per second: on a shared machine a worker stalls for a second now and then, and a test in
seconds took every popular block's silence for a loss of popularity and demoted it
(bench/tiering.py measured 3.4 moves a second and the popular set churning).

**Placement.** Each worker's blocks fill the hot budget, then the warm one, by rate per byte
*of the tier being filled* (a tier may store a block compressed: the worker reports each
block's bytes per tier). The rest is cold.

**Hysteresis, scaled to the evidence.** An incumbent of a tier keeps it unless a challenger's
rate beats ``hysteresis`` times the incumbent's plus one standard error of the incumbent's
count (sqrt(count)) plus ``margin_reads``. Noise is thereby judged in units of noise, at any
query rate: the absolute margin of 2 reads this used to be was, at low rates and a 30 s
half-life, larger than an edge block's whole count, so an unread incumbent could not be
displaced by a block read once or twice (a unit test), while at high rates it separated
nothing. Measured on bench/tiering.py's workload the old and the new policy reach the same
share (90.7 % of 91.3 % at 8 batches/s); the earlier 87.7 % was a placement measured before
it had converged (the benchmark's docstring).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

TIERS = ("hot", "warm", "cold")
RANK = {t: i for i, t in enumerate(TIERS)}
LN2 = math.log(2)

BlockKey = tuple[str, str, int]  # (worker, collection, block)


@dataclass
class BlockStat:
    """What tiering knows of one block on one worker."""

    worker: str
    collection: str
    block: int
    nbytes: int
    """Bytes the block takes in its current tier."""
    tier: str = "cold"
    frequency: float = 0.0
    """Decayed read count (slow half-life)."""
    updated: float = 0.0
    exposure: float = 0.0
    """Decayed seconds watched (slow half-life): ``frequency / exposure`` is the rate."""
    recent: float = 0.0
    """Decayed read count (fast half-life)."""
    recent_exposure: float = 0.0
    """Decayed seconds watched (fast half-life)."""
    sizes: dict[str, int] = field(default_factory=dict)
    """Bytes the block would take in each tier; a tier not named costs ``nbytes``."""
    restarts: int = 0
    """Times the slow estimate restarted from the fast one (a change in popularity)."""
    last_read: float = -1.0
    """The worker's read clock (its collection's total reads so far) when the block was
    last read; -1: not since tiering has known it."""

    @property
    def key(self) -> BlockKey:
        return (self.worker, self.collection, self.block)

    def rate(self) -> float:
        """Estimated reads per second (0 before the block was watched at all)."""
        return self.frequency / self.exposure if self.exposure > 0 else 0.0

    def size_in(self, tier: str) -> int:
        """Bytes the block takes in ``tier``."""
        return self.sizes.get(tier, self.nbytes)


@dataclass
class Budget:
    """A worker's fast-memory budgets in bytes (hot = GPU, warm = RAM; cold is unbounded)."""

    hot: int = 0
    warm: int = 0


def _decay(value: float, exposure: float, dt: float, half_life: float) -> tuple[float, float]:
    """(count, exposure) after ``dt`` more seconds: both decay, the time watched adds in."""
    keep = math.exp(-LN2 * dt / half_life)
    return value * keep, exposure * keep + (1.0 - keep) * half_life / LN2


@dataclass
class Frequencies:
    """Decayed read rates per block, on a slow and a fast time scale (see the module doc)."""

    half_life_s: float = 120.0
    fast_half_life_s: float = 10.0
    change_z: float = 4.0
    """How many standard deviations the fast count must stray from the slow rate's forecast
    (plus one read) before the slow estimate restarts from the fast one."""
    gap_reads: float = 7.0
    """A block none of whose worker's last reads went to it, where its share expected this
    many (a chance of e^-7, about 1e-3, if the share were still true), restarts too."""
    stats: dict[BlockKey, BlockStat] = field(default_factory=dict)
    totals: dict[tuple[str, str], BlockStat] = field(default_factory=dict)
    """Per (worker, collection): all its reads as one pseudo-block, i.e. how busy it is."""
    clock: dict[tuple[str, str], float] = field(default_factory=dict)
    """Per (worker, collection): reads so far (the clock gaps are measured on)."""

    def decay_to(self, stat: BlockStat, now: float) -> None:
        """Advance a block's estimates to ``now`` (the time since counts as watched)."""
        if stat.updated and now > stat.updated:
            dt = now - stat.updated
            stat.frequency, stat.exposure = _decay(stat.frequency, stat.exposure, dt,
                                                   self.half_life_s)
            stat.recent, stat.recent_exposure = _decay(stat.recent, stat.recent_exposure, dt,
                                                       self.fast_half_life_s)
        stat.updated = now

    def changed(self, stat: BlockStat, total: BlockStat, clock: float) -> str:
        """Whether recent reads contradict the slow rate: "" (no), "count" or "gap".

        Two tests, both on the block's *share* of the worker's reads, so that a worker that
        stalls or slows down (a busy neighbour, a pause) changes nobody's popularity: the
        fast count strays from what the slow share forecasts from the worker's recent reads
        ("count": catches rises within seconds, and falls of very popular blocks), or the
        block has gone unread while the worker served enough reads that ``gap_reads`` of
        them were due to it ("gap": catches a fall to nothing at any rate).
        """
        if stat.exposure <= 1.5 * stat.recent_exposure or total.rate() <= 0:
            return ""  # the slow estimate holds no more history than the fast one
        share = stat.rate() / total.rate()
        busy = (total.recent / total.recent_exposure) if total.recent_exposure > 0 else 0.0
        expected = share * busy * stat.recent_exposure
        # Decayed counts vary less than Poisson counts of the same mean: sqrt(mean) errs safe.
        if abs(stat.recent - expected) > self.change_z * math.sqrt(expected) + 1.0:
            return "count"
        if stat.last_read >= 0 and share * (clock - stat.last_read) > self.gap_reads:
            return "gap"
        return ""

    def observe(
        self,
        worker: str,
        collection: str,
        reads: dict[int, int],
        sizes: dict[int, int],
        tiers: dict[int, str],
        now: float,
        tier_sizes: dict[str, dict[int, int]] | None = None,
        period_s: float = 0.0,
    ) -> None:
        """Fold one worker report in: advance every block it holds, add the new reads.

        ``tier_sizes`` (tier -> block -> bytes) says what each block takes in a tier where
        that differs from ``sizes`` (a worker that stores warm or hot blocks compressed).
        ``period_s`` is the time the reads were counted over (a new block was watched that
        long when its first reads arrive).
        """
        wc = (worker, collection)
        total = self.totals.get(wc)
        if total is None:
            total = self.totals[wc] = BlockStat(worker, collection, -1, 0, updated=now - period_s)
        self.decay_to(total, now)
        n_all = sum(reads.get(b, 0) for b in sizes)
        total.frequency += n_all
        total.recent += n_all
        clock = self.clock.get(wc, 0.0) + n_all
        self.clock[wc] = clock
        for block, nbytes in sizes.items():
            key = (worker, collection, block)
            stat = self.stats.get(key)
            if stat is None:
                stat = self.stats[key] = BlockStat(worker, collection, block, nbytes,
                                                   updated=now - period_s)
            stat.nbytes = nbytes
            stat.tier = tiers.get(block, stat.tier)
            if tier_sizes:
                stat.sizes = {t: per[block] for t, per in tier_sizes.items() if block in per}
            self.decay_to(stat, now)
            n = reads.get(block, 0)
            if n:
                stat.frequency += n
                stat.recent += n
                stat.last_read = clock
            change = self.changed(stat, total, clock)
            if change == "count":  # the fast window is the evidence of the new rate
                stat.frequency, stat.exposure = stat.recent, stat.recent_exposure
                stat.restarts += 1
            elif change == "gap":  # none of the reads since its last one is the evidence
                # the time those reads took, at the worker's recent pace
                pace = total.recent / total.recent_exposure if total.recent_exposure else 0.0
                gap = (clock - stat.last_read) / pace if pace > 0 else 0.0
                stat.frequency, stat.exposure = _decay(0.0, 0.0, gap, self.half_life_s)
                stat.recent, stat.recent_exposure = _decay(0.0, 0.0, gap, self.fast_half_life_s)
                stat.restarts += 1
        # Blocks the worker no longer holds are forgotten.
        held = set(sizes)
        for key in [k for k in self.stats if k[0] == worker and k[1] == collection]:
            if key[2] not in held:
                del self.stats[key]

    def seed(self, stat: BlockStat, frequency: float) -> None:
        """Start a block from a steady-state count (``steady_count``), as after a restart."""
        stat.frequency = frequency
        stat.exposure = self.half_life_s / LN2
        stat.recent = frequency * self.fast_half_life_s / self.half_life_s
        stat.recent_exposure = self.fast_half_life_s / LN2

    def steady_count(self, stat: BlockStat) -> float:
        """The block's rate as the decayed count it would have in steady state (for the KV)."""
        return stat.rate() * self.half_life_s / LN2

    def forget_worker(self, worker: str) -> None:
        for key in [k for k in self.stats if k[0] == worker]:
            del self.stats[key]
        for wc in [k for k in self.totals if k[0] == worker]:
            del self.totals[wc]
            self.clock.pop(wc, None)


def plan(
    stats: Iterable[BlockStat],
    budgets: dict[str, Budget],
    hysteresis: float = 1.1,
    margin_reads: float = 1.0,
) -> dict[BlockKey, str]:
    """The tier every block should be in: per worker, fill hot then warm by rate per byte.

    An incumbent of the tier being filled (or of a faster one) counts with its rate times
    ``hysteresis`` plus one standard error and ``margin_reads`` reads over its exposure.
    """
    by_worker: dict[str, list[BlockStat]] = {}
    for s in stats:
        by_worker.setdefault(s.worker, []).append(s)
    target: dict[BlockKey, str] = {}
    for worker, blocks in by_worker.items():
        budget = budgets.get(worker, Budget())
        left = blocks
        for tier, free in (("hot", budget.hot), ("warm", budget.warm)):
            if free <= 0:
                continue

            def score(s: BlockStat, tier: str = tier) -> float:
                rate = s.rate()
                if RANK[s.tier] <= RANK[tier] and s.exposure > 0:
                    # a challenger must beat it clearly: by a factor and by its noise
                    bonus = (math.sqrt(max(s.frequency, 0.0)) + margin_reads) / s.exposure
                    rate = rate * hysteresis + bonus
                return rate / max(s.size_in(tier), 1)

            ranked = sorted(left, key=lambda s: (-score(s), s.collection, s.block))
            rest = []
            for s in ranked:
                size = s.size_in(tier)
                if (s.frequency > 0 or RANK[s.tier] <= RANK[tier]) and size <= free:
                    free -= size
                    target[s.key] = tier
                else:
                    rest.append(s)
            left = rest
        for s in left:
            target[s.key] = "cold"
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
