"""The tiering policy: decayed frequencies and placement under byte budgets (pure)."""

from __future__ import annotations

import pytest

from services.tiering.placement import BlockStat, Budget, Frequencies, moves, plan


def stat(block: int, freq: float, tier: str = "cold", nbytes: int = 100) -> BlockStat:
    return BlockStat("w", "c", block, nbytes, tier=tier, frequency=freq)


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


def test_a_near_equal_challenger_does_not_displace_an_incumbent() -> None:
    stats = [stat(0, 10, tier="warm"), stat(1, 11)]
    target = plan(stats, {"w": Budget(warm=100)}, hysteresis=1.25)
    assert target[("w", "c", 0)] == "warm"
    assert target[("w", "c", 1)] == "cold"
    stats[1].frequency = 20  # now clearly more popular
    target = plan(stats, {"w": Budget(warm=100)}, hysteresis=1.25)
    assert target[("w", "c", 1)] == "warm"
    assert target[("w", "c", 0)] == "cold"


def test_frequencies_halve_every_half_life() -> None:
    f = Frequencies(half_life_s=10)
    f.observe("w", "c", {0: 80}, {0: 100}, {0: "cold"}, now=1000.0)
    f.observe("w", "c", {}, {0: 100}, {0: "cold"}, now=1010.0)
    assert f.stats[("w", "c", 0)].frequency == pytest.approx(40)


def test_a_shift_in_popularity_changes_placement_within_a_few_half_lives() -> None:
    f = Frequencies(half_life_s=5)
    sizes = {b: 100 for b in range(4)}
    tiers = dict.fromkeys(range(4), "cold")
    now = 0.0
    for _ in range(10):
        now += 1
        f.observe("w", "c", {0: 100}, sizes, tiers, now)
    target = plan(f.stats.values(), {"w": Budget(warm=100)})
    assert target[("w", "c", 0)] == "warm"
    for s in f.stats.values():
        s.tier = target[s.key]
    tiers = {b: f.stats[("w", "c", b)].tier for b in range(4)}
    for _ in range(15):  # the popular block is now 3
        now += 1
        f.observe("w", "c", {3: 100}, sizes, tiers, now)
    target = plan(f.stats.values(), {"w": Budget(warm=100)})
    assert target[("w", "c", 3)] == "warm"
    assert target[("w", "c", 0)] == "cold"


def test_blocks_a_worker_no_longer_holds_are_forgotten() -> None:
    f = Frequencies()
    f.observe("w", "c", {0: 1, 1: 1}, {0: 10, 1: 10}, {}, now=1.0)
    f.observe("w", "c", {}, {1: 10}, {}, now=2.0)
    assert set(f.stats) == {("w", "c", 1)}


def test_demotions_come_before_promotions() -> None:
    stats = [stat(0, 1, tier="warm"), stat(1, 100)]
    target = plan(stats, {"w": Budget(warm=100)})
    order = moves(stats, target)
    assert order == [(("w", "c", 0), "cold"), (("w", "c", 1), "warm")]


def test_a_read_or_two_more_does_not_displace_an_incumbent_at_the_budget_edge() -> None:
    # at the edge of a budget frequencies are a read or two: noise, not popularity
    stats = [stat(0, 1.0, tier="warm"), stat(1, 2.5)]
    target = plan(stats, {"w": Budget(warm=100)}, hysteresis=1.25)
    assert target[("w", "c", 0)] == "warm"
    stats[1].frequency = 6.0  # clearly more: 1.25 * 1 + 2 = 3.25 is the bar
    target = plan(stats, {"w": Budget(warm=100)}, hysteresis=1.25)
    assert target[("w", "c", 1)] == "warm"
