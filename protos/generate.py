"""Regenerates the committed Python stubs in shared/pb from protos/ (make protos).

Runs grpc_tools.protoc with typed stubs (.pyi), then rewrites the generated absolute imports
(`from infermesh.v1 import x_pb2`) to the package they live in (`shared.pb.infermesh.v1`).
`--check` regenerates into a temporary folder and fails on any difference (a test runs it).
"""

from __future__ import annotations

import argparse
import filecmp
import re
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"
OUT_DIR = ROOT / "shared" / "pb"
IMPORT_RE = re.compile(r"^from infermesh\.v1 import", re.MULTILINE)


def generate(out_dir: Path) -> list[Path]:
    """Generate every stub under protos/ into out_dir; return the generated files."""
    protos = sorted(PROTO_DIR.rglob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(p) for p in protos],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    files = sorted(p for p in out_dir.rglob("*") if p.suffix in {".py", ".pyi"})
    for path in files:
        text = IMPORT_RE.sub("from shared.pb.infermesh.v1 import", path.read_text())
        path.write_text(text)
    # Every folder from out_dir down to the stubs is a package.
    for folder in {p.parent for p in files}:
        while folder != out_dir.parent:
            (folder / "__init__.py").touch()
            folder = folder.parent
    return files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if committed stubs are stale")
    ns = parser.parse_args()
    if not ns.check:
        shutil.rmtree(OUT_DIR / "infermesh", ignore_errors=True)
        OUT_DIR.mkdir(parents=True, exist_ok=True)
        generate(OUT_DIR)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh)
        stale = []
        for path in fresh.rglob("*"):
            if path.is_file():
                committed = OUT_DIR / path.relative_to(fresh)
                if not committed.exists() or not filecmp.cmp(path, committed, shallow=False):
                    stale.append(str(committed.relative_to(ROOT)))
        if stale:
            print("stale generated stubs (run `make protos`): " + ", ".join(sorted(stale)))
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
