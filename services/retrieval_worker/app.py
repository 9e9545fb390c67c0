"""Retrieval worker wiring: open collections, follow declarations, apply the ingest stream.

At start every collection under ``<data_dir>/collections/`` opens from its committed state and
its ingest consumer resumes from the manifest's ``last_applied_seq``. Collections declared in
the KV bucket ``infermesh_collections`` (by any worker's CreateCollection) are created here
too, so every retrieval worker holds every collection; the batcher splits each search's
blocks among them. Membership advertises a collection (and its blocks) once caught up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import msgspec
from nats.js.errors import KeyWrongLastSequenceError, NotFoundError
from threadpoolctl import ThreadpoolController

from services.retrieval_worker.blocks import BlockSource, Codec, Tier
from services.retrieval_worker.config import RetrievalConfig
from services.retrieval_worker.gpu_tier import free_device_bytes, hot_source
from services.retrieval_worker.handlers import RetrievalWorkerServicer
from services.retrieval_worker.holdings import Held, Holdings, same_spec, spec_of
from services.retrieval_worker.ingest import IngestApplier
from services.retrieval_worker.tiering import TierAgent, WarmAllowance, physical_ram
from shared.errors import AlreadyExists, InvalidArgument, NotFound
from shared.events import INGEST_STREAM, Member, encode
from shared.ingestlog import (
    COLLECTIONS_BUCKET,
    CollectionDeclared,
    declared_decoder,
    ensure_stream,
    subject_of,
)
from shared.kvview import KVView
from shared.lifecycle import Service
from shared.pb.infermesh.v1 import retrieval_worker_pb2, retrieval_worker_pb2_grpc

log = logging.getLogger(__name__)


def limit_blas(threads: int) -> Any:
    """Pin numpy's OpenBLAS to ``threads`` (the engine's requirement; see search.py).

    Only ``libscipy_openblas`` (numpy's): FAISS's own OpenBLAS is OpenMP-threaded, and a
    limit on it would also cut FAISS's OpenMP threads to one. Returns the limiter to keep.
    """
    if threads <= 0:
        return None
    return ThreadpoolController().select(prefix="libscipy_openblas").limit(limits=threads)


class RetrievalWorker(Service):
    """Holds collections and searches the blocks it owns."""

    name = "retrieval-worker"
    grpc_services = (
        retrieval_worker_pb2.DESCRIPTOR.services_by_name["RetrievalWorker"].full_name,
    )

    def __init__(self, config: RetrievalConfig) -> None:
        super().__init__(config)
        self.cfg = config
        self._blas = limit_blas(config.blas_threads)
        root = Path(config.collections_dir) if config.collections_dir else (
            config.data_path / "collections"
        )
        self.hot = hot_source_of(config)
        self.warm_budget = (config.warm_budget_bytes if config.warm_budget_bytes >= 0
                            else int(config.warm_ram_share * physical_ram()))
        self.hot_budget = 0
        if self.hot is not None:
            self.hot_budget = (config.hot_budget_bytes if config.hot_budget_bytes >= 0
                               else int(config.hot_gpu_share * free_device_bytes()))
        hot = self.hot
        self.holdings = Holdings(
            root, flush_rows=max(config.flush_rows * 2, 1),
            default_tier=WarmAllowance(self.warm_budget),
            sources_for=(lambda spec: {Tier.HOT: hot(spec.metric)}) if hot else None,
            warm_codec=Codec(config.warm_codec),
        )
        self.tier_agent: TierAgent | None = None
        self.servicer = RetrievalWorkerServicer(
            self.holdings,
            config,
            self.instance,
            self.declare,
            self.retract,
            self.draining,
            self.bundle_bytes,
        )
        self.declared: KVView[CollectionDeclared] | None = None
        self._changes: asyncio.Queue[tuple[str, CollectionDeclared | None]] = asyncio.Queue()
        self.appliers: dict[str, IngestApplier] = {}

    def register(self, server: grpc.aio.Server) -> None:
        retrieval_worker_pb2_grpc.add_RetrievalWorkerServicer_to_server(self.servicer, server)

    async def on_start(self) -> None:
        assert self.bus is not None
        opened = await asyncio.to_thread(self.holdings.open_all)
        await ensure_stream(self.bus.js)
        self.declared = KVView(
            self.bus,
            COLLECTIONS_BUCKET,
            declared_decoder,
            on_change=lambda key, value: self._changes.put_nowait((key, value)),
        )
        self.spawn(self.declared.run())
        for held in opened:
            await self._put_declaration(_declaration_of(held), only_if_absent=True)
            self._start_applier(held)
        if self.cfg.tiering:
            self.tier_agent = TierAgent(
                self.bus, self.holdings, self.instance, period_s=self.cfg.access_period_s,
                hot_budget=self.hot_budget, warm_budget=self.warm_budget,
            )

    def loops(self) -> list[Any]:
        return [self._follow] + ([self.tier_agent.run] if self.tier_agent else [])

    async def on_stop(self) -> None:
        await asyncio.to_thread(self.holdings.close)

    # -- membership ---------------------------------------------------------------------

    def targets(self) -> tuple[str, ...]:
        return tuple(self.holdings.ready())

    def member(self) -> Member:
        return msgspec.structs.replace(super().member(), blocks=self.holdings.ready())

    def load(self) -> int:
        return self.servicer.outstanding

    # -- declarations -------------------------------------------------------------------

    def _start_applier(self, held: Held) -> None:
        assert self.bus is not None
        applier = IngestApplier(
            self.bus,
            held,
            fetch=self.cfg.ingest_fetch,
            flush_rows=self.cfg.flush_rows,
            flush_interval_s=self.cfg.flush_interval_s,
        )
        self.appliers[held.spec.name] = applier
        self.spawn(applier.run())

    async def _put_declaration(self, decl: CollectionDeclared, only_if_absent: bool) -> None:
        assert self.bus is not None
        kv = await self.bus.kv(COLLECTIONS_BUCKET)
        try:
            await kv.create(decl.name, encode(decl))
        except KeyWrongLastSequenceError:
            if not only_if_absent:
                raise

    async def _follow(self) -> None:
        """Create and drop collections as other workers declare and retract them."""
        while True:
            name, decl = await self._changes.get()
            held = self.holdings.held.get(name)
            if decl is None:
                if held is not None:
                    log.info("collection %s was dropped in the mesh; deleting it here", name)
                    await asyncio.to_thread(self.holdings.drop, name)
                continue
            if held is not None:
                if not same_spec(held.spec, spec_of(decl)):
                    log.error("collection %s is declared with another spec than the one held "
                              "here; serving the copy held here", name)
                continue
            try:
                held, created = await asyncio.to_thread(self.holdings.create, decl)
            except InvalidArgument as exc:
                # A bad record (written by an older or foreign writer) must not stop the
                # worker that follows it: it stays unserved and says why.
                log.error("collection %s is declared with a bad spec, not created: %s",
                          name, exc.message)
                continue
            if created:
                log.info("created collection %s (dim %d, nlist %d) as declared in the mesh",
                         name, decl.dim, decl.nlist)
                self._start_applier(held)

    async def declare(self, decl: CollectionDeclared) -> Held:
        """CreateCollection: declare in the KV (create-only), then create here."""
        assert self.bus is not None
        # Check the whole spec before the KV write: a declaration other workers cannot open
        # must never reach the bucket they all follow.
        spec_of(decl)
        info = await self.bus.js.stream_info(INGEST_STREAM)
        decl = msgspec.structs.replace(decl, start_seq=int(info.state.last_seq))
        try:
            await self._put_declaration(decl, only_if_absent=False)
        except KeyWrongLastSequenceError:
            kv = await self.bus.kv(COLLECTIONS_BUCKET)
            entry = await kv.get(decl.name)
            existing = declared_decoder.decode(entry.value) if entry.value else None
            if existing is None or not same_spec(spec_of(existing), spec_of(decl)):
                raise AlreadyExists(
                    f"collection {decl.name!r} already exists"
                    + (f" with dim={existing.dim} metric={existing.metric} "
                       f"nlist={existing.nlist}" if existing else "")
                ) from None
            decl = existing
        held, created = await asyncio.to_thread(self.holdings.create, decl)
        if created:
            self._start_applier(held)
        return held

    async def retract(self, name: str) -> None:
        """DropCollection: remove the declaration and the stream history, then drop here."""
        assert self.bus is not None
        kv = await self.bus.kv(COLLECTIONS_BUCKET)
        try:
            entry = await kv.get(name)
        except NotFoundError:
            entry = None
        if (entry is None or not entry.value) and name not in self.holdings.held:
            raise NotFound(f"unknown collection {name!r}")
        await kv.delete(name)
        await self.bus.js.purge_stream(INGEST_STREAM, subject=subject_of(name))
        if name in self.holdings.held:
            with contextlib.suppress(NotFound):
                await asyncio.to_thread(self.holdings.drop, name)


def hot_source_of(config: RetrievalConfig) -> Callable[[str], BlockSource] | None:
    """The hot tier's source per metric, or None: no torch with CUDA means two tiers."""
    if hot_source("ip", allow_cpu=config.hot_on_cpu) is None:
        log.info("no GPU (torch with CUDA) here: blocks are tiered warm/cold only")
        return None
    codec = Codec(config.hot_codec)

    def make(metric: str) -> BlockSource:
        source = hot_source(metric, allow_cpu=config.hot_on_cpu, codec=codec)
        assert source is not None  # checked above; the machine does not lose its GPU
        return source

    return make


def _declaration_of(held: Held) -> CollectionDeclared:
    s = held.spec
    return CollectionDeclared(
        name=s.name, dim=s.dim, metric=s.metric, nlist=s.nlist, dtype=s.dtype,
        lists_per_block=s.lists_per_block, start_seq=0, created_unix=time.time(),
    )
