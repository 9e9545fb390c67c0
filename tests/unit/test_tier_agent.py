"""The worker's tier agent keeps its budget a hard bound, whatever moves arrive (no NATS)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from test_search import mixture

from services.retrieval_worker.blocks import Tier
from services.retrieval_worker.collection import Collection
from services.retrieval_worker.holdings import Held, Holdings
from services.retrieval_worker.manifest import CollectionSpec
from services.retrieval_worker.tiering import TierAgent
from shared.events import TierMove, TierMoved


class FakeBus:
    """Records what the agent publishes."""

    def __init__(self) -> None:
        self.sent: list[Any] = []

    async def publish(self, subject: str, event: Any) -> None:
        self.sent.append(event)


def agent_over(tmp_path: Path, warm_blocks: int) -> tuple[TierAgent, FakeBus, Collection]:
    """An agent whose warm budget holds the ``warm_blocks`` largest blocks; all start cold."""
    spec = CollectionSpec(name="c", dim=24, nlist=8, lists_per_block=1)
    col = Collection.create(tmp_path / "c", spec, default_tier=Tier.COLD)
    x = mixture(2000, 1)
    col.train(x)
    col.upsert(np.arange(2000), x, seq=1)
    col.flush()
    holdings = Holdings(tmp_path, flush_rows=10**9)
    holdings.held["c"] = Held(col)
    budget = sum(sorted(col.block_bytes().values())[-warm_blocks:])
    bus = FakeBus()
    agent = TierAgent(bus, holdings, "w", period_s=1.0, hot_budget=0,  # type: ignore[arg-type]
                      warm_budget=budget)
    return agent, bus, col


def warm_bytes(col: Collection) -> int:
    return sum(n for b, n in col.block_bytes().items() if col.placement()[b] is Tier.WARM)


async def test_a_promotion_over_the_warm_budget_is_refused_until_a_demotion_lands(
    tmp_path: Path,
) -> None:
    agent, bus, col = agent_over(tmp_path, warm_blocks=2)
    # the tiering service planned 0 and 1 warm, then (from a stale picture) 2 as well
    for block in (0, 1, 2):
        await agent.on_move(TierMove(collection="c", block=block, tier="warm"))
    replies: list[TierMoved] = bus.sent
    assert [r.ok for r in replies] == [True, True, False]
    assert "warm budget" in replies[2].error
    assert col.placement()[2] is Tier.COLD
    assert warm_bytes(col) <= agent.warm_budget
    # once a demotion has landed, the same promotion goes through
    await agent.on_move(TierMove(collection="c", block=0, tier="cold"))
    await agent.on_move(TierMove(collection="c", block=2, tier="warm"))
    assert [r.ok for r in replies[3:]] == [True, True]
    assert col.placement()[2] is Tier.WARM
    assert warm_bytes(col) <= agent.warm_budget


async def test_a_move_to_where_a_block_already_is_and_demotions_are_never_refused(
    tmp_path: Path,
) -> None:
    agent, bus, col = agent_over(tmp_path, warm_blocks=1)
    await agent.on_move(TierMove(collection="c", block=3, tier="warm"))
    agent.warm_budget = 0  # e.g. a smaller budget after a restart
    await agent.on_move(TierMove(collection="c", block=3, tier="warm"))
    await agent.on_move(TierMove(collection="c", block=3, tier="cold"))
    assert [r.ok for r in bus.sent] == [True, True, True]
    assert warm_bytes(col) == 0
