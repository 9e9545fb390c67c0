"""Reading a JetStream KV bucket whole, against a real nats-server.

nats-py's watcher can mark its replay complete before entries still in flight were handled
(nats-io/nats.py#842): ``kv.keys()`` then answers NoKeysError for a full bucket (a few reads
in a hundred on an idle machine), and a KVView would call itself ready on a partial copy. A
restarted tiering service that read its placement that way started from revision 0 (CI run
of 06b4af7). These tests read many times over, so a reader with that race fails them.
"""

from __future__ import annotations

import asyncio

from shared.bus import Bus
from shared.events import BlockPlaced, block_placed_decoder, encode
from shared.kvview import KVView

READS = 1500


def placed(block: int) -> BlockPlaced:
    return BlockPlaced(
        collection="c", block=block, worker="w", tier="warm", frequency=1.0, revision=block + 1
    )


async def fill(bus: Bus, bucket: str, n: int) -> None:
    kv = await bus.kv(bucket)
    for block in range(n):
        await kv.put(f"w.c.{block}", encode(placed(block)))


async def test_kv_items_reads_every_live_key_every_time(nats_server) -> None:
    bus = await Bus.connect(nats_server.url, name="reader")
    try:
        await fill(bus, "reads", 5)
        kv = await bus.kv("reads")
        await kv.delete("w.c.1")
        await kv.purge("w.c.3")
        want = {f"w.c.{b}": encode(placed(b)) for b in (0, 2, 4)}
        for _ in range(READS):
            assert await bus.kv_items("reads") == want
        # a missing bucket reads empty without creating it
        assert await bus.kv_items("absent", create=False) == {}
        assert await bus.kv_items("absent", create=False) == {}
    finally:
        await bus.close()


async def test_kv_items_reads_an_empty_bucket_as_empty(nats_server) -> None:
    bus = await Bus.connect(nats_server.url, name="reader")
    try:
        assert await bus.kv_items("empty") == {}
        await fill(bus, "empty", 1)
        await (await bus.kv("empty")).delete("w.c.0")
        assert await bus.kv_items("empty") == {}
    finally:
        await bus.close()


async def test_a_view_is_ready_only_with_the_whole_bucket(nats_server) -> None:
    bus = await Bus.connect(nats_server.url, name="viewer")
    try:
        await fill(bus, "view", 3)
        for _ in range(READS // 4):  # ~375 watches
            view: KVView[BlockPlaced] = KVView(bus, "view", block_placed_decoder)
            task = asyncio.ensure_future(view.run())
            try:
                await asyncio.wait_for(view.ready.wait(), 10)
                assert sorted(view.values) == ["w.c.0", "w.c.1", "w.c.2"]
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        # an empty bucket is ready at once, and later writes still arrive
        empty: KVView[BlockPlaced] = KVView(bus, "view-empty", block_placed_decoder)
        task = asyncio.ensure_future(empty.run())
        try:
            await asyncio.wait_for(empty.ready.wait(), 10)
            assert empty.values == {}
            await empty.put("w.c.7", placed(7))
            await empty.wait_for(lambda: "w.c.7" in empty.values, 10)
            assert empty.values["w.c.7"].revision == 8
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    finally:
        await bus.close()
