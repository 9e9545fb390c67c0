"""The batch controller in closed loop with a simulated mesh (simulated clock, no network).

The control laws are tested one decision at a time in test_control_law.py; what went wrong
in the soak (issue 9) only shows in closed loop: a decision changes the load the next window
sees. Here the controller's own code (windows, fit history, correction, throughput floor)
drives a small discrete-event model of the data path, on a simulated clock:

- requests arrive as a Poisson stream and each costs CPU before it is queued (the router
  and the batcher's Submit), on two cores that the batch dispatches share;
- the queue follows TargetQueue's rules (a batch goes at once when nothing is in flight,
  unless the policy says gather, else when full or when its oldest request waited
  max_delay, and only into a free slot; gathering, a freed slot waits for its even share
  of the callers, those returning, running and queued, for at most max_delay from when it
  came free);
- each batch costs CPU to dispatch (the Execute RPC), then runs a + b·n ms on the worker,
  which reports size, mean queue wait and exec time, as BatchObserved does: the controller
  never sees the CPU costs, only what they do to the queue.

With the echo model of bench/soak.py (2 + 0.2 ms per item plus the thread hop, SLO 20 ms)
and per-request costs that put capacity near 1 000 req/s, cap 1 carries only ~430 req/s.
"""

from __future__ import annotations

import heapq
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from services.batcher import control_law as law
from services.batcher.controller import BatchController
from services.batcher.queue import even_share
from shared.events import BatchObserved, BatchPolicy, ModelSpec

SLO_MS = 20.0


@dataclass
class View:
    """What the controller reads from a KVView: a dict of values."""

    values: dict[str, object] = field(default_factory=dict)


@dataclass
class Trace:
    """What one simulated run did."""

    done_at: np.ndarray  # s
    batcher_ms: np.ndarray  # queue wait + exec: what the SLO bounds
    ticks: list[tuple[float, int, int]]  # (s, cap after the decision, queue depth)
    shed: int

    def caps_after(self, t: float) -> list[int]:
        return [cap for at, cap, _ in self.ticks if at >= t]

    def depth_after(self, t: float) -> int:
        return max(depth for at, _, depth in self.ticks if at >= t)

    def p99_windows(self, start: float, end: float, width: float = 5.0) -> list[float]:
        """p99 of the batcher latency per window of `width` seconds."""
        out = []
        for lo in np.arange(start, end, width):
            inside = self.batcher_ms[(self.done_at >= lo) & (self.done_at < lo + width)]
            out.append(float(np.percentile(inside, 99)))
        return out


@dataclass
class Mesh:
    """A target behind a CPU-bound path: see the module docstring."""

    a_ms: float = 2.8
    b_ms: float = 0.3
    request_cpu_ms: float = 1.6
    dispatch_cpu_ms: float = 1.5
    cores: int = 2
    slots: int = 2
    model_max_batch: int = 64
    capacity: int = 1024
    stalls_per_s: float = 0.0
    """CPU taken by other work on the machine: jobs of ~15 ms, Poisson."""
    seed: int = 1
    slo_ms: float = SLO_MS
    callers: int = 0
    """A closed loop of this many callers instead of Poisson arrivals (rate unused): each
    sends again once answered, the i-th answer of a batch ``return_ms``·i later (the router
    and the client answer a batch's requests one after the other)."""
    return_ms: float = 0.6
    tuning: law.Tuning | None = None

    def run(self, rate: Callable[[float], float], seconds: float) -> Trace:
        rng = random.Random(self.seed)
        now = [0.0]  # ms
        spec = ModelSpec(
            name="m",
            backend="echo",
            max_batch_size=self.model_max_batch,
            max_delay_ms=1.0,
            slo_ms=self.slo_ms,
            instances=self.slots,
        )
        policies: View = View()
        controller = BatchController(
            None,  # type: ignore[arg-type]  # the bus is used only by run() and the lease
            "sim",
            View({"m": spec}),  # type: ignore[arg-type]
            policies,  # type: ignore[arg-type]
            clock=lambda: now[0] / 1000.0,
            tuning=self.tuning,
        )
        controller.lease._fresh_until = float("inf")  # the only replica: always the leader
        cap, delay, gather = self.model_max_batch, 1.0, False
        queue: deque[tuple[float, float]] = deque()  # (arrived, queued) ms
        freed: deque[tuple[float, int]] = deque()  # (when, rows) of each batch that ended
        cpu_waiting: deque[tuple[float, str, Any]] = deque()
        events: list[tuple[float, int, str, Any]] = []
        seq = 0
        busy_cores = inflight = inflight_rows = shed = 0
        timer: float | None = None
        done_at: list[float] = []
        batcher_ms: list[float] = []
        ticks: list[tuple[float, int, int]] = []

        def at(t: float, kind: str, data: Any = None) -> None:
            nonlocal seq
            seq += 1
            heapq.heappush(events, (t, seq, kind, data))

        def on_cpu(cost: float, kind: str, data: Any) -> None:
            nonlocal busy_cores
            if busy_cores < self.cores:
                busy_cores += 1
                at(now[0] + cost, kind, data)
            else:
                cpu_waiting.append((cost, kind, data))

        def cpu_done() -> None:
            nonlocal busy_cores
            busy_cores -= 1
            if cpu_waiting:
                cost, kind, data = cpu_waiting.popleft()
                busy_cores += 1
                at(now[0] + cost, kind, data)

        def form() -> None:
            nonlocal inflight, inflight_rows, timer
            t = now[0]
            while queue and inflight < self.slots:
                if not gather:
                    freed.clear()
                if gather and freed:
                    at_free = freed[0][0]
                    behind = sum(1 for _, queued in queue if queued < at_free)
                    callers = sum(rows for _, rows in freed) + inflight_rows + behind
                    want = even_share(callers, self.slots, self.model_max_batch)
                    due = max(at_free, queue[0][1]) + delay
                else:
                    want = cap
                    due = queue[0][1] + delay
                if (inflight or gather) and len(queue) < want and t < due:
                    if timer is None or timer > due:
                        timer = due
                        at(due, "timer")
                    return
                if gather and freed:
                    freed.popleft()
                batch = [queue.popleft() for _ in range(min(want, len(queue)))]
                inflight += 1
                inflight_rows += len(batch)
                on_cpu(self.dispatch_cpu_ms, "dispatched", (batch, t))

        if self.callers:
            for _ in range(self.callers):
                at(rng.uniform(0.0, 50.0), "arrival")
        else:
            at(rng.expovariate(rate(0.0) / 1000.0), "arrival")
        at(1000.0, "tick")
        if self.stalls_per_s:
            at(rng.expovariate(self.stalls_per_s / 1000.0), "stall")
        while events:
            t, _, kind, data = heapq.heappop(events)
            if t > seconds * 1000.0:
                break
            now[0] = t
            if kind == "arrival":
                on_cpu(self.request_cpu_ms * rng.uniform(0.8, 1.2), "queued", t)
                if not self.callers:
                    at(t + rng.expovariate(rate(t / 1000.0) / 1000.0), "arrival")
            elif kind == "queued":
                cpu_done()
                if len(queue) >= self.capacity:
                    shed += 1
                else:
                    queue.append((data, t))
                    form()
            elif kind == "timer":
                timer = None
                form()
            elif kind == "dispatched":
                cpu_done()
                batch, formed = data
                exec_ms = (self.a_ms + self.b_ms * len(batch)) * rng.uniform(0.85, 1.15)
                at(t + exec_ms, "executed", (batch, formed, exec_ms))
            elif kind == "executed":
                batch, formed, exec_ms = data
                inflight -= 1
                inflight_rows -= len(batch)
                freed.append((t, len(batch)))
                waits = [formed - queued for _, queued in batch]
                controller.add(
                    BatchObserved(
                        target="m",
                        size=len(batch),
                        queue_ms=sum(waits) / len(batch),
                        exec_ms=exec_ms,
                        worker="w",
                    )
                )
                for i, (_, queued) in enumerate(batch):
                    done_at.append(t / 1000.0)
                    batcher_ms.append(t - queued)
                    if self.callers:
                        at(t + self.return_ms * (i + rng.uniform(0.5, 1.5)), "arrival")
                form()
            elif kind == "stall":
                on_cpu(15.0 * rng.uniform(0.5, 1.5), "stalled", None)
                at(t + rng.expovariate(self.stalls_per_s / 1000.0), "stall")
            elif kind == "stalled":
                cpu_done()
            elif kind == "tick":
                policy = controller.decide("m", spec)
                if policy is not None:
                    assert isinstance(policy, BatchPolicy)
                    policies.values["m"] = policy
                    cap, delay, gather = policy.max_batch_size, policy.max_delay_ms, policy.gather
                ticks.append((t / 1000.0, cap, len(queue)))
                at(t + 1000.0, "tick")
        return Trace(np.array(done_at), np.array(batcher_ms), ticks, shed)


def burst_then(rate: float, burst: float, until: float) -> Callable[[float], float]:
    """`burst` req/s until `until` s (the soak's capacity ramp), then `rate` (the soak)."""
    return lambda t: burst if t < until else rate


def test_cap_one_cannot_carry_the_soak_load_in_this_model() -> None:
    # The premise of the tests below: the smallest batches lose throughput here, so a
    # controller that picks them builds a backlog (the issue-9 soak).
    trace = Mesh(model_max_batch=1).run(lambda t: 727.0, 20.0)
    assert trace.depth_after(10.0) > 500


def test_after_a_burst_over_capacity_the_soak_load_settles_within_seconds() -> None:
    for seed in (1, 2, 3):
        trace = Mesh(seed=seed).run(burst_then(727.0, 1100.0, 15.0), 60.0)
        # Ten seconds after the burst the queue holds no backlog and nothing is shed...
        assert trace.depth_after(25.0) <= 64, seed
        # ...and every 5-s window of the rest keeps the batcher's p99 near the SLO (the law
        # aims at 0.7·SLO from what workers report; the CPU wait before a dispatch, which
        # no report shows, comes on top). Before the fix: 0.5 s, from a cap of 1.
        assert max(trace.p99_windows(25.0, 60.0)) <= 1.5 * SLO_MS, seed
        assert min(trace.caps_after(25.0)) >= 4, seed


def test_on_a_busy_machine_the_cap_stays_where_it_carries_the_load() -> None:
    # Other work takes CPU at random: some windows break the SLO whatever the cap. A smaller
    # cap then only costs throughput, so the cap must not collapse and no backlog may build.
    for seed in (1, 2, 3):
        trace = Mesh(seed=seed, stalls_per_s=10.0).run(burst_then(727.0, 1100.0, 15.0), 60.0)
        assert trace.depth_after(25.0) <= 128, seed
        assert min(trace.caps_after(25.0)) >= 2, seed
        assert max(trace.p99_windows(25.0, 60.0)) <= 3 * SLO_MS, seed


def test_what_an_overloaded_cap_delivered_still_bounds_the_cap_ten_minutes_later() -> None:
    # A cap held at its floor never overloads again, so nothing refreshes the evidence; if
    # it were forgotten within a soak, the cap would walk down and rebuild the backlog.
    now = [0.0]
    spec = ModelSpec(name="m", backend="echo", max_batch_size=64, slo_ms=SLO_MS)
    policies = View({"m": BatchPolicy(target="m", max_batch_size=2, max_delay_ms=0.0)})
    controller = BatchController(
        None,  # type: ignore[arg-type]
        "sim",
        View({"m": spec}),  # type: ignore[arg-type]
        policies,  # type: ignore[arg-type]
        clock=lambda: now[0],
    )

    def second_of(size: int, per_s: int, queue_ms: float) -> None:
        for _ in range(per_s // size):
            now[0] += size / per_s
            controller.add(
                BatchObserved(
                    target="m", size=size, queue_ms=queue_ms, exec_ms=2.8 + 0.3 * size, worker="w"
                )
            )

    second_of(2, 600, 300.0)  # cap 2, full batches, a queue far longer than one batch
    overload = controller.decide("m", spec)
    assert overload is not None and overload.reason.startswith("overload")
    for _ in range(600):  # ten minutes at 700/s in batches of 8, no backlog
        second_of(8, 700, 1.0)
    line = law.Fit(a=2.8, b=0.3, resid_p99=0.0)
    assert controller.load("m") > 650
    # Never back to the cap that could not carry 600/s.
    assert controller.floor("m", controller.load("m"), line, 64) > 2


def test_the_load_the_floor_carries_ignores_a_stall_and_a_draining_backlog() -> None:
    # Completions are not arrivals over a few seconds: a 3-s stall completes nothing, and the
    # backlog it left then completes at twice the rate. Neither is a change of load.
    now = [0.0]
    controller = BatchController(
        None,  # type: ignore[arg-type]
        "sim",
        View(),  # type: ignore[arg-type]
        View(),  # type: ignore[arg-type]
        clock=lambda: now[0],
    )

    def seconds_at(per_s: int, seconds: int) -> None:
        for _ in range(seconds * per_s // 5):
            now[0] += 5 / per_s
            controller.add(BatchObserved(target="m", size=5, queue_ms=1.0, exec_ms=4.0, worker="w"))

    seconds_at(700, 25)
    now[0] += 3.0  # the stall
    assert 550 < controller.load("m") < 750
    seconds_at(1400, 2)  # the backlog draining, at twice the arrival rate
    assert 600 < controller.load("m") < 800


def test_a_closed_loop_that_saturates_the_model_gets_one_full_batch_per_slot() -> None:
    # MiniLM at c=32 on two one-thread instances: exec ≈ 6 + 8·n ms, SLO 150 ms. Every
    # request is in the system all the time, so latency is 32 / throughput (~135 ms) with a
    # spread that only the batching adds, and p99 over the SLO is no reason to cut the cap:
    # a smaller one queues a third of the callers behind batches of ~10 (what the mesh did
    # before: cap 40 -> 20 -> 10 -> 6, p99 189-195 ms).
    minilm: dict[str, Any] = dict(
        a_ms=6.0, b_ms=8.0, request_cpu_ms=0.3, dispatch_cpu_ms=0.3, slo_ms=150.0, callers=32
    )
    never = law.Tuning(saturated_share=float("inf"))  # the law without the saturated case
    for seed in (1, 2, 3):
        trace = Mesh(seed=seed, **minilm).run(lambda t: 0.0, 40.0)
        before = Mesh(seed=seed, tuning=never, **minilm).run(lambda t: 0.0, 40.0)
        assert set(trace.caps_after(15.0)) == {16}, seed
        assert max(before.caps_after(15.0)) < 16, seed  # the premise: it used to cut the cap
        late = trace.done_at >= 15.0
        p99 = float(np.percentile(trace.batcher_ms[late], 99))
        p99_before = float(np.percentile(before.batcher_ms[before.done_at >= 15.0], 99))
        assert p99 < 0.93 * p99_before, (seed, p99, p99_before)
        # The price: each slot idles while its batch gathers (~10 ms of every ~140), where a
        # queue kept it busy. Here 5 % fewer answers over the same 25 s.
        assert late.sum() >= 0.93 * (before.done_at >= 15.0).sum(), seed
