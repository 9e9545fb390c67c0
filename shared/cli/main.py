"""The `infermesh` command: run the local mesh, call it, and see its state.

Errors a user sees are one line (``error: ...``) and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from shared.cli.procs import SERVICES
from shared.cli.supervisor import LocalMesh, MeshError, read_state

app = typer.Typer(
    help="infermesh: models and vector retrieval behind one gRPC endpoint.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
models_app = typer.Typer(help="Model repository commands.", no_args_is_help=True)
app.add_typer(models_app, name="models")

console = Console()
err = Console(stderr=True)

DataDir = Annotated[
    Path,
    typer.Option("--data-dir", envvar="INFERMESH_DATA_DIR", help="State of the local mesh."),
]


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print one error line; return the Exit to raise."""
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _router_default(data_dir: Path) -> str:
    state = read_state(data_dir)
    return str(state.get("router") or "127.0.0.1:8001")


def _nats_default(data_dir: Path) -> str:
    state = read_state(data_dir)
    return str(state.get("nats") or os.environ.get("INFERMESH_NATS_URL", "nats://127.0.0.1:4222"))


@app.command()
def up(
    data_dir: DataDir = Path(".infermesh"),
    router_port: Annotated[int, typer.Option(help="Router port; 0 = a free one.")] = 0,
    sample: Annotated[bool, typer.Option(help="Answer one sample request after start.")] = True,
    demo: Annotated[
        bool, typer.Option(help="Load the demo collection 'stdlib' if missing; search it.")
    ] = True,
    demo_docs: Annotated[
        int, typer.Option(help="Cap on demo documents (fewer load faster).")
    ] = 4000,
    exit_after_start: Annotated[
        bool, typer.Option("--exit-after-start", help="Stop right after the sample (smoke test).")
    ] = False,
) -> None:
    """Start nats-server and all five services locally; serve until Ctrl-C."""
    mesh = LocalMesh(data_dir, router_port=router_port)
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        with console.status("starting the mesh") as status:
            mesh.start(on_step=lambda s: status.update(s))
        console.print(f"[green]mesh is up[/]: router at [bold]{mesh.router_address}[/]")
        console.print(f"  nats {mesh.nats_url}; logs in {mesh.logs}")
        if sample:
            _sample(mesh.router_address)
        if demo:
            _demo(mesh.router_address, data_dir, demo_docs)
        if not exit_after_start:
            console.print("serving; press Ctrl-C to stop")
            while not stop.wait(0.5):
                gone = mesh.dead()
                if gone:
                    names = ", ".join(f"{c.name} (exit {c.proc.returncode})" for c in gone)
                    raise MeshError(f"stopped unexpectedly: {names}; see {mesh.logs}")
    except (MeshError, OSError, TimeoutError) as exc:
        with console.status("stopping"):
            mesh.stop()
        raise fail(str(exc)) from None
    with console.status("stopping (draining in-flight requests)"):
        codes = mesh.stop()
    bad = {k: v for k, v in codes.items() if v not in (0, -signal.SIGTERM)}
    if bad:
        raise fail(f"some processes exited uncleanly: {bad}")
    console.print("stopped")


def _sample(router: str) -> None:
    from shared.client import Client
    from shared.errors import RPCError

    with Client(router) as client:
        try:
            result = client.infer("echo", texts=["hello, mesh"], timeout=10)
        except RPCError as exc:
            raise MeshError(f"sample request failed: {exc.status.name}: {exc.message}") from None
    text = result.outputs["TEXT"].reshape(-1)[0].decode()
    t = result.timings[0]
    console.print(
        f"sample: infer(model=echo, text='hello, mesh') -> {text!r} "
        f"in {t.total_ms:.1f} ms (queue {t.queue_ms:.2f} ms, exec {t.exec_ms:.2f} ms, "
        f"worker {t.worker})"
    )


def _demo(router: str, data_dir: Path, limit: int) -> None:
    from rich.progress import Progress

    from shared.cli.demo import COLLECTION, SAMPLE_QUERY, ensure_demo
    from shared.client import Client
    from shared.errors import RPCError

    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("demo collection", total=None)
        try:
            n, loaded = ensure_demo(
                router,
                data_dir,
                on_status=lambda s: progress.update(task, description=s),
                on_start=lambda total: progress.update(
                    task, total=total, completed=0, description="embedding stdlib docstrings"
                ),
                on_progress=lambda rows: progress.advance(task, rows),
                limit=limit,
            )
        except RPCError as exc:
            raise MeshError(f"demo collection: {exc.message}") from None
    console.print(
        f"demo collection [bold]{COLLECTION}[/]: {n} stdlib docstrings "
        + ("loaded" if loaded else "(cached)")
    )
    with Client(router) as client:
        try:
            result = client.infer(
                pipeline="search", texts=[SAMPLE_QUERY], collection=COLLECTION, k=5, timeout=30
            )
        except RPCError as exc:
            raise MeshError(f"sample search failed: {exc.status.name}: {exc.message}") from None
    table = Table(title=f"search(collection={COLLECTION}, text={SAMPLE_QUERY!r})")
    for col in ("score", "document"):
        table.add_column(col)
    for h in result.hits[0]:
        table.add_row(f"{h.score:.3f}", h.text[:110])
    console.print(table)
    steps = ", ".join(f"{t.step} {t.total_ms:.1f} ms" for t in result.timings)
    console.print(f"  {steps}")


@app.command()
def ingest(
    collection: Annotated[str, typer.Argument(help="Collection to load (created if missing).")],
    file: Annotated[Path, typer.Argument(help=".npy vectors (n x dim) or .jsonl texts.")],
    ids: Annotated[
        Path | None, typer.Option("--ids", help=".npy int ids for .npy input (default 0..n-1).")
    ] = None,
    dim: Annotated[
        int, typer.Option(help="Dimension when creating (default: the file's; 384 for text).")
    ] = 0,
    nlist: Annotated[int, typer.Option(help="IVF lists when creating (0 = ~sqrt(n)).")] = 0,
    metric: Annotated[str, typer.Option(help="ip or l2, when creating.")] = "ip",
    dtype: Annotated[str, typer.Option(help="float32 or float16 storage, when creating.")] = (
        "float32"
    ),
    batch: Annotated[int, typer.Option(help="Rows per Upsert (0 = 20000 vectors/256 texts).")] = 0,
    router: Annotated[str, typer.Option(help="Router address; default: the local mesh.")] = "",
    data_dir: DataDir = Path(".infermesh"),
) -> None:
    """Load vectors (.npy) or texts (.jsonl: text, id, metadata) into a collection, durably."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from shared.cli.ingest import TEXT_DIM, IngestError, batches
    from shared.cli.ingest import ingest as run_ingest
    from shared.errors import RPCError

    address = router or _router_default(data_dir)
    try:
        if dim:
            _, file_dim, _ = batches(file, ids, 1)
            if file.suffix == ".npy" and dim != file_dim:
                raise IngestError(f"--dim {dim} disagrees with {file} (dim {file_dim})")
            if file.suffix == ".jsonl" and dim != TEXT_DIM:
                raise IngestError(f"texts embed to dim {TEXT_DIM}; --dim {dim} cannot hold them")
        with Progress(
            "[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
            TimeRemainingColumn(), console=console,
        ) as progress:
            task = progress.add_task(f"ingest {file.name} -> {collection}", total=None)
            count, seq = run_ingest(
                address, collection, file, ids_path=ids, nlist=nlist, metric=metric,
                dtype=dtype, rows_per_batch=batch,
                on_start=lambda n: progress.update(task, total=n),
                on_progress=lambda rows: progress.advance(task, rows),
            )
    except (IngestError, RPCError) as exc:
        raise fail(str(exc)) from None
    console.print(f"ingested [bold]{count}[/] rows into {collection} (durable through stream "
                  f"seq {seq}; searchable once the retrieval workers apply it)")


@app.command()
def serve(
    service: Annotated[str, typer.Argument(help=f"One of: {', '.join(SERVICES)}.")],
) -> None:
    """Run one service in the foreground (configured by INFERMESH_* variables)."""
    module = SERVICES.get(service) or SERVICES.get(service.replace("_", "-"))
    if module is None:
        raise fail(f"unknown service {service!r}; expected one of {', '.join(SERVICES)}")
    os.execv(sys.executable, [sys.executable, "-m", module])


@app.command()
def infer(
    model: Annotated[str, typer.Option(help="Model to run.")] = "",
    pipeline: Annotated[str, typer.Option(help="Pipeline to run (instead of a model).")] = "",
    text: Annotated[list[str] | None, typer.Option(help="Input text (repeatable).")] = None,
    input_npy: Annotated[
        list[str] | None, typer.Option("--input", help="NAME=file.npy tensor input (repeatable).")
    ] = None,
    collection: Annotated[str, typer.Option(help="Collection (search pipelines).")] = "",
    k: Annotated[int, typer.Option(help="Hits per text (search pipelines).")] = 0,
    timings: Annotated[bool, typer.Option(help="Print per-step timings.")] = False,
    router: Annotated[str, typer.Option(help="Router address; default: the local mesh.")] = "",
    timeout: Annotated[float, typer.Option(help="Deadline in seconds.")] = 30.0,
    data_dir: DataDir = Path(".infermesh"),
) -> None:
    """Send one request to the router and print the answer."""
    from shared.client import Client
    from shared.errors import RPCError

    inputs = {}
    for spec in input_npy or []:
        name, _, path = spec.partition("=")
        if not path:
            raise fail(f"--input expects NAME=file.npy, got {spec!r}")
        try:
            inputs[name] = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise fail(f"cannot read {path}: {exc}") from None
    address = router or _router_default(data_dir)
    with Client(address) as client:
        try:
            result = client.infer(
                model,
                inputs,
                text or [],
                pipeline=pipeline,
                collection=collection,
                k=k,
                timeout=timeout,
            )
        except RPCError as exc:
            raise fail(f"{exc.status.name}: {exc.message}") from None
    for name, array in result.outputs.items():
        if array.dtype == object:
            values = [v.decode(errors="replace") if isinstance(v, bytes) else v
                      for v in array.reshape(-1)]
            console.print(f"[bold]{name}[/] {list(array.shape)}: {values}")
        else:
            with np.printoptions(precision=4, threshold=12, edgeitems=3):
                console.print(f"[bold]{name}[/] {array.dtype} {list(array.shape)}: {array}")
    for i, hits in enumerate(result.hits):
        table = Table(title=f"hits for text {i}")
        for col in ("id", "score", "text"):
            table.add_column(col)
        for h in hits:
            table.add_row(str(h.id), f"{h.score:.4f}", h.text[:100])
        console.print(table)
    if timings:
        table = Table(title="timings (ms)")
        for col in ("step", "target", "queue", "exec", "total", "batch", "worker"):
            table.add_column(col)
        for t in result.timings:
            table.add_row(
                t.step, t.target, f"{t.queue_ms:.2f}", f"{t.exec_ms:.2f}", f"{t.total_ms:.2f}",
                str(t.batch_size), t.worker,
            )
        console.print(table)


@app.command()
def status(
    nats_url: Annotated[
        str, typer.Option("--nats", help="NATS URL; default: the local mesh.")
    ] = "",
    data_dir: DataDir = Path(".infermesh"),
) -> None:
    """Show members (service, endpoint, health, load) and batch policies, read from NATS."""
    from shared.cli.status import collect

    url = nats_url or _nats_default(data_dir)
    try:
        snapshot = asyncio.run(collect(url))
    except (ConnectionError, OSError, TimeoutError) as exc:
        raise fail(f"cannot read mesh state from {url}: {exc}") from None
    table = Table(title=f"members ({url})")
    for col in ("service", "instance", "endpoint", "health", "load", "targets", "age s"):
        table.add_column(col)
    for m in snapshot.members:
        table.add_row(
            m.service, m.instance, m.endpoint, m.health, str(m.load), ", ".join(m.targets),
            f"{snapshot.now - m.heartbeat_unix:.1f}",
        )
    console.print(table)
    if snapshot.models:
        table = Table(title="models")
        for col in ("model", "backend", "max batch", "max delay ms", "SLO ms"):
            table.add_column(col)
        for s in snapshot.models:
            table.add_row(
                s.name, s.backend, str(s.max_batch_size), f"{s.max_delay_ms:g}", f"{s.slo_ms:g}"
            )
        console.print(table)
    if snapshot.policies:
        table = Table(title="batch policies (controller)")
        for col in ("target", "max batch", "max delay ms", "SLO ms", "p99 seen ms", "revision",
                    "age s", "why"):
            table.add_column(col)
        for p in snapshot.policies:
            table.add_row(
                p.target, str(p.max_batch_size),
                # "gather": batches wait the delay even for an idle worker (saturated).
                f"{p.max_delay_ms:g}" + (" gather" if p.gather else ""), f"{p.slo_ms:g}",
                f"{p.p99_ms:.1f}" if p.p99_ms else "-", str(p.revision),
                f"{snapshot.now - p.updated_unix:.1f}", p.reason,
            )
        console.print(table)
    if snapshot.tiers:
        table = Table(title="vector block tiers (retrieval workers)")
        for col in ("worker", "GPU tier", "hot MB", "warm MB", "cold MB", "reads hot/warm/cold",
                    "recent moves"):
            table.add_column(col)
        for t in snapshot.tiers:
            mb = {k: f"{v / 1e6:.1f}" for k, v in t.tier_bytes.items()}
            share = "/".join(f"{t.hit_share.get(k, 0.0):.0%}" for k in ("hot", "warm", "cold"))
            table.add_row(
                t.worker, "yes" if t.gpu else "none (2 tiers)", mb.get("hot", "0"),
                mb.get("warm", "0"), mb.get("cold", "0"), share, "; ".join(t.recent_moves[:3]),
            )
        console.print(table)


@app.command("console")
def console_cmd(
    port: Annotated[int, typer.Option(help="HTTP port of the page.")] = 8080,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    nats_url: Annotated[
        str, typer.Option("--nats", help="NATS URL; default: the local mesh.")
    ] = "",
    data_dir: DataDir = Path(".infermesh"),
) -> None:
    """Serve a live web page of the mesh: members, latency, batch policies, block tiers."""
    from shared.cli.console import serve as serve_console

    url = nats_url or _nats_default(data_dir)
    console.print(f"console on http://{host}:{port}/ (state from {url}); Ctrl-C stops")
    try:
        asyncio.run(serve_console(url, host, port))
    except KeyboardInterrupt:
        pass
    except (ConnectionError, OSError) as exc:
        raise fail(f"console: {exc}") from None


@app.command()
def health(address: Annotated[str, typer.Argument(help="host:port of a service.")]) -> None:
    """Exit 0 when the service at ADDRESS reports SERVING (container health checks)."""
    from shared.cli.supervisor import grpc_serving

    if not grpc_serving(address, timeout=2.0):
        raise fail(f"{address} is not SERVING")
    console.print(f"{address} SERVING")


@models_app.command("build")
def models_build(
    out: Annotated[Path | None, typer.Option(help="Cache folder for built models.")] = None,
    force: Annotated[bool, typer.Option(help="Rebuild even if up to date.")] = False,
) -> None:
    """Build the default model (minilm-l6) into ONNX, offline, if missing."""
    argv = [sys.executable, "-m", "services.inference_worker.build_model"]
    if out is not None:
        argv += ["--out", str(out)]
    if force:
        argv.append("--force")
    raise typer.Exit(subprocess.call(argv))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
