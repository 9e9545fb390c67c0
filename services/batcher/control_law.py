"""The batch-sizing control laws: pure functions from a window of observations to a policy.

What the SLO bounds: a request's latency at the batcher, queue wait + batch execution, which
is what a user feels minus the router hop. Workers report each batch (``BatchObserved``) with
the batch's mean queue wait and its execution time, so every request of a batch is counted
as ``queue_ms + exec_ms``, weighted by batch size; the oldest request of a batch waited a
little longer than the mean, and the router hop adds ~1 ms, which is why the laws aim below
the SLO (``Tuning.headroom``).

Two laws, compared in ``bench/batching.py``:

- ``aimd``: Clipper's additive-increase / multiplicative-decrease on the cap, increased
  only while batches actually reach the cap (otherwise the cap would drift to the model's
  maximum at low load and the first burst would form a batch nobody has measured).
- ``fitted`` (the default): fit ``exec_ms ≈ a + b·n`` over recent batches, and choose the
  largest cap n whose worst case under saturation fits the target. With every dispatch slot
  busy a request waits for one running batch to finish and then runs in the next, so the
  worst case is ``delay + 2·exec_p99(n)``. The rest of the budget becomes max_delay (capped
  at 5% of the SLO). The cap never grows past twice the largest batch measured (small
  batches at low load do not shrink it, though: only the target does) and never falls below
  half the current cap in one decision, so each step is judged on its own window. A
  multiplicative correction on the target closes the loop when the model is wrong (p99 over
  SLO while nothing queued longer than the model allows).

  Queueing beyond that model (a request waited longer than the delay plus one running batch)
  is a backlog: arrivals outran the workers for a while. A smaller cap cannot shorten it,
  since smaller batches cost more per item, so a backlog never shrinks the target; when the
  batches are full as well, the cap is too small for the load (``overload``): the law grows
  it (if the fit says larger batches cost less per item: where the cost is all per item, as
  for a one-thread ONNX run, a larger batch adds latency and no throughput, and a closed loop
  that saturates the model would otherwise push the cap to the model's limit), and the
  controller remembers the rate that cap delivered. The cap then never returns
  below the smallest size that carries the current rate with a margin
  (``throughput_floor``): a latency target that only tiny batches meet is not worth a queue
  that grows without bound, which is what happens when a cap cannot carry the load.

  A third case is neither: the execution slots busy ``saturated_share`` of the time or more
  and the mean latency alone past the target (``headroom``·SLO), with no backlog. That is a
  closed loop of N callers holding the model full (or a load at its capacity): latency is
  about N / throughput whatever the cap, and a smaller cap only queues the same requests
  for longer between smaller, dearer batches. (MiniLM at c=32 on two one-thread
  instances: each window read as a violation, the cap went 32 -> 16 -> 8 -> 4 -> 8 -> 13 ->
  17 with no delay, a third of the requests queued behind batches of ~10.) Saturated, the
  cap never goes below the requests in the system split evenly over the slots
  (``ceil(N / slots)``, N by Little's law over the window), and once saturation costs the
  SLO (``saturated``) batches wait up to ``gather_share`` of the SLO to fill, even for an
  idle slot (``Decision.gather``): the callers of a batch that just ended come back one by
  one through the router, ~10 ms from first to last at c=32, and a batch that leaves with
  the first strands the rest for a whole batch more. The price is that wait, during which
  the slot idles where a queue kept it busy; gathering stops when saturation does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Observation:
    """One executed batch as the controller received it."""

    size: int
    queue_ms: float
    exec_ms: float
    at: float  # controller's time.monotonic() on receipt
    worker: str = ""


@dataclass(frozen=True)
class Limits:
    """What the model spec fixes: the SLO and the largest batch the model accepts."""

    slo_ms: float
    model_max_batch: int


@dataclass(frozen=True)
class Tuning:
    """Knobs of both laws (defaults are what the benchmark measured)."""

    headroom: float = 0.7
    """Aim the worst case at this share of the SLO: the rest covers what the workers'
    reports cannot see (the oldest request of a batch waited longer than the mean, the
    router hop, scheduling noise on busy cores)."""
    min_batches: int = 8
    """Observations needed before a decision."""
    aimd_step: int = 2
    """Additive increase per decision (AIMD)."""
    aimd_backoff: float = 0.5
    """Multiplicative decrease on violation (AIMD)."""
    max_delay_share: float = 0.05
    """max_delay never exceeds this share of the SLO (it only adds latency once the cap
    is large enough to keep up), except while saturated (``gather_share``)."""
    saturated_share: float = 0.75
    """Execution slots busy this share of the window, on average, count as saturated (a
    closed loop that gathers its batches keeps them ~85-90 % busy: the rest is the wait)."""
    saturated_exit_share: float = 0.6
    """While gathering, saturation lasts down to this share (hysteresis: a few slow
    gathers must not flip the policy back and forth)."""
    gather_share: float = 0.1
    """max_delay while saturated, as a share of the SLO: long enough for the callers of a
    batch that ended to come back (only a batch that does not fill waits it all)."""
    min_correction: float = 0.3
    max_decrease: float = 0.5
    """One decision keeps at least this share of the cap (as one at most doubles it)."""
    capacity_margin: float = 0.8
    """The throughput floor keeps the load under this share of the capacity it expects."""
    full_share: float = 0.75
    """Batches this close to the cap count as full (multi-row requests leave gaps)."""
    min_batch_gain: float = 0.05
    """Over capacity, a larger cap is worth its latency only if the fit says its items cost
    at least this share less each (a model whose cost is all per item gains nothing)."""


@dataclass(frozen=True)
class Stats:
    """A window of observations, summarized."""

    batches: int
    items: int
    p99_ms: float
    """Per-request latency at the batcher (queue + exec), weighted by batch size."""
    exec_p99_ms: float
    queue_p99_ms: float
    max_size: int
    size_p50: float = 0.0
    """Batch size the median request rode in."""
    rate: float = 0.0
    """Items per second over the window (0 when its length is unknown)."""
    busy: float = 0.0
    """Batches executing at once, on average over the window (0 when its length is
    unknown)."""
    in_system: float = 0.0
    """Requests queued or executing at once, on average (Little's law: each counts its
    queue + exec time; 0 when the window's length is unknown)."""
    mean_ms: float = 0.0
    """Mean latency per request at the batcher (queue + exec)."""


@dataclass(frozen=True)
class Fit:
    """exec_ms ≈ a + b·n, plus the p99 of what the line misses."""

    a: float
    b: float
    resid_p99: float
    max_size: int = 1
    """Largest batch the fit has seen."""

    def exec_p99(self, n: int) -> float:
        return self.a + self.b * n + self.resid_p99

    def per_item(self, n: int) -> float:
        """Exec time per item in a batch of n."""
        return max(self.a, 0.0) / max(n, 1) + max(self.b, 0.0)

    def knee(self, limit: int, gain: float) -> int:
        """Smallest n whose per-item cost is within ``gain`` of the cost at ``limit``: past
        it, larger batches add latency for almost no throughput."""
        a = max(self.a, 0.0)
        if a <= 0:
            return 1
        room = (1.0 + gain) * self.per_item(limit) - max(self.b, 0.0)
        return max(1, min(limit, math.ceil(a / room - 1e-9)))

    def cheaper(self, n: int, m: int, gain: float) -> bool:
        """Whether batches of m cost at least ``gain`` less per item than batches of n."""
        return self.per_item(m) <= (1.0 - gain) * self.per_item(n)

    def largest(self, budget_ms: float, cap: int) -> int:
        """Largest n in [1, cap] with exec_p99(n) <= budget_ms (1 if none fits)."""
        if self.b <= 0:
            return cap
        n = math.floor((budget_ms - self.a - self.resid_p99) / self.b + 1e-9)
        return max(1, min(cap, n))


@dataclass(frozen=True)
class Decision:
    """A policy the law wants, and why ("<code>: <detail>")."""

    max_batch_size: int
    max_delay_ms: float
    reason: str
    correction: float = 1.0
    overloaded: bool = False
    """The queue built up with full batches: the current cap could not carry the load."""
    gather: bool = False
    """Saturated: batches wait their delay to fill even when none is in flight (a "hold"
    keeps the policy as it is, this flag included)."""

    @property
    def code(self) -> str:
        return self.reason.split(":", 1)[0]


def weighted_quantile(values: Sequence[float], weights: Sequence[float], q: float) -> float:
    """The q-quantile of values where each counts weight times (0 for an empty sequence)."""
    if not values:
        return 0.0
    pairs = sorted(zip(values, weights, strict=True))
    total = sum(w for _, w in pairs)
    acc = 0.0
    for value, weight in pairs:
        acc += weight
        if acc >= q * total:
            return value
    return pairs[-1][0]


def summarize(obs: Sequence[Observation], seconds: float = 0.0) -> Stats:
    """p99 per request (a batch of n counts n times), exec and queue p99 per batch.

    ``seconds`` is how long the window is, for the rate; 0 leaves the rate unknown (0).
    """
    if not obs:
        return Stats(0, 0, 0.0, 0.0, 0.0, 0)
    sizes = [float(o.size) for o in obs]
    ones = [1.0] * len(obs)
    items = sum(o.size for o in obs)
    held_ms = sum(o.size * (o.queue_ms + o.exec_ms) for o in obs)  # request-ms held
    return Stats(
        batches=len(obs),
        items=items,
        p99_ms=weighted_quantile([o.queue_ms + o.exec_ms for o in obs], sizes, 0.99),
        exec_p99_ms=weighted_quantile([o.exec_ms for o in obs], ones, 0.99),
        queue_p99_ms=weighted_quantile([o.queue_ms for o in obs], sizes, 0.99),
        max_size=max(o.size for o in obs),
        size_p50=weighted_quantile(sizes, sizes, 0.5),
        rate=items / seconds if seconds > 0 else 0.0,
        busy=sum(o.exec_ms for o in obs) / (1000.0 * seconds) if seconds > 0 else 0.0,
        mean_ms=held_ms / items,
        in_system=held_ms / (1000.0 * seconds) if seconds > 0 else 0.0,
    )


def throughput_floor(
    delivered: Mapping[int, float],
    rate: float,
    line: Fit,
    model_max_batch: int,
    tuning: Tuning = Tuning(),
) -> int:
    """Smallest cap that carries ``rate`` items/s, judged from what overloaded caps delivered.

    ``delivered`` maps a cap k to the items/s it completed while its queue built up: its
    capacity, measured, with every cost of the path in it (RPCs, serialization, the model),
    which the workers' exec times alone do not show. How capacity changes with the cap comes
    from the fit: an item costs ``a/n + b`` at cap n against ``a/k + b`` at cap k, so cap n
    carries ``r·(a/k + b)/(a/n + b)``, of which the floor uses ``capacity_margin``. A cap
    found short anyway overloads, is measured, and raises the floor. 1 without evidence.

    The measurements, each put on the same scale (``r·(a/k + b)``, the model time the path
    completes per second), make one estimate for that extrapolation: their upper median. A
    stall on a busy machine (another tenant, a GC pause) measures a cap far below what it
    carries the rest of the time; the worst measurement, extrapolated alone, once set a
    floor at the knee that held for the rest of a soak. With one or two measurements the
    larger one counts. Where some cap carries the rate, each measurement also bounds the
    floor as it is, with no curve: a cap that delivered less than the rate needs (with the
    margin) is too small, so the floor is above it. The curve is the workers' exec time
    only, and the path's own cost per item (RPCs on busy cores) is not in it; without this
    bound the law went back to a cap just found short, found it short again, and hunted
    between the two for a whole soak.
    """
    if rate <= 0 or not delivered:
        return 1
    needed = rate / tuning.capacity_margin
    a, b = max(line.a, 0.0), max(line.b, 0.0)
    work = sorted(capacity * (a / cap + b) for cap, capacity in delivered.items())
    # The per-item cost a cap may have and still carry the rate with the margin.
    allowed = work[len(work) // 2] / needed
    if allowed <= b:
        # No cap carries it with the margin (or the load is a closed loop saturating the
        # model, which looks the same): the largest batches do best, but past the knee of
        # the cost curve only by a few percent, paid for in latency.
        # (A cap found short says nothing here: every cap is short of such a load.)
        return line.knee(model_max_batch, tuning.min_batch_gain)
    curve = math.ceil(a / (allowed - b) - 1e-9) if a > 0 else 1
    short = max((cap + 1 for cap, capacity in delivered.items() if capacity < needed), default=1)
    return min(max(curve, short), model_max_batch)


def fit(obs: Sequence[Observation]) -> Fit | None:
    """Least-squares exec_ms = a + b·n; with one batch size seen, half fixed, half per item."""
    if not obs:
        return None
    n = len(obs)
    mx = sum(o.size for o in obs) / n
    my = sum(o.exec_ms for o in obs) / n
    sxx = sum((o.size - mx) ** 2 for o in obs)
    if sxx < 1e-9:
        # One size seen: nothing tells fixed from per-item cost. Half and half is a guess
        # that lets the cap grow; the doubling limit and the SLO feedback bound the risk.
        a, b = my / 2, my / 2 / mx
    else:
        b = sum((o.size - mx) * (o.exec_ms - my) for o in obs) / sxx
        a = my - b * mx
        if b <= 0:  # noise on a flat curve: no evidence that size costs anything
            a, b = 0.0, max(my, 1e-3) / max(mx, 1.0)
        a = max(a, 0.0)
    resid = [max(0.0, o.exec_ms - (a + b * o.size)) for o in obs]
    return Fit(
        a=a,
        b=b,
        resid_p99=weighted_quantile(resid, [1.0] * n, 0.99),
        max_size=max(o.size for o in obs),
    )


def aimd(
    max_batch: int, max_delay_ms: float, stats: Stats, limits: Limits, tuning: Tuning = Tuning()
) -> Decision | None:
    """Clipper's AIMD on the cap; None when there is too little evidence or nothing to do."""
    if stats.batches < tuning.min_batches:
        return None
    slo = limits.slo_ms
    if stats.p99_ms > slo:
        new = max(1, math.floor(max_batch * tuning.aimd_backoff))
        delay = round(max_delay_ms * tuning.aimd_backoff, 3)
        if new == max_batch and delay == max_delay_ms:
            return None
        return Decision(new, delay, f"decrease: p99 {stats.p99_ms:.1f} ms > SLO {slo:g} ms")
    binding = stats.max_size >= max_batch
    if stats.p99_ms < slo * tuning.headroom and binding and max_batch < limits.model_max_batch:
        new = min(limits.model_max_batch, max_batch + tuning.aimd_step)
        delay = min(slo * tuning.max_delay_share, max(max_delay_ms, 0.5) + 0.5)
        return Decision(
            new, round(delay, 3), f"increase: p99 {stats.p99_ms:.1f} ms < {tuning.headroom:g}·SLO"
        )
    return None


def fitted(
    max_batch: int,
    max_delay_ms: float,
    stats: Stats,
    line: Fit | None,
    limits: Limits,
    correction: float = 1.0,
    tuning: Tuning = Tuning(),
    floor: int = 1,
    slots: int = 0,
    gathering: bool = False,
) -> Decision | None:
    """Largest cap whose predicted worst case fits the target; None when nothing changes.

    ``floor`` is the smallest cap that carries the load (``throughput_floor``); ``slots``
    how many batches of the target can execute at once (0: unknown, never saturated);
    ``gathering`` whether the current policy gathers (``Decision.gather`` as last written).
    """
    if stats.batches < tuning.min_batches or line is None:
        return None
    slo = limits.slo_ms
    floor = max(1, min(floor, limits.model_max_batch))
    # Loaded, a request waits at most the delay and one running batch. Waiting longer means
    # the queue held more than that: a backlog, which smaller batches would only make worse
    # (they cost more per item), so it is never a reason to shrink the target. With the
    # batches full as well, the cap is what holds throughput back: grow it.
    backlog = stats.queue_p99_ms > max_delay_ms + stats.exec_p99_ms
    overload = backlog and stats.size_p50 >= tuning.full_share * max_batch
    # Saturated: the slots are (nearly) always busy and the mean latency alone is past the
    # target, so what is in the system sets the latency, not the batch size. (A load whose
    # mean is under the target misses the SLO in its tail, which smaller batches shorten.)
    # Once gathering, it takes fewer busy slots to stop (the gather itself idles them a bit).
    share = tuning.saturated_exit_share if gathering else tuning.saturated_share
    saturated = (
        slots > 0
        and stats.busy >= share * slots
        and stats.mean_ms >= slo * tuning.headroom
    )
    balanced = min(math.ceil(stats.in_system / max(slots, 1) - 1e-9), limits.model_max_batch)
    code = "fit"
    if stats.p99_ms > slo and not backlog and saturated:
        # Every slot busy: latency is what the load puts in the system, not the cap.
        code = "saturated"
    elif stats.p99_ms > slo and not backlog:
        # At the floor a smaller target changes nothing now and only delays the recovery.
        if max_batch > floor:
            correction = max(tuning.min_correction, correction * 0.8)
        code = "violation"
    elif stats.p99_ms < 0.6 * slo and correction < 1.0:
        correction = min(1.0, correction * 1.05)
    target = slo * tuning.headroom * correction
    ceiling = min(limits.model_max_batch, 2 * line.max_size)
    # Grow at most to twice the largest batch measured (a bigger size is a guess). The sizes
    # measured are no reason to shrink a cap, only the target is: at low load batches are
    # small whatever the cap, and a cap cut to them would meet the next step in load short
    # of capacity (seen with one batch at a time per worker: a cap of 6 against 300 req/s).
    n = line.largest(target / 2.0, max(ceiling, min(max_batch, limits.model_max_batch)))
    # Down at most by half per decision (each step is judged on a fresh window), and never
    # below what carries the load: a cap that cannot keep up loses the SLO to queueing.
    n = max(n, math.ceil(max_batch * tuning.max_decrease), min(floor, ceiling))
    if saturated and not backlog:
        # The requests in the system go in one batch per slot: fewer per batch only queues
        # the rest behind them, and a larger cap never fills (each batch would wait out its
        # delay; down by at most half a decision, as always). A throughput floor from an
        # earlier overload does not apply: a cap that cannot carry the load shows as a
        # backlog, and the branch below grows it.
        # Little's N counts the requests at the batcher and workers, not those on their way
        # back through the router and client (5-10 % at MiniLM c=32: 29-30 of 32), and a
        # cap one short leaves a request behind each batch, so a cap coming from below
        # takes one more; one from above stops at half (64 -> 32 -> 16), and the hysteresis
        # below keeps a cap within one of the split.
        if balanced > max_batch:
            n = min(balanced + 1, limits.model_max_batch)
        else:
            n = max(balanced, math.ceil(max_batch * tuning.max_decrease))
    elif saturated:
        n = max(n, balanced)
    grown = min(ceiling, 2 * max_batch)
    if overload and line.cheaper(max_batch, grown, tuning.min_batch_gain):
        # Over capacity the SLO is lost to queueing whatever the cap; only throughput can
        # win it back, where larger batches are cheaper per item: never shrink, and grow
        # toward the model's limit (at most doubling, as always).
        n = max(n, grown)
        code = "overload"
    n = min(n, limits.model_max_batch)
    slack = target - 2.0 * line.exec_p99(n)
    delay = round(max(0.0, min(slack, slo * tuning.max_delay_share)), 2)
    if overload or (floor > 1 and n <= floor):
        # The load holds the cap up: batches leave as soon as a slot frees, and in a closed
        # loop the callers of the batch that just ended come back a few ms apart, so the
        # first went alone and the rest waited a whole batch for the next slot (MiniLM at
        # c=32: a fifth of the batches of 1-2). Waiting the delay's share of the SLO for
        # them costs that much latency once and buys full batches.
        delay = round(slo * tuning.max_delay_share, 2)
    # Gather once saturation costs the SLO, and keep gathering while it lasts (the batches
    # it fills are what brought p99 back under).
    gather = saturated and (code == "saturated" or gathering)
    if gather:
        delay = round(slo * tuning.gather_share, 2)
    # Hysteresis: noise in the fit must not rewrite the policy every tick.
    small_n = abs(n - max_batch) < max(1.0, 0.1 * max_batch)
    small_d = abs(delay - max_delay_ms) < max(0.5, 0.2 * max_delay_ms)
    if small_n and small_d:
        return Decision(max_batch, max_delay_ms, "hold", correction, overload)
    detail = (
        f"exec ≈ {line.a:.1f} + {line.b:.2f}·n ms, p99 {stats.p99_ms:.1f} ms, "
        f"target {target:.1f} ms"
    )
    if floor > 1:
        detail += f", floor {floor}"
    if saturated:
        detail += (
            f", saturated: {stats.busy:.2f} of {slots} slots busy, "
            f"{stats.in_system:.1f} in system"
        )
    if code == "fit":
        code = "increase" if n > max_batch else "decrease" if n < max_batch else "delay"
    elif code in ("overload", "saturated") and n == max_batch:
        code = "delay"
    return Decision(n, delay, f"{code}: {detail}", correction, overload, gather)
