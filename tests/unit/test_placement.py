"""The tiering policy: decayed read rates and placement under byte budgets (pure)."""

from __future__ import annotations

import numpy as np
import pytest

from services.tiering.placement import BlockStat, Budget, Frequencies, moves, plan


def stat(block: int, rate: float, tier: str = "cold", nbytes: int = 100,
         watched_s: float = 100.0) -> BlockStat:
    """A block read ``rate`` times a second over ``watched_s`` seconds."""
    return BlockStat("w", "c", block, nbytes, tier=tier, frequency=rate * watched_s,
                     exposure=watched_s)


def test_the_most_read_blocks_per_byte_fill_hot_then_warm() -> None:
    stats = [stat(0, 5), stat(1, 50), stat(2, 20), stat(3, 1), stat(4, 0)]
    target = plan(stats, {"w": Budget(hot=100, warm=200)})
    assert target[("w", "c", 1)] == "hot"
    assert {target[("w", "c", 2)], target[("w", "c", 0)]} == {"warm"}
    assert target[("w", "c", 3)] == "cold"
    assert target[("w", "c", 4)] == "cold"


def test_budgets_are_never_exceeded() -> None:
    stats = [stat(i, 100 - i, nbytes=30 + i) for i in range(20)]
    target = plan(stats, {"w": Budget(hot=100, warm=250)})
    for tier, budget in (("hot", 100), ("warm", 250)):
        used = sum(s.nbytes for s in stats if target[s.key] == tier)
        assert used <= budget


def test_a_worker_without_gpu_gets_no_hot_blocks() -> None:
    target = plan([stat(0, 100), stat(1, 50)], {"w": Budget(hot=0, warm=1000)})
    assert set(target.values()) == {"warm"}


def test_a_tier_that_compresses_holds_more_blocks_of_the_same_budget() -> None:
    # files of 400 bytes; the worker holds warm blocks as SQ8 codes of 100 bytes
    stats = [stat(i, 10 - i, nbytes=400) for i in range(6)]
    assert sum(t == "warm" for t in plan(stats, {"w": Budget(warm=400)}).values()) == 1
    for s in stats:
        s.sizes = {"warm": 100}
    target = plan(stats, {"w": Budget(warm=400)})
    assert [target[("w", "c", i)] for i in range(6)] == ["warm"] * 4 + ["cold"] * 2


def test_a_near_equal_challenger_does_not_displace_an_incumbent() -> None:
    stats = [stat(0, 1.0, tier="warm"), stat(1, 1.1)]
    target = plan(stats, {"w": Budget(warm=100)})
    assert target[("w", "c", 0)] == "warm"
    assert target[("w", "c", 1)] == "cold"
    stats[1].frequency = 2.0 * stats[1].exposure  # now clearly more popular
    target = plan(stats, {"w": Budget(warm=100)})
    assert target[("w", "c", 1)] == "warm"
    assert target[("w", "c", 0)] == "cold"


def test_an_unread_incumbent_gives_way_to_a_block_read_a_few_times() -> None:
    # the old absolute margin of 2 reads kept never-read incumbents in place at the edge
    stats = [stat(0, 0.0, tier="warm", watched_s=170), stat(1, 4 / 170, watched_s=170)]
    target = plan(stats, {"w": Budget(warm=100)})
    assert target[("w", "c", 1)] == "warm"
    assert target[("w", "c", 0)] == "cold"


def test_the_margin_is_one_standard_error_of_the_incumbents_count() -> None:
    # an incumbent with 100 reads: sd 10; a challenger needs 1.1 * 100 + 10 + 1 = 121
    stats = [stat(0, 1.0, tier="warm"), stat(1, 1.2)]
    assert plan(stats, {"w": Budget(warm=100)})[("w", "c", 1)] == "cold"
    stats[1].frequency = 122
    assert plan(stats, {"w": Budget(warm=100)})[("w", "c", 1)] == "warm"


def test_a_rate_is_right_from_the_first_reports() -> None:
    f = Frequencies(half_life_s=120)
    for t in range(1, 6):
        f.observe("w", "c", {0: 10}, {0: 100}, {0: "cold"}, now=1000.0 + t, period_s=1.0)
    # five seconds of a 120 s half-life: a raw decayed count would say 50, not 10 a second
    assert f.stats[("w", "c", 0)].rate() == pytest.approx(10, rel=0.05)


def test_counts_halve_every_half_life() -> None:
    f = Frequencies(half_life_s=10, gap_reads=1e9)
    f.observe("w", "c", {0: 80}, {0: 100}, {0: "cold"}, now=1000.0)
    f.observe("w", "c", {}, {0: 100}, {0: "cold"}, now=1010.0)
    assert f.stats[("w", "c", 0)].frequency == pytest.approx(40)


def test_a_steady_block_keeps_its_long_average() -> None:
    rng = np.random.default_rng(7)
    f = Frequencies(half_life_s=120, fast_half_life_s=10)
    for t in range(1, 601):  # ten minutes of Poisson reads at 0.5 a second
        f.observe("w", "c", {0: int(rng.poisson(0.5))}, {0: 100}, {0: "warm"}, now=float(t))
    s = f.stats[("w", "c", 0)]
    assert s.restarts == 0
    assert s.exposure > 150  # the estimate spans minutes, not the fast window
    assert s.rate() == pytest.approx(0.5, rel=0.2)


def test_a_block_that_becomes_popular_is_promoted_within_seconds() -> None:
    f = Frequencies(half_life_s=120, fast_half_life_s=10)
    sizes = {0: 100, 1: 100}
    tiers = {0: "warm", 1: "cold"}
    now = 0.0
    for _ in range(600):  # block 0 popular for ten minutes, block 1 read now and then
        now += 1
        f.observe("w", "c", {0: 5, 1: int(now) % 50 == 0}, sizes, tiers, now)
    shifted = now
    while now - shifted < 60:
        now += 1
        f.observe("w", "c", {1: 5}, sizes, tiers, now)
        target = plan(f.stats.values(), {"w": Budget(warm=100)})
        if target[("w", "c", 1)] == "warm":
            break
    assert target[("w", "c", 1)] == "warm"
    assert target[("w", "c", 0)] == "cold"
    assert now - shifted <= 5  # with a 120 s half-life alone this took minutes


def test_a_block_nobody_reads_any_more_loses_its_rate() -> None:
    f = Frequencies(half_life_s=120, fast_half_life_s=10, gap_reads=7)
    sizes = {0: 100, 1: 100}
    tiers = {0: "warm", 1: "warm"}
    now = 0.0
    for _ in range(600):  # block 0: a read every other second, block 1: two a second
        now += 1
        f.observe("w", "c", {0: int(now) % 2, 1: 2}, sizes, tiers, now)
    for _ in range(20):  # then block 0 gets nothing: 7 reads were due after 14 s
        now += 1
        f.observe("w", "c", {1: 2}, sizes, tiers, now)
    s = f.stats[("w", "c", 0)]
    assert s.restarts == 1
    assert s.rate() == 0.0
    assert f.stats[("w", "c", 1)].restarts == 0


def test_a_stalled_worker_changes_nobodys_popularity() -> None:
    # a shared machine pauses a worker now and then: no reads at all for a few seconds
    rng = np.random.default_rng(3)
    f = Frequencies(half_life_s=120, fast_half_life_s=10)
    sizes = {b: 100 for b in range(4)}
    tiers = {0: "warm", 1: "warm", 2: "cold", 3: "cold"}
    rates = {0: 40.0, 1: 20.0, 2: 1.0, 3: 0.5}
    now = 0.0
    for t in range(600):
        now += 1
        stalled = t % 100 in (50, 51, 52)  # three seconds of nothing every 100 s
        reads = {} if stalled else {b: int(rng.poisson(r)) for b, r in rates.items()}
        f.observe("w", "c", reads, sizes, tiers, now)
        target = plan(f.stats.values(), {"w": Budget(warm=200)})
        assert [target[("w", "c", b)] for b in range(4)] == ["warm", "warm", "cold", "cold"]
    assert all(s.restarts == 0 for s in f.stats.values())


def test_a_restarted_service_seeds_rates_from_the_stored_counts() -> None:
    f = Frequencies(half_life_s=120)
    s = stat(0, 0.25)
    stored = f.steady_count(s)
    fresh = BlockStat("w", "c", 0, 100)
    f.seed(fresh, stored)
    assert fresh.rate() == pytest.approx(0.25)


def test_blocks_a_worker_no_longer_holds_are_forgotten() -> None:
    f = Frequencies()
    f.observe("w", "c", {0: 1, 1: 1}, {0: 10, 1: 10}, {}, now=1.0)
    f.observe("w", "c", {}, {1: 10}, {}, now=2.0)
    assert set(f.stats) == {("w", "c", 1)}


def test_tier_sizes_reported_by_the_worker_are_kept_per_block() -> None:
    f = Frequencies()
    f.observe("w", "c", {0: 1}, {0: 400}, {0: "cold"}, now=1.0,
              tier_sizes={"warm": {0: 100}})
    assert f.stats[("w", "c", 0)].size_in("warm") == 100
    assert f.stats[("w", "c", 0)].size_in("cold") == 400


def test_demotions_come_before_promotions() -> None:
    stats = [stat(0, 0.01, tier="warm"), stat(1, 100)]
    target = plan(stats, {"w": Budget(warm=100)})
    order = moves(stats, target)
    assert order == [(("w", "c", 0), "cold"), (("w", "c", 1), "warm")]
