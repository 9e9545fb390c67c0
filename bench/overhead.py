"""What the mesh adds per request: echo model, direct worker call vs router + batcher.

Starts a local mesh (nats-server + services as processes), then drives the same client
(grpc.aio, closed loop) at c=1 and c=32 against (a) InferenceWorker.Execute directly and
(b) Router.Infer. Prints p50/p99/throughput of both and the added latency.
Goals (issue 2): added p50 <= 1.5 ms and p99 <= 4 ms at c=1; at c=32 mesh throughput >=
0.5x the direct call's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.loadgen import Run, closed_loop, machine, table
from shared import rpc
from shared.cli.supervisor import LocalMesh
from shared.client import build_request
from shared.pb.infermesh.v1 import (
    common_pb2,
    inference_worker_pb2,
    inference_worker_pb2_grpc,
    router_pb2_grpc,
)
from shared.tensors import from_numpy


async def measure(mesh: LocalMesh, seconds: float, levels: list[int]) -> list[Run]:
    x = np.arange(16, dtype=np.float32).reshape(1, 16)
    worker_ch = rpc.channel(mesh.endpoints["inference-worker"], tracing=False)
    router_ch = rpc.channel(mesh.router_address, tracing=False)
    worker = inference_worker_pb2_grpc.InferenceWorkerStub(worker_ch)
    router = router_pb2_grpc.RouterStub(router_ch)
    direct_req = inference_worker_pb2.ExecuteRequest(
        model="echo", items=[common_pb2.WorkItem(request_id="r", inputs=[from_numpy("INPUT0", x)])]
    )
    mesh_req = build_request("echo", {"INPUT0": x})

    async def direct() -> object:
        return await worker.Execute(direct_req, timeout=10)

    async def through_mesh() -> object:
        return await router.Infer(mesh_req, timeout=10)

    runs = []
    for c in levels:
        runs.append(await closed_loop("direct worker", direct, c, seconds))
        runs.append(await closed_loop("router+batcher", through_mesh, c, seconds))
    await worker_ch.close()
    await router_ch.close()
    return runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--levels", default="1,32")
    parser.add_argument("--json", type=Path, default=None, help="write results here")
    parser.add_argument(
        "--tracing",
        choices=("auto", "true", "false"),
        default="auto",
        help="services' tracing interceptors (auto: off unless an OTLP endpoint is set)",
    )
    ns = parser.parse_args()
    levels = [int(c) for c in ns.levels.split(",")]
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        env = {"INFERMESH_TRACING": ns.tracing}
        mesh = LocalMesh(
            Path(tmp), env=env, service_env={"inference-worker": {"INFERMESH_MODELS": "echo"}}
        )
        try:
            mesh.start()
            runs = asyncio.run(measure(mesh, ns.seconds, levels))
        finally:
            mesh.stop()
    rows = [r.row() for r in runs]
    print(table(rows))
    verdicts = []
    by = {(r.label, r.concurrency): r for r in runs}
    if 1 in levels:
        d, m = by[("direct worker", 1)], by[("router+batcher", 1)]
        add50, add99 = m.pct(50) - d.pct(50), m.pct(99) - d.pct(99)
        verdicts.append(
            f"c=1 added p50 {add50:.2f} ms (goal <= 1.5): {'OK' if add50 <= 1.5 else 'MISS'}"
        )
        verdicts.append(
            f"c=1 added p99 {add99:.2f} ms (goal <= 4): {'OK' if add99 <= 4 else 'MISS'}"
        )
    if 32 in levels:
        d, m = by[("direct worker", 32)], by[("router+batcher", 32)]
        ratio = m.throughput / d.throughput
        verdicts.append(
            f"c=32 mesh/direct throughput {ratio:.2f}x (goal >= 0.5): "
            + ("OK" if ratio >= 0.5 else "MISS")
        )
    print("\n".join(verdicts))
    if ns.json:
        ns.json.write_text(
            json.dumps(
                {"machine": machine(), "at": time.time(), "rows": rows, "verdicts": verdicts},
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
