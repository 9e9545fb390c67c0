"""The batch controller: observations in, one leader, policies out to every batcher replica.

Every batcher replica runs this loop and keeps windows of ``BatchObserved`` events (so a
replica that takes over has warm windows). One replica at a time is the leader: it holds
the lease ``batch-controller`` in the KV bucket ``infermesh_leases`` and writes each
target's ``BatchPolicy`` to ``infermesh_batch_policy``; every replica, leader included,
applies what that bucket holds (``Batcher._apply_policy``), so all replicas batch alike.

The lease is a KV value ``Lease(holder, expires_unix)`` written with revision checks: a
replica takes it with ``kv.create`` when it is absent, or with ``kv.update(last=revision)``
when it is its own or expired, so two replicas racing for it cannot both win. The holder
renews it every tick and acts only while its own copy is fresh (80% of the TTL, measured on
its monotonic clock), so a leader cut off from NATS stops writing before anyone else can
take over. Expiry compares wall clocks across replicas; NTP-level skew is small next to
the TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Literal

import msgspec
import nats.errors
from nats.js.errors import KeyDeletedError, KeyNotFoundError, KeyWrongLastSequenceError
from opentelemetry import trace

from services.batcher import control_law as law
from shared import metrics
from shared.bus import Bus
from shared.events import (
    BATCH_OBSERVED,
    LEASES_BUCKET,
    POLICY_BUCKET,
    BatchesObserved,
    BatchObserved,
    BatchPolicy,
    Lease,
    ModelSpec,
    batch_observed_decoder,
    encode,
    lease_decoder,
)
from shared.kvview import KVView

log = logging.getLogger(__name__)
tracer = trace.get_tracer("infermesh.batcher")

LEASE_KEY = "batch-controller"
#: What NATS raises while it is unreachable; the controller rides that out and retries.
NATS_DOWN = (nats.errors.Error, TimeoutError, ConnectionError, OSError)

Law = Literal["fitted", "aimd"]


class LeaderLease:
    """A revision-checked lease in a KV bucket; ``tick()`` takes or renews it."""

    def __init__(self, bus: Bus, holder: str, ttl_s: float, key: str = LEASE_KEY) -> None:
        self._bus = bus
        self.holder = holder
        self._ttl = ttl_s
        self._key = key
        self._revision = 0
        self._acquired = 0.0
        self._fresh_until = 0.0  # time.monotonic()

    @property
    def is_leader(self) -> bool:
        """Whether this replica holds a lease renewed recently enough to act on."""
        return time.monotonic() < self._fresh_until

    async def tick(self) -> bool:
        """Take the lease if free or expired, renew it if ours; returns is_leader."""
        kv = await self._bus.kv(LEASES_BUCKET)
        started = time.monotonic()
        now = time.time()
        try:
            entry = await kv.get(self._key)
        except (KeyNotFoundError, KeyDeletedError):  # never taken, or released
            entry = None
        try:
            if entry is None or not entry.value:
                self._acquired = now
                self._revision = await kv.create(self._key, self._value(now))
            else:
                current = lease_decoder.decode(entry.value)
                if current.holder != self.holder and current.expires_unix > now:
                    self._fresh_until = 0.0
                    return False
                if current.holder != self.holder:
                    self._acquired = now
                    log.info("batch controller: taking over the lease from %s", current.holder)
                assert entry.revision is not None
                self._revision = await kv.update(self._key, self._value(now), last=entry.revision)
        except KeyWrongLastSequenceError:  # another replica won the race
            self._fresh_until = 0.0
            return False
        self._fresh_until = started + 0.8 * self._ttl
        return True

    def _value(self, now: float) -> bytes:
        return encode(
            Lease(holder=self.holder, expires_unix=now + self._ttl, acquired_unix=self._acquired)
        )

    async def release(self) -> None:
        """Give the lease up (shutdown) so another replica takes over without waiting."""
        if not self.is_leader or not self._revision:
            return
        self._fresh_until = 0.0
        kv = await self._bus.kv(LEASES_BUCKET)
        with contextlib.suppress(*NATS_DOWN):
            await asyncio.wait_for(kv.delete(self._key, last=self._revision), timeout=1.0)


class BatchController:
    """Keeps each model's p99 latency at the batcher under its SLO by setting its policy."""

    def __init__(
        self,
        bus: Bus,
        instance: str,
        models: KVView[ModelSpec],
        policies: KVView[BatchPolicy],
        *,
        law_name: Law = "fitted",
        interval_s: float = 1.0,
        window_s: float = 5.0,
        lease_s: float = 5.0,
        tuning: law.Tuning | None = None,
        clock: Callable[[], float] = time.monotonic,
        capacity_memory_s: float = 1800.0,
    ) -> None:
        self._bus = bus
        self._clock = clock
        self.instance = instance
        self._models = models
        self._policies = policies
        self.law: Law = law_name
        self._interval = interval_s
        self._window = window_s
        self._tuning = tuning or law.Tuning()
        self.lease = LeaderLease(bus, instance, lease_s)
        # Latency windows restart at each change (older batches ran under another policy);
        # the fit keeps a longer history because the cost curve does not depend on policy.
        self._recent: dict[str, deque[law.Observation]] = {}
        self._history: dict[str, deque[law.Observation]] = {}
        self._changed_at: dict[str, float] = {}
        self._correction: dict[str, float] = {}
        self._refreshed: dict[str, float] = {}
        # What each cap delivered (items/s) while its queue built up, and when: the evidence
        # behind the throughput floor, which binds only while the load comes near it. Kept
        # for capacity_memory_s (long: a cap kept at its floor never overloads, so nothing
        # refreshes the evidence, and forgetting it means re-learning it by a backlog; a
        # floor too high only costs latency in bursts) and replaced when that cap overloads.
        self._delivered: dict[str, dict[int, tuple[float, float]]] = {}
        self._capacity_memory = capacity_memory_s

    async def observe(self, event: BatchObserved | BatchesObserved) -> None:
        """Add worker observations to the target's windows (the subscription callback)."""
        match event:
            case BatchesObserved(batches=batches):
                for one in batches:
                    self.add(one)
            case BatchObserved():
                self.add(event)

    def add(self, event: BatchObserved) -> None:
        """Add one worker observation to the target's windows."""
        obs = law.Observation(
            event.size, event.queue_ms, event.exec_ms, self._clock(), worker=event.worker
        )
        self._recent.setdefault(event.target, deque(maxlen=4096)).append(obs)
        self._history.setdefault(event.target, deque(maxlen=4096)).append(obs)

    async def run(self) -> None:
        """Subscribe to observations and decide once per interval while leader."""
        sub = await self._bus.subscribe(f"{BATCH_OBSERVED}.>", batch_observed_decoder, self.observe)
        try:
            while True:
                try:
                    if await self.lease.tick():
                        await self.tick()
                except NATS_DOWN as exc:
                    # NATS away: batchers keep the last policies; try again next interval.
                    log.debug("batch controller: NATS unavailable (%s)", type(exc).__name__)
                await asyncio.sleep(self._interval)
        finally:
            with contextlib.suppress(*NATS_DOWN):
                await sub.unsubscribe()

    def window(self, target: str) -> list[law.Observation]:
        """Observations of target since its last policy change, within window_s."""
        horizon = self._horizon(target)
        recent = self._recent.get(target, deque())
        while recent and recent[0].at < horizon:
            recent.popleft()
        return list(recent)

    def _horizon(self, target: str) -> float:
        return max(self._clock() - self._window, self._changed_at.get(target, 0.0))

    def _fit_window(self, target: str) -> list[law.Observation]:
        history = self._history.get(target, deque())
        horizon = self._clock() - 6 * self._window
        while history and history[0].at < horizon:
            history.popleft()
        return list(history)

    async def tick(self) -> None:
        """One decision per model (leader only)."""
        with tracer.start_as_current_span(
            "batch_controller.tick", attributes={"infermesh.controller.law": self.law}
        ) as span:
            for target, spec in sorted(self._models.values.items()):
                if not self.lease.is_leader:
                    return
                policy = self.decide(target, spec)
                if policy is not None:
                    await self._write(policy, span)

    def decide(self, target: str, spec: ModelSpec) -> BatchPolicy | None:
        """The policy to write for target now, or None to leave the bucket alone."""
        now = time.time()
        current = self._policies.values.get(target)
        if current is None:
            return BatchPolicy(
                target=target,
                max_batch_size=spec.max_batch_size,
                max_delay_ms=spec.max_delay_ms,
                preferred_sizes=spec.preferred_batch_sizes,
                slo_ms=spec.slo_ms,
                reason="initial: the model spec",
                revision=1,
                updated_unix=now,
                leader=self.instance,
            )
        window = self.window(target)
        stats = law.summarize(window, self._clock() - self._horizon(target))
        occupancy, workers = self.occupancy(target)
        stats = dataclasses.replace(
            stats,
            busy=occupancy.busy,
            in_system=occupancy.in_system,
            mean_ms=occupancy.mean_ms,
        )
        limits = law.Limits(slo_ms=spec.slo_ms, model_max_batch=spec.max_batch_size)
        decision: law.Decision | None
        if current.max_batch_size > spec.max_batch_size:
            decision = law.Decision(
                spec.max_batch_size, current.max_delay_ms, "spec: model max_batch_size lowered"
            )
        elif self.law == "aimd":
            decision = law.aimd(
                current.max_batch_size, current.max_delay_ms, stats, limits, self._tuning
            )
        else:
            line = law.fit(self._fit_window(target))
            decision = law.fitted(
                current.max_batch_size,
                current.max_delay_ms,
                stats,
                line,
                limits,
                self._correction.get(target, 1.0),
                self._tuning,
                floor=self.floor(target, self.load(target), line, spec.max_batch_size),
                # Batches that can run at once: each worker heard from runs `instances`.
                slots=workers * max(1, spec.instances),
                gathering=current.gather,
            )
            if decision is not None:
                self._correction[target] = decision.correction
                if decision.overloaded:
                    self._remember(target, current.max_batch_size, stats.rate)
        p99 = round(stats.p99_ms, 2) if stats.batches else current.p99_ms
        if decision is None or decision.code == "hold":
            # Refresh the p99 that `infermesh status` shows now and then, not every tick.
            if stats.batches and now - self._refreshed.get(target, 0.0) >= 5 * self._interval:
                self._refreshed[target] = now
                return msgspec.structs.replace(
                    current, p99_ms=p99, updated_unix=now, leader=self.instance
                )
            return None
        self._changed_at[target] = self._clock()
        self._refreshed[target] = now
        return BatchPolicy(
            target=target,
            max_batch_size=decision.max_batch_size,
            max_delay_ms=decision.max_delay_ms,
            preferred_sizes=tuple(
                s for s in current.preferred_sizes if s <= decision.max_batch_size
            ),
            slo_ms=spec.slo_ms,
            reason=decision.reason,
            revision=current.revision + 1,
            updated_unix=now,
            p99_ms=p99,
            leader=self.instance,
            gather=decision.gather,
        )

    def load(self, target: str) -> float:
        """Items/s the workers completed for target over the fit's horizon (6·window_s).

        What the throughput floor must carry. Completions are all the controller sees, and
        over a few seconds they are not the load: they dip in a stall on a busy machine, and
        a draining backlog completes faster than requests arrive (taken for load, that burst
        set the floor to the model's limit in a soak). Over half a minute both average out.
        """
        recent, seconds = self._last(target, 6 * self._window)
        return sum(o.size for o in recent) / seconds if recent else 0.0

    def occupancy(self, target: str) -> tuple[law.Stats, int]:
        """The last window_s whatever the policy did meanwhile (batches executing and
        requests in the system at once, mean latency), and how many workers ran them.

        Whether every slot is busy is a property of the load; a window cut at each policy
        change (a second, ~15 MiniLM batches) made it flicker from one tick to the next.
        """
        recent, seconds = self._last(target, self._window)
        return law.summarize(recent, seconds), len({o.worker for o in recent})

    def _last(self, target: str, seconds: float) -> tuple[list[law.Observation], float]:
        """The fit history's observations of the last ``seconds`` and how long that span
        is (shorter before there is that much history; at least one interval)."""
        history = self._history.get(target, deque())
        if not history:
            return [], self._interval
        now = self._clock()
        since = max(now - seconds, history[0].at)
        return [o for o in history if o.at >= since], max(now - since, self._interval)

    def floor(self, target: str, rate: float, line: law.Fit | None, model_max_batch: int) -> int:
        """The smallest cap that carries rate items/s, from the caps seen overloaded."""
        delivered = self._delivered.get(target, {})
        now = self._clock()
        for cap in [c for c, (_, at) in delivered.items() if now - at > self._capacity_memory]:
            del delivered[cap]
        if line is None or not delivered:
            return 1
        return law.throughput_floor(
            {cap: r for cap, (r, _) in delivered.items()},
            rate,
            line,
            model_max_batch,
            self._tuning,
        )

    def _remember(self, target: str, cap: int, rate: float) -> None:
        if rate > 0:
            self._delivered.setdefault(target, {})[cap] = (rate, self._clock())

    async def _write(self, policy: BatchPolicy, span: trace.Span) -> None:
        previous = self._policies.values.get(policy.target)
        kv = await self._bus.kv(POLICY_BUCKET)
        await kv.put(policy.target, encode(policy))
        if previous is not None and previous.revision == policy.revision:
            return  # a p99 refresh, not a change
        code = policy.reason.split(":", 1)[0]
        metrics.POLICY_CHANGES.labels(policy.target, code).inc()
        span.add_event(
            "batch_policy.change",
            {
                "infermesh.target": policy.target,
                "infermesh.batch.max_size": policy.max_batch_size,
                "infermesh.batch.max_delay_ms": policy.max_delay_ms,
                "infermesh.batch.p99_ms": policy.p99_ms,
                "infermesh.batch.slo_ms": policy.slo_ms,
                "infermesh.batch.policy_revision": policy.revision,
                "infermesh.batch.reason": policy.reason,
            },
        )
        log.info(
            "batch policy %s r%d: max batch %d, max delay %.2f ms (%s)",
            policy.target,
            policy.revision,
            policy.max_batch_size,
            policy.max_delay_ms,
            policy.reason,
        )
