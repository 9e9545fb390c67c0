"""The collections this worker holds: opened from disk at start, created and dropped on demand.

A held collection is advertised in membership (and so searched by the batcher) only once its
ingest has caught up with the stream once, so a worker that joins, or restarts and replays,
never answers for data it has not applied yet.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

from services.retrieval_worker.blocks import BlockSource, Codec, Tier
from services.retrieval_worker.collection import Collection, DefaultTier
from services.retrieval_worker.errors import FailedPrecondition, InvalidArgument, NotFound
from services.retrieval_worker.manifest import MANIFEST_NAME, CollectionSpec, load_manifest
from shared.errors import AlreadyExists
from shared.ingestlog import CollectionDeclared

log = logging.getLogger(__name__)

#: Extra tier sources for a collection (the hot tier, which needs the metric), by spec.
SourcesFor = Callable[[CollectionSpec], Mapping[Tier, BlockSource]]


class Held:
    """One collection on this worker and whether its ingest has caught up with the stream."""

    def __init__(self, collection: Collection) -> None:
        self.collection = collection
        self.caught_up = asyncio.Event()
        self.dropped = False

    @property
    def spec(self) -> CollectionSpec:
        return self.collection.spec


def spec_of(decl: CollectionDeclared) -> CollectionSpec:
    """The engine's spec for a declaration (InvalidArgument naming a bad field)."""
    if decl.metric not in ("ip", "l2"):
        raise InvalidArgument(f"metric must be 'ip' or 'l2', got {decl.metric!r}")
    if decl.dtype not in ("float32", "float16"):
        raise InvalidArgument(f"storage dtype must be 'float32' or 'float16', got {decl.dtype!r}")
    return CollectionSpec(
        name=decl.name,
        dim=decl.dim,
        metric=decl.metric,  # type: ignore[arg-type]  # checked above
        nlist=decl.nlist,
        dtype=decl.dtype,  # type: ignore[arg-type]  # checked above
        lists_per_block=decl.lists_per_block,
    )


def same_spec(a: CollectionSpec, b: CollectionSpec) -> bool:
    """Whether two specs describe the same collection (the seed does not matter)."""
    return (a.name, a.dim, a.metric, a.nlist, a.dtype, a.lists_per_block) == (
        b.name, b.dim, b.metric, b.nlist, b.dtype, b.lists_per_block,
    )


class Holdings:
    """Collections under ``root``, by name."""

    def __init__(
        self,
        root: Path,
        flush_rows: int,
        *,
        default_tier: DefaultTier = Tier.WARM,
        sources_for: SourcesFor | None = None,
        warm_codec: Codec = Codec.NONE,
    ) -> None:
        self.root = root
        self._warm_codec = warm_codec
        self._flush_rows = flush_rows
        self._default_tier = default_tier
        self._sources_for = sources_for or (lambda spec: {})
        self.held: dict[str, Held] = {}
        self._lock = threading.Lock()  # create/drop run in threads, from RPCs and the KV

    def open_all(self) -> list[Held]:
        """Open every collection under root (after a crash too: each opens its committed state)."""
        self.root.mkdir(parents=True, exist_ok=True)
        opened = []
        for d in sorted(self.root.iterdir()):
            if (d / MANIFEST_NAME).exists():
                spec = load_manifest(d).spec
                col = Collection.open(d, flush_rows=self._flush_rows,
                                      default_tier=self._default_tier,
                                      sources=self._sources_for(spec),
                                      warm_codec=self._warm_codec)
                held = self.held[col.spec.name] = Held(col)
                opened.append(held)
                log.info("opened collection %s (%d vectors, applied through seq %d)",
                         col.spec.name, col.describe().count, col.last_applied_seq)
        return opened

    def get(self, name: str) -> Held:
        """A held collection; NotFound naming the ones held here."""
        held = self.held.get(name)
        if held is None:
            known = ", ".join(sorted(self.held)) or "none"
            raise NotFound(f"unknown collection {name!r} (held here: {known})")
        return held

    def create(self, decl: CollectionDeclared) -> tuple[Held, bool]:
        """Create the declared collection; (held, created). Same spec again is a no-op."""
        with self._lock:
            return self._create(decl)

    def _create(self, decl: CollectionDeclared) -> tuple[Held, bool]:
        spec = spec_of(decl)
        existing = self.held.get(decl.name)
        if existing is not None:
            if not same_spec(existing.spec, spec):
                raise AlreadyExists(
                    f"collection {decl.name!r} exists with dim={existing.spec.dim} "
                    f"metric={existing.spec.metric} nlist={existing.spec.nlist}"
                )
            return existing, False
        root = self.root / decl.name
        if root.exists() and not (root / MANIFEST_NAME).exists():
            shutil.rmtree(root)  # a create that crashed before its manifest: nothing committed
        col = Collection.create(root, spec, flush_rows=self._flush_rows,
                                default_tier=self._default_tier,
                                sources=self._sources_for(spec),
                                warm_codec=self._warm_codec)
        if decl.start_seq:
            # History before the declaration belongs to a dropped namesake: start after it.
            col.flush(seq=decl.start_seq)
        held = self.held[decl.name] = Held(col)
        return held, True

    def drop(self, name: str) -> Held:
        """Delete a collection's files; NotFound if not held."""
        with self._lock:
            held = self.get(name)
            del self.held[name]
            held.dropped = True
        held.collection.drop()
        return held

    def close(self) -> None:
        """Close every collection (pending unflushed ingest is replayed from the stream later)."""
        for held in self.held.values():
            try:
                held.collection.close()
            except FailedPrecondition:
                pass

    def ready(self) -> dict[str, tuple[int, ...]]:
        """Caught-up collections and the blocks this worker searches for each."""
        return {
            name: tuple(range(h.spec.nblocks))
            for name, h in sorted(self.held.items())
            if h.caught_up.is_set()
        }
