"""The batch-sizing control laws over synthetic observations (no network, no clock)."""

from __future__ import annotations

import math
import random

from services.batcher import control_law as law

SLO = 100.0
A, B = 20.0, 0.5  # synthetic cost: exec_ms = 20 + 0.5·n


def saturated(
    max_batch: int, delay_ms: float, count: int = 40, seed: int = 0, a: float = A, b: float = B
) -> list[law.Observation]:
    """Batches of a loaded target: full, each waiting for one running batch to finish."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        exec_ms = (a + b * max_batch) * rng.uniform(0.97, 1.03)
        out.append(law.Observation(max_batch, exec_ms + delay_ms / 2, exec_ms, float(i)))
    return out


def mixed(sizes: list[int], queue_ms: float = 1.0) -> list[law.Observation]:
    return [law.Observation(n, queue_ms, A + B * n, float(i)) for i, n in enumerate(sizes)]


def latency(max_batch: int, delay_ms: float) -> float:
    return delay_ms + 2 * (A + B * max_batch)


def test_the_p99_counts_each_request_of_a_batch_not_each_batch() -> None:
    obs = [law.Observation(1, 0.0, 500.0, 0.0), law.Observation(99, 0.0, 10.0, 1.0)]
    stats = law.summarize(obs)
    # One slow batch of one request is 1% of requests: the p99 request is in the big batch.
    assert stats.p99_ms == 10.0
    assert stats.items == 100 and stats.max_size == 99


def test_the_fit_recovers_a_linear_cost_curve() -> None:
    line = law.fit(mixed([1, 4, 8, 16, 32, 2, 6]))
    assert line is not None
    assert abs(line.a - A) < 1e-6 and abs(line.b - B) < 1e-6
    assert line.largest(40.0, 1000) == 40


def test_aimd_increases_the_cap_while_p99_is_under_the_slo_and_batches_fill_it() -> None:
    stats = law.summarize(saturated(8, 1.0))
    d = law.aimd(8, 1.0, stats, law.Limits(SLO, 128))
    assert d is not None and d.max_batch_size == 10 and d.code == "increase"


def test_aimd_does_not_raise_a_cap_that_batches_never_reach() -> None:
    stats = law.summarize(mixed([1, 2, 3] * 10))
    assert law.aimd(8, 1.0, stats, law.Limits(SLO, 128)) is None


def test_aimd_halves_the_cap_on_a_violation() -> None:
    stats = law.summarize(saturated(120, 4.0))
    assert stats.p99_ms > SLO
    d = law.aimd(120, 4.0, stats, law.Limits(SLO, 128))
    assert d is not None and d.max_batch_size == 60 and d.code == "decrease"
    assert d.max_delay_ms == 2.0


def test_aimd_never_exceeds_the_model_max_batch_size() -> None:
    stats = law.summarize(saturated(15, 1.0))
    d = law.aimd(15, 1.0, stats, law.Limits(SLO, 16))
    assert d is not None and d.max_batch_size == 16
    assert law.aimd(16, 1.0, law.summarize(saturated(16, 1.0)), law.Limits(SLO, 16)) is None


def test_no_law_decides_on_too_few_observations() -> None:
    few = saturated(8, 1.0, count=3)
    limits = law.Limits(SLO, 128)
    assert law.aimd(8, 1.0, law.summarize(few), limits) is None
    assert law.fitted(8, 1.0, law.summarize(few), law.fit(few), limits) is None


def test_the_fitted_law_picks_the_largest_cap_whose_worst_case_fits_the_target() -> None:
    obs = mixed([1, 2, 4, 8, 3, 5, 6, 32, 2, 1])
    tuning = law.Tuning(headroom=0.8)
    d = law.fitted(8, 1.0, law.summarize(obs), law.fit(obs), law.Limits(SLO, 128), 1.0, tuning)
    assert d is not None and d.code == "increase"
    # target = 0.8·SLO = 80 ms = 2·(20 + 0.5·n)  ->  n = 40
    assert d.max_batch_size == 40
    assert latency(d.max_batch_size, d.max_delay_ms) <= 0.8 * SLO + 1e-9


def test_the_fitted_law_grows_the_cap_at_most_to_twice_the_largest_batch_measured() -> None:
    obs = mixed([1, 2, 4, 8, 3, 5, 6, 7, 2, 1])
    d = law.fitted(8, 1.0, law.summarize(obs), law.fit(obs), law.Limits(SLO, 128))
    assert d is not None and d.max_batch_size == 16


def test_small_batches_at_low_load_do_not_shrink_the_cap_below_what_the_target_allows() -> None:
    # Low load: batches of 1-3 under a cap of 32, far inside the SLO. The target allows 30
    # (80 ms = 2·(20 + 0.5·n)); the measured sizes alone (twice 3) would have cut it to 6,
    # which one worker running a batch at a time could not carry at the next step in load.
    obs = mixed([1, 2, 3, 1, 2, 1, 3, 2, 1, 2] * 2)
    cap = 32
    for _ in range(5):
        d = law.fitted(cap, 1.0, law.summarize(obs), law.fit(obs), law.Limits(SLO, 128))
        if d is None or d.code == "hold":
            break
        cap = d.max_batch_size
    assert 25 <= cap <= 32
    assert latency(cap, 0.0) <= 0.8 * SLO  # and it still meets the target


def test_the_fitted_law_respects_the_model_max_batch_size() -> None:
    obs = mixed([1, 2, 4, 8] * 3)
    d = law.fitted(8, 1.0, law.summarize(obs), law.fit(obs), law.Limits(SLO, 16))
    assert d is not None and d.max_batch_size == 16
    assert d.max_delay_ms <= law.Tuning().max_delay_share * SLO


def test_the_fitted_law_backs_off_when_the_model_underestimates() -> None:
    # Observed latency is over the SLO although the queue is not building: trust the data.
    obs = [law.Observation(40, 30.0, 75.0, float(i)) for i in range(20)]
    stats = law.summarize(obs)
    d = law.fitted(40, 1.0, stats, law.fit(mixed([1, 2, 4, 8, 16])), law.Limits(SLO, 128))
    assert d is not None and d.code == "violation"
    assert d.max_batch_size < 40 and d.correction < 1.0


def test_the_fitted_law_keeps_capacity_when_arrivals_exceed_it() -> None:
    # A queue far longer than two batches is overload: shrinking batches would worsen it.
    obs = [law.Observation(30, 400.0, 35.0, float(i)) for i in range(20)]
    d = law.fitted(
        30, 1.0, law.summarize(obs), law.fit(mixed([1, 2, 4, 8, 30])), law.Limits(SLO, 128)
    )
    # 30 is the largest cap within the target (2·(20 + 0.5·30) = 70 ms), but over capacity
    # the target is lost to queueing anyway: the cap grows (cheaper per item), never shrinks.
    assert d is not None and d.correction == 1.0 and d.max_batch_size == 60
    assert d.reason.startswith("overload")


def test_both_laws_converge_under_a_saturating_load() -> None:
    limits = law.Limits(SLO, 128)
    history: list[law.Observation] = []
    mb, delay, corr = 1, 1.0, 1.0
    for step in range(30):
        obs = saturated(mb, delay, seed=step)
        history = (history + obs)[-200:]
        d = law.fitted(mb, delay, law.summarize(obs), law.fit(history), limits, corr)
        if d is not None:
            mb, delay, corr = d.max_batch_size, d.max_delay_ms, d.correction
    # The optimum is 30 with exact costs (2·(20 + 0.5·n) <= 0.7·SLO); noise costs a little.
    assert 24 <= mb <= 30
    assert latency(mb, delay) <= law.Tuning().headroom * SLO + 1e-9

    caps = []
    mb, delay = 1, 1.0
    for step in range(120):
        obs = saturated(mb, delay, seed=step)
        d = law.aimd(mb, delay, law.summarize(obs), limits)
        if d is not None:
            mb, delay = d.max_batch_size, d.max_delay_ms
        caps.append(mb)
    # AIMD saws between half the largest safe cap (latency ≤ SLO: n ≤ 60) and just above it.
    assert 25 <= min(caps[-40:]) and max(caps[-40:]) <= 64


def test_one_decision_at_most_halves_the_cap() -> None:
    # The fit says 5 fits the target, but one window is not enough evidence for a 64 -> 5 jump:
    # the next window judges 32 first.
    obs = [law.Observation(64, 1.0, 2.0 + 2.0 * 64, float(i)) for i in range(20)]
    line = law.fit(mixed([1, 2, 4, 8]))
    d = law.fitted(64, 1.0, law.summarize(obs), line, law.Limits(SLO, 128))
    assert d is not None and d.max_batch_size == 32


def test_a_backlog_is_not_blamed_on_the_batch_size() -> None:
    # Over the SLO, but the requests waited for several batches, not for one (a backlog
    # draining after a burst), and the batches are far from the cap: the correction stays,
    # and the cap is what the fit says, not smaller.
    obs = [law.Observation(4, 150.0, A + B * 4, float(i)) for i in range(20)]
    stats = law.summarize(obs)
    assert stats.p99_ms > SLO
    d = law.fitted(30, 1.0, stats, law.fit(mixed([1, 2, 4, 8, 30])), law.Limits(SLO, 128))
    assert d is not None and d.correction == 1.0 and not d.overloaded
    assert d.code != "violation" and d.max_batch_size == 30


def test_an_overload_does_not_grow_the_cap_when_larger_batches_cost_the_same_per_item() -> None:
    # A model whose cost is all per item (exec = 1 + 7·n ms: a one-thread ONNX run), its
    # queue built up with full batches of 8, as a closed loop saturating it looks. Larger
    # batches would add latency and no throughput: the cap follows the target instead.
    sizes = [1, 2, 4, 8] * 5
    flat = [law.Observation(n, 1.0, 1.0 + 7.0 * n, float(i)) for i, n in enumerate(sizes)]
    line = law.fit(flat)
    assert line is not None and not line.cheaper(8, 16, law.Tuning().min_batch_gain)
    queued = [law.Observation(8, 200.0, 57.0, float(i)) for i in range(20)]
    d = law.fitted(8, 1.0, law.summarize(queued), line, law.Limits(150.0, 64))
    assert d is not None and d.max_batch_size <= 8 and not d.reason.startswith("overload")
    # ... and what that cap delivered sets no floor above the knee of the cost curve:
    # batches of 3 cost within 5 % per item of batches of 64 here.
    assert law.throughput_floor({8: 270.0}, 270.0, line, 64) == 3
    # With a fixed cost per batch (exec = 20 + 0.5·n) the same evidence does grow it.
    costly = law.fit(mixed([1, 2, 4, 8] * 5))
    assert costly is not None and costly.cheaper(8, 16, law.Tuning().min_batch_gain)
    d = law.fitted(8, 1.0, law.summarize(queued), costly, law.Limits(150.0, 64))
    assert d is not None and d.max_batch_size == 16 and d.reason.startswith("overload")


def test_an_overload_needs_full_batches() -> None:
    queued = [law.Observation(30, 400.0, 35.0, float(i)) for i in range(20)]
    d = law.fitted(
        30, 1.0, law.summarize(queued), law.fit(mixed([1, 2, 4, 8, 30])), law.Limits(SLO, 128)
    )
    assert d is not None and d.overloaded
    half = [law.Observation(12, 400.0, 26.0, float(i)) for i in range(20)]
    d = law.fitted(
        30, 1.0, law.summarize(half), law.fit(mixed([1, 2, 4, 8, 30])), law.Limits(SLO, 128)
    )
    assert d is not None and not d.overloaded


def test_a_load_no_cap_carries_sets_the_floor_at_the_knee_of_the_cost_curve() -> None:
    # exec = 3.4 + 7.8·n ms (a one-thread ONNX run): batches of 8 cost within 5 % per item
    # of batches of 64, so a saturating load pins the cap at 8, not at the model's 64.
    line = law.fit([law.Observation(n, 1.0, 3.4 + 7.8 * n, float(i))
                    for i, n in enumerate([1, 2, 4, 8, 16] * 4)])
    assert line is not None
    assert law.throughput_floor({4: 230.0}, 240.0, line, 64) == 8
    # exec = 20 + 0.5·n: the fixed cost dominates, the knee is near the model's limit.
    costly = law.fit(mixed([1, 2, 4, 8, 16] * 4))
    assert costly is not None
    assert law.throughput_floor({4: 150.0}, 1500.0, costly, 128) >= 100


def test_the_throughput_floor_follows_what_an_overloaded_cap_delivered() -> None:
    line = law.Fit(a=2.8, b=0.3, resid_p99=0.0)
    # Cap 1 delivered 500/s with its queue building: 727/s needs 2 (cost per item 2.8/n + 0.3
    # against 3.1 at cap 1, with 20 % headroom).
    assert law.throughput_floor({1: 500.0}, 727.0, line, 64) == 2
    assert law.throughput_floor({1: 500.0}, 1000.0, line, 64) == 3  # 2.8/3 + 0.3 <= 1.24
    # A load cap 1 carries with headroom needs no floor, and no evidence means no floor.
    assert law.throughput_floor({1: 500.0}, 300.0, line, 64) == 1
    assert law.throughput_floor({}, 727.0, line, 64) == 1
    # Even the largest cap measured falls short: the floor is the model's limit.
    assert law.throughput_floor({64: 800.0}, 727.0, line, 64) == 64


def test_one_stalled_measurement_does_not_set_the_floor() -> None:
    line = law.Fit(a=2.6, b=0.26, resid_p99=0.0)
    # Caps 10 and 20 overloaded at about 1.5 k/s; cap 24 was measured in a stall at 700/s.
    # Taken alone, the stall says no cap carries 1 359/s with the margin (the knee, 47 here).
    assert law.throughput_floor({24: 700.0}, 1359.0, line, 64) == line.knee(64, 0.05) == 47
    # Among three, the median: cap 20's 1 600/s is 624 ms of model time a second, and
    # 1 359/s with 20 % to spare needs items at <= 0.367 ms, 2.6/n + 0.26 (n = 25).
    assert law.throughput_floor({10: 1500.0, 20: 1600.0, 24: 700.0}, 1359.0, line, 64) == 25
    # With two measurements the larger counts.
    assert law.throughput_floor({20: 1600.0, 24: 700.0}, 1359.0, line, 64) == 25


def test_the_floor_stays_above_a_cap_that_delivered_less_than_the_load_needs() -> None:
    # Cap 16 overloaded delivering 1 356/s; cap 32 drained a backlog at 2 600/s. The curve
    # (exec time only) says cap 6 would do, but cap 16 was just measured short.
    line = law.Fit(a=2.5, b=0.25, resid_p99=0.0)
    assert law.throughput_floor({32: 2600.0}, 1356.0, line, 64) < 16
    assert law.throughput_floor({16: 1356.0, 32: 2600.0}, 1356.0, line, 64) == 17


def test_the_fitted_law_never_goes_below_the_throughput_floor() -> None:
    # A correction at its minimum asks for cap 1 (target 0.3·0.7·SLO); the load needs 6.
    obs = [law.Observation(8, 1.0, A + B * 8, float(i)) for i in range(20)]
    line = law.fit(mixed([1, 2, 4, 8]))
    limits = law.Limits(SLO, 128)
    d = law.fitted(8, 1.0, law.summarize(obs), line, limits, 0.3, floor=6)
    assert d is not None and d.max_batch_size == 6
    assert law.fitted(8, 1.0, law.summarize(obs), line, limits, 0.3).max_batch_size == 4


def test_at_the_floor_a_violation_does_not_shrink_the_target_further() -> None:
    obs = [law.Observation(6, 1.0, 110.0, float(i)) for i in range(20)]
    stats = law.summarize(obs)
    assert stats.p99_ms > SLO
    line = law.fit(mixed([1, 2, 4, 8]))
    at_floor = law.fitted(6, 1.0, stats, line, law.Limits(SLO, 128), 0.5, floor=6)
    above = law.fitted(12, 1.0, stats, line, law.Limits(SLO, 128), 0.5, floor=6)
    assert at_floor is not None and at_floor.correction == 0.5
    assert above is not None and above.correction < 0.5 and above.code == "violation"


def test_a_cap_held_at_the_floor_waits_the_full_delay_for_its_batch() -> None:
    # The target alone leaves no slack for a delay (2·exec(6) is past it), but the load holds
    # the cap at 6: the batch waits 5 % of the SLO for the callers coming back.
    obs = [law.Observation(8, 1.0, A + B * 8, float(i)) for i in range(20)]
    line = law.fit(mixed([1, 2, 4, 8]))
    limits = law.Limits(SLO, 128)
    held = law.fitted(8, 1.0, law.summarize(obs), line, limits, 0.3, floor=6)
    assert held is not None and held.max_batch_size == 6 and held.max_delay_ms == 5.0
    free = law.fitted(8, 1.0, law.summarize(obs), line, limits, 0.3)
    assert free is not None and free.max_batch_size == 4 and free.max_delay_ms == 0.0


def closed_loop(queue_ms: tuple[float, float], seed: int = 0) -> tuple[law.Stats, law.Fit]:
    """5 s of MiniLM at c=32 on two one-thread instances (exec ≈ 6 + 8·n ms) under cap 10:
    both slots run batches back to back while the rest of the callers queue."""
    rng = random.Random(seed)
    obs = [
        law.Observation(10, rng.uniform(*queue_ms), 86.0 * rng.uniform(0.98, 1.02), i / 23.2)
        for i in range(116)
    ]
    line = law.fit([law.Observation(n, 1.0, 6.0 + 8.0 * n, 0.0) for n in (4, 8, 10, 12, 16)])
    assert line is not None
    return law.summarize(obs, 5.0), line


MINILM = law.Limits(150.0, 64)


def test_a_saturating_closed_loop_gets_one_batch_per_slot_instead_of_smaller_caps() -> None:
    stats, line = closed_loop((20.0, 76.0))
    assert stats.p99_ms > MINILM.slo_ms and 1.9 < stats.busy <= 2.0
    assert 31 < stats.in_system < 32  # the 32 callers, less those on their way back
    d = law.fitted(10, 0.0, stats, line, MINILM, slots=2)
    assert d is not None and d.code == "saturated"
    # 32 callers over 2 slots (one more coming from below: the window misses the callers
    # on their way back); batches wait 10 % of the SLO to fill; the target is not cut.
    assert math.ceil(stats.in_system / 2) == 16
    assert d.max_batch_size == 17 and d.max_delay_ms == 15.0 and d.gather
    # From above, the cap stops at the split (at most halving per decision).
    above = law.fitted(64, 0.0, stats, line, MINILM, slots=2)
    assert above is not None and above.max_batch_size == 32
    assert law.fitted(32, 15.0, stats, line, MINILM, slots=2, gathering=True).max_batch_size == 16
    assert d.correction == 1.0
    # Without knowing the slots, the same window reads as a violation (the old behaviour).
    blind = law.fitted(10, 0.0, stats, line, MINILM)
    assert blind is not None and blind.code == "violation"
    assert blind.max_batch_size < 10 and blind.correction < 1.0 and not blind.gather


def test_saturated_under_the_slo_the_cap_stays_at_one_batch_per_slot() -> None:
    stats, line = closed_loop((20.0, 40.0))
    assert stats.p99_ms < MINILM.slo_ms and stats.mean_ms > 0.7 * MINILM.slo_ms
    # The target alone would cut the cap to ~5; the requests in the system need 14 a slot.
    d = law.fitted(16, 0.0, stats, line, MINILM, slots=2)
    assert d is not None and d.max_batch_size == math.ceil(stats.in_system / 2)
    assert not d.gather  # no gathering unless saturation cost the SLO...
    kept = law.fitted(16, 15.0, stats, line, MINILM, slots=2, gathering=True)
    assert kept is not None and kept.gather and kept.max_delay_ms == 15.0  # ...but it stays on
    # Busy slots with a mean under the target is not saturation: the tail over the SLO is
    # what smaller batches shorten (the echo soak, 0.95 of its slot busy at ~9 ms a request
    # against a 14 ms target).
    quick, _ = closed_loop((0.0, 10.0))
    assert quick.busy > 1.9 and quick.mean_ms < 0.7 * MINILM.slo_ms
    tail = law.fitted(16, 0.0, quick, line, MINILM, slots=2)
    assert tail is not None and tail.max_batch_size < 11 and not tail.gather
    # Half the slots busy is not saturation either.
    half = law.summarize([law.Observation(10, 5.0, 86.0, i / 11.6) for i in range(58)], 5.0)
    free = law.fitted(16, 0.0, half, line, MINILM, slots=2)
    assert free is not None and free.max_batch_size < 11 and not free.gather
