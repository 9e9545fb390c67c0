"""Build the default model, ``minilm-l6``, into ``<DIR>/minilm-l6/model.onnx`` (offline).

Run as ``python -m services.inference_worker.build_model [--out DIR] [--force]``. DIR defaults
to ``$INFERMESH_DATA_DIR/models`` (``.infermesh/models``). A ``build.json`` beside the model
records what it was built from; when it still matches, the build is skipped, so running this
at every start-up is cheap. Besides ``model.onnx`` the directory gets the tokenizer files,
making it self-contained for a worker that mounts only the data dir.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from services.inference_worker.bert_onnx import (
    OPSET,
    build_minilm_onnx,
    default_model_dir,
    write_atomically,
)

__all__ = ["BUILDER_VERSION", "MODEL_NAME", "build", "default_out_dir", "main"]

MODEL_NAME = "minilm-l6"
#: Bump when bert_onnx.py changes the graph it emits, so cached builds are redone.
BUILDER_VERSION = 1
#: Files TextEncoder needs, copied next to model.onnx.
TOKENIZER_FILES = ("tokenizer.json", "sentence_bert_config.json")

Progress = Callable[[str], None]


def default_out_dir() -> Path:
    """Return the models directory under ``$INFERMESH_DATA_DIR`` (default ``.infermesh``)."""
    return Path(os.environ.get("INFERMESH_DATA_DIR") or ".infermesh") / "models"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _expected_manifest(source_dir: Path) -> dict[str, Any]:
    # Imported here, not at module top: only the manifest needs the versions, and importing
    # onnxruntime costs ~0.3 s that `--help` should not pay.
    import onnx
    import onnxruntime

    return {
        "model": MODEL_NAME,
        "source": "sentence-transformers/all-MiniLM-L6-v2",
        "source_sha256": _sha256(source_dir / "model.safetensors"),
        "builder_version": BUILDER_VERSION,
        "opset": OPSET,
        "onnx_version": onnx.__version__,
        "onnxruntime_version": onnxruntime.__version__,
    }


def _is_current(target: Path, expected: dict[str, Any]) -> bool:
    manifest_path = target / "build.json"
    if not (target / "model.onnx").is_file() or not manifest_path.is_file():
        return False
    if not all((target / name).is_file() for name in TOKENIZER_FILES):
        return False
    try:
        found = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        return False  # a damaged manifest just means "rebuild"
    return isinstance(found, dict) and all(found.get(k) == v for k, v in expected.items())


def build(
    out_dir: Path | None = None,
    force: bool = False,
    *,
    source_dir: Path | None = None,
    progress: Progress | None = None,
) -> Path:
    """Build (or reuse) ``<out_dir>/minilm-l6/model.onnx`` and return its path.

    Skips the work when ``build.json`` matches the source checksum and tool versions, unless
    ``force``. ``source_dir`` overrides the installed model package (tests, custom copies).
    """
    return _build(out_dir, force, source_dir=source_dir, progress=progress)[0]


def _build(
    out_dir: Path | None,
    force: bool,
    *,
    source_dir: Path | None,
    progress: Progress | None,
) -> tuple[Path, bool]:
    """Do the work of build(); also say whether anything was (re)built, for the CLI."""
    say = progress or (lambda _msg: None)
    out_dir = default_out_dir() if out_dir is None else out_dir
    source_dir = default_model_dir() if source_dir is None else source_dir
    target = out_dir / MODEL_NAME
    model_path = target / "model.onnx"

    say("checksumming source weights")
    expected = _expected_manifest(source_dir)
    if not force and _is_current(target, expected):
        return model_path, False

    target.mkdir(parents=True, exist_ok=True)
    build_minilm_onnx(source_dir, model_path, progress)
    for name in TOKENIZER_FILES:
        shutil.copyfile(source_dir / name, target / name)
    # Manifest last: its presence is what marks the directory as a complete build.
    manifest = json.dumps(expected, indent=2, sort_keys=True) + "\n"
    write_atomically(manifest.encode(), target / "build.json")
    return model_path, True


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m services.inference_worker.build_model",
        description="Build the default embedding model minilm-l6 into ONNX (offline).",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="models directory (default: $INFERMESH_DATA_DIR/models, i.e. .infermesh/models)",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    args = parser.parse_args(argv)

    # rich is imported lazily so importing build() from other code stays light.
    from rich.console import Console

    console = Console(stderr=True)
    out_dir: Path = args.out if args.out is not None else default_out_dir()
    try:
        with console.status(f"[bold]{MODEL_NAME}[/]: starting") as status:

            def progress(msg: str) -> None:
                status.update(f"[bold]{MODEL_NAME}[/]: {msg}")

            model_path, built = _build(out_dir, args.force, source_dir=None, progress=progress)
    except KeyboardInterrupt:
        console.print("[red]error:[/] interrupted", soft_wrap=True)
        return 130
    except Exception as exc:
        # One line for the operator; a traceback would bury the cause (missing package,
        # unwritable directory, corrupt weights) under frames that don't help them.
        console.print(
            f"[red]error:[/] building {MODEL_NAME} failed: {exc}", highlight=False, soft_wrap=True
        )
        return 1
    verb = "built" if built else "up to date"
    console.print(f"[green]{MODEL_NAME}[/] {verb}: {model_path}", highlight=False, soft_wrap=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
