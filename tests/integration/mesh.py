"""Services run in-process on port 0 against a real nats-server (integration tests)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from services.batcher.app import Batcher
from services.batcher.config import BatcherConfig
from services.inference_worker.app import InferenceWorker
from services.inference_worker.config import WorkerConfig
from services.retrieval_worker.app import RetrievalWorker
from services.retrieval_worker.config import RetrievalConfig
from services.router.app import Router
from services.router.config import RouterConfig
from services.tiering.app import Tiering
from services.tiering.config import TieringConfig
from shared.client import AsyncClient
from shared.config import from_env
from shared.errors import RPCError
from shared.lifecycle import Service

ROOT = Path(__file__).resolve().parents[2]


def common(nats_url: str, tmp: Path, **extra: Any) -> dict[str, str]:
    env = {
        "INFERMESH_NATS_URL": nats_url,
        "INFERMESH_GRPC_PORT": "0",
        "INFERMESH_METRICS_PORT": "0",
        "INFERMESH_DATA_DIR": str(tmp),
        "INFERMESH_HEARTBEAT_S": "0.2",
        "INFERMESH_MEMBER_TTL_S": "2",
        "INFERMESH_GRACE_S": "1",
        "INFERMESH_MODEL_REPOSITORY": str(ROOT / "models"),
        "INFERMESH_MODELS": "echo",
    }
    env.update({f"INFERMESH_{k.upper()}": str(v) for k, v in extra.items()})
    return env


async def serves_echo(client: AsyncClient) -> bool:
    """Whether the mesh answers an echo request now (the router has seen model and batcher)."""
    try:
        await client.infer("echo", texts=["ready"], timeout=2)
    except RPCError:
        return False
    return True


class Running:
    """A started service and the task running its loops."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> Running:
        await self.service.start()
        self.task = asyncio.get_running_loop().create_task(self.service.run())
        return self

    async def stop(self) -> None:
        self.service.stop()
        if self.task is not None:
            await self.task

    @property
    def endpoint(self) -> str:
        return self.service.endpoint


async def start_worker(nats_url: str, tmp: Path, **extra: Any) -> Running:
    return await Running(
        InferenceWorker(from_env(WorkerConfig, common(nats_url, tmp, **extra)))
    ).start()


async def start_retrieval(nats_url: str, tmp: Path, **extra: Any) -> Running:
    """A retrieval worker whose collections live under tmp/collections (pass instance=...)."""
    cfg = from_env(RetrievalConfig, common(nats_url, tmp, **extra))
    return await Running(RetrievalWorker(cfg)).start()


async def start_tiering(nats_url: str, tmp: Path, **extra: Any) -> Running:
    """The tiering service (pass tiering_period_s=..., half_life_s=... to make it quick)."""
    return await Running(Tiering(from_env(TieringConfig, common(nats_url, tmp, **extra)))).start()


async def start_batcher(nats_url: str, tmp: Path, **extra: Any) -> Running:
    return await Running(Batcher(from_env(BatcherConfig, common(nats_url, tmp, **extra)))).start()


async def start_router(nats_url: str, tmp: Path, **extra: Any) -> Running:
    return await Running(Router(from_env(RouterConfig, common(nats_url, tmp, **extra)))).start()


@asynccontextmanager
async def echo_mesh(nats_url: str, tmp: Path, **extra: Any) -> AsyncIterator[dict[str, Running]]:
    """Router + batcher + inference worker (echo), ready to serve (extra: INFERMESH_* settings)."""
    parts: dict[str, Running] = {}
    try:
        parts["worker"] = await start_worker(nats_url, tmp, **extra)
        parts["batcher"] = await start_batcher(nats_url, tmp, **extra)
        parts["router"] = await start_router(nats_url, tmp, **extra)
        yield parts
    finally:
        for name in ("router", "batcher", "worker"):
            if name in parts:
                await parts[name].stop()
