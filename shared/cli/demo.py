"""The demo collection `stdlib`: docstrings of the Python standard library, searchable by text.

Real text present on every machine: the first paragraph of the docstring of each stdlib
module and of its public functions and classes, capped at ``DEMO_DOCS`` documents (embedding
runs at roughly 250 sentences/s on 2 cores, so 4 000 documents load in well under a minute).
The corpus is built in a child process (importing the whole stdlib has side effects that
have no place in the CLI process) into ``<data dir>/demo/stdlib.jsonl``, then ingested
through the mesh like any `.jsonl` (`infermesh ingest`). `infermesh up` loads it only when the
collection is missing or empty; later starts find it in the retrieval worker's data.
"""

from __future__ import annotations

import importlib
import inspect
import io
import json
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

from shared.cli.ingest import Ingester, ingest

COLLECTION = "stdlib"
DEMO_DOCS = 4000
SAMPLE_QUERY = "how do I parse command-line arguments"

#: Modules whose import opens windows, prints, or pulls test suites.
_SKIP = {
    "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "lib2to3",
    "ensurepip", "pydoc_data", "msilib", "winreg", "winsound", "msvcrt", "nt", "_msi",
}


def first_paragraph(doc: str | None, limit: int = 400) -> str:
    """The first paragraph of a docstring, one line, at most ``limit`` characters."""
    if not doc:
        return ""
    para = doc.strip().split("\n\n", 1)[0]
    text = " ".join(para.split())
    return text[:limit]


def corpus(limit: int = DEMO_DOCS) -> list[dict[str, object]]:
    """Documents from the stdlib: every module's doc first, then members round-robin."""
    modules: list[tuple[str, object]] = []
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in _SKIP:
            continue
        try:
            with warnings.catch_warnings(), redirect_stdout(io.StringIO()), \
                    redirect_stderr(io.StringIO()):
                warnings.simplefilter("ignore")
                modules.append((name, importlib.import_module(name)))
        except (ImportError, OSError, RuntimeError, SyntaxError, ValueError, AttributeError):
            continue  # not built on this platform (e.g. curses, readline): not in the demo
    docs: list[dict[str, object]] = []
    members: list[list[dict[str, object]]] = []
    for name, mod in modules:
        text = first_paragraph(inspect.getdoc(mod))
        if text:
            docs.append({"text": f"{name}: {text}",
                         "metadata": {"module": name, "name": name, "kind": "module"}})
        own = []
        for attr, obj in sorted(vars(mod).items()):
            if attr.startswith("_") or getattr(obj, "__module__", None) != name:
                continue
            if not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)):
                continue
            text = first_paragraph(inspect.getdoc(obj))
            if len(text) >= 20:
                kind = "class" if inspect.isclass(obj) else "function"
                own.append({"text": f"{name}.{attr}: {text}",
                            "metadata": {"module": name, "name": f"{name}.{attr}", "kind": kind}})
        members.append(own)
    # Round-robin over modules so the cap keeps every module, not the first letters.
    depth = 0
    while len(docs) < limit and any(depth < len(m) for m in members):
        for m in members:
            if depth < len(m) and len(docs) < limit:
                docs.append(m[depth])
        depth += 1
    for i, d in enumerate(docs):
        d["id"] = i
    return docs[:limit]


def build_file(path: Path, limit: int = DEMO_DOCS) -> Path:
    """Write the corpus to ``path`` (jsonl) from a child process; reuse an existing file."""
    if path.exists() and path.stat().st_size:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    subprocess.run(
        [sys.executable, "-m", "shared.cli.demo", str(tmp), str(limit)],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300,
    )
    tmp.replace(path)
    return path


def ensure_demo(
    router: str,
    data_dir: Path,
    on_status: Callable[[str], None],
    on_start: Callable[[int], None],
    on_progress: Callable[[int], None],
    timeout: float = 600.0,
    limit: int = DEMO_DOCS,
) -> tuple[int, bool]:
    """Load the demo collection unless it is there; (documents, loaded now)."""
    client = Ingester(router)
    try:
        info = client.describe(COLLECTION)
        deadline = time.monotonic() + 60.0
        while info is not None and not info.workers and time.monotonic() < deadline:
            # Declared but no worker has caught up yet (replaying after a restart): wait.
            on_status("waiting for the retrieval worker to open the demo collection")
            time.sleep(0.2)
            info = client.describe(COLLECTION)
        if info is not None and info.count > 0:
            return int(info.count), False
        on_status("building the stdlib docstring corpus")
        path = build_file(data_dir / "demo" / f"stdlib-{limit}.jsonl", limit)
        n, _ = ingest(router, COLLECTION, path, nlist=64, on_start=on_start,
                      on_progress=on_progress)
        on_status("waiting for the retrieval worker to index the demo collection")
        deadline = time.monotonic() + timeout
        while True:
            info = client.describe(COLLECTION)
            if info is not None and info.count >= n and info.workers:
                return n, True
            if time.monotonic() > deadline:
                raise TimeoutError(f"demo collection not indexed after {timeout:.0f}s")
            time.sleep(0.2)
    finally:
        client.close()


def main() -> None:
    """Child-process entry: write the corpus as jsonl to argv[1] (argv[2]: document cap)."""
    out = Path(sys.argv[1])
    limit = int(sys.argv[2]) if len(sys.argv) > 2 else DEMO_DOCS
    docs = corpus(limit)
    out.write_text("".join(json.dumps(d) + "\n" for d in docs))


if __name__ == "__main__":
    main()
