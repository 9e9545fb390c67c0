"""The lifecycle every service shares: start, serve, and the one shutdown order.

Start: connect NATS (retrying with backoff) -> build the gRPC server -> service hooks ->
SERVING -> heartbeat. Stop (signal or a crashed loop): NOT_SERVING -> leave membership ->
``server.stop(grace)`` -> service hooks -> NATS drain -> telemetry flush. Long-lived loops run
in one TaskGroup; a loop that fails stops the service with a non-zero exit.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any

import grpc
import uvloop
from grpc_health.v1 import health

from shared import heap, metrics, rpc, streams, telemetry
from shared.bus import Bus, NatsAuth
from shared.config import CommonConfig
from shared.events import Member
from shared.membership import Heartbeat, MemberView

log = logging.getLogger(__name__)


class Service:
    """Base of the five services: owns the bus, the gRPC server, health and heartbeat."""

    #: Name in membership and metrics ("router", "batcher", "inference-worker", ...).
    name: str = ""
    #: Full names of the gRPC services registered (for reflection).
    grpc_services: tuple[str, ...] = ()

    def __init__(self, config: CommonConfig) -> None:
        self.config = config
        self.instance = config.instance or f"{socket.gethostname()}-{os.getpid()}-{id(self):x}"
        self.bus: Bus | None = None
        self.server: grpc.aio.Server | None = None
        self.port = 0
        self.health: health.aio.HealthServicer | None = None
        self.transport = rpc.Transport.from_files(
            config.max_message_bytes,
            config.tracing_enabled(),
            config.tls_ca,
            config.tls_cert,
            config.tls_key,
            config.tls_client_auth,
            config.tls_server_name,
        )
        #: Channels to peers (one per endpoint), with this process's TLS and options.
        self.channels = rpc.Channels(self.transport)
        #: Answers a data-path stream server packs into one message at most.
        self.bundle_bytes = streams.bundle_budget(config.max_message_bytes)
        self._health_server: grpc.aio.Server | None = None
        self.members: MemberView | None = None
        self._heartbeat: Heartbeat | None = None
        self._started = time.time()
        self._serving = False
        self._tasks: asyncio.TaskGroup | None = None
        self._stopping = asyncio.Event()
        #: Set when the drain starts: stream handlers stop taking new messages (streams.py).
        self.draining = asyncio.Event()
        self._stopped = False
        self._drained = False
        self._early: list[Coroutine[Any, Any, None]] = []

    # -- hooks for subclasses -------------------------------------------------------------

    def register(self, server: grpc.aio.Server) -> None:
        """Add this service's servicers to the server."""

    async def on_start(self) -> None:
        """Prepare state that needs the bus (before SERVING)."""

    def loops(self) -> list[Callable[[], Coroutine[Any, Any, None]]]:
        """Long-lived loops to run until shutdown (besides heartbeat and membership)."""
        return []

    async def on_stop(self) -> None:
        """Release what on_start acquired (after the server stopped taking work)."""

    def targets(self) -> tuple[str, ...]:
        """Models or collections this instance serves (membership)."""
        return ()

    def load(self) -> int:
        """Outstanding work now (membership; least-loaded routing)."""
        return 0

    def watches_members(self) -> bool:
        """Whether this service needs the live member view."""
        return False

    # -- lifecycle ----------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return self.config.advertised(self.port)

    def member(self) -> Member:
        """This instance's membership record now."""
        return Member(
            service=self.name,
            instance=self.instance,
            endpoint=self.endpoint,
            health="SERVING" if self._serving else "NOT_SERVING",
            load=self.load(),
            targets=self.targets(),
            metrics_port=self.config.metrics_port,
            started_unix=self._started,
            heartbeat_unix=time.time(),
        )

    async def start(self) -> None:
        """Connect, bind, run the start hooks and report SERVING."""
        cfg = self.config
        self.bus = await Bus.connect(
            cfg.nats_url, name=f"{self.name}-{self.instance}", auth=NatsAuth.from_config(cfg)
        )
        if self.watches_members():
            self.members = MemberView(self.bus, cfg.member_ttl_s)
        self.server, self.port, self.health = rpc.create_server(
            self.name,
            cfg.grpc_host,
            cfg.grpc_port,
            [self.register],
            self.grpc_services,
            transport=self.transport,
        )
        await self.on_start()
        await self.server.start()
        if cfg.health_port and self.transport.tls:
            self._health_server, _ = await rpc.health_only_server(
                cfg.grpc_host, cfg.health_port, self.health
            )
        self._heartbeat = Heartbeat(self.bus, self.member, cfg.heartbeat_s, cfg.member_ttl_s)
        self._serving = True
        await rpc.set_serving(self.health, True)
        await self._heartbeat.beat()
        log.info("%s serving on %s", self.name, self.endpoint)

    async def run(self) -> None:
        """Run loops until stop() or a loop fails; then shut down in order."""
        try:
            async with asyncio.TaskGroup() as tg:
                self._tasks = tg
                assert self._heartbeat is not None
                tg.create_task(self._heartbeat.run(), name="heartbeat")
                if self.members is not None:
                    tg.create_task(self.members.run(), name="members")
                for loop in self.loops():
                    tg.create_task(loop(), name=loop.__name__)
                for coro in self._early:
                    tg.create_task(coro)
                self._early.clear()
                tg.create_task(self._wait_stop(), name="stop")
        except* _Stop:
            pass
        finally:
            await self.shutdown()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a loop started after start-up (e.g. a new target's queue) with the others."""
        if self._tasks is None:
            self._early.append(coro)
        else:
            self._tasks.create_task(coro)

    async def _wait_stop(self) -> None:
        await self._stopping.wait()
        # Drain while the loops still run: requests already accepted are queued, batched and
        # dispatched by those loops, and the member views stay live. Ending the TaskGroup
        # first would cancel them and strand every accepted request until the grace ran out.
        await self._drain()
        raise _Stop

    def stop(self) -> None:
        """Ask the service to shut down (signal handlers call this)."""
        self._stopping.set()

    async def _drain(self) -> None:
        """NOT_SERVING, leave membership, server.stop(grace): in-flight RPCs finish; idempotent."""
        if self._drained:
            return
        self._drained = True
        self._serving = False
        self.draining.set()
        if self.health is not None:
            await self.health.enter_graceful_shutdown()
        if self._heartbeat is not None:
            self._heartbeat.stop()  # a later beat would put the record back
            await self._heartbeat.leave()
        if self.server is not None:
            await self.server.stop(self.config.grace_s)

    async def shutdown(self) -> None:
        """Drain, then hooks, NATS drain, flush; idempotent."""
        if self._stopped:
            return
        self._stopped = True
        await self._drain()
        await self.on_stop()
        await self.channels.close()
        if self._health_server is not None:
            await self._health_server.stop(0)
        if self.bus is not None:
            await self.bus.close()
        telemetry.flush()
        log.info("%s stopped", self.name)


class _Stop(Exception):
    """Raised inside the TaskGroup to end it when stop() is called."""


def main(service_factory: Callable[[], Service], name: str, level: str = "INFO") -> None:
    """Process entry point: logging, tracing, metrics, signals, run; exit non-zero on failure."""
    telemetry.setup_logging(name, level)
    heap.keep_large_buffers()

    async def amain() -> None:
        service = service_factory()
        if service.config.tracing_enabled():
            # Off, the API's no-op tracer stays: an SDK provider with nowhere to export
            # still builds every span (measured: ~15-20 % of a worker's data-path CPU).
            telemetry.setup_tracing(name)
        metrics.serve(service.config.metrics_port)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, service.stop)
        await service.start()
        heap.freeze_startup_objects()
        await service.run()

    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(amain())
    except KeyboardInterrupt:
        pass
    except BaseExceptionGroup as group:
        for exc in _leaves(group):
            log.error("%s failed: %s: %s", name, type(exc).__name__, exc)
        raise SystemExit(1) from None
    except Exception as exc:
        log.error("%s failed: %s: %s", name, type(exc).__name__, exc)
        raise SystemExit(1) from None


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out
