"""Helpers for tests/deploy: paths, tools, the metric table of the architecture doc, PromQL.

A module with a unique name (not conftest) so test files import it under pytest's default
`prepend` import mode without clashing with other test folders.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
OVERLAYS = ("cpu", "gpu")
# From docs/architecture.md's process contract: SIGTERM -> server.stop(grace=10 s).
DRAIN_SECONDS = 10


def find_tool(name: str) -> str | None:
    """A tool from the project venv (pip-installed linters) first, then PATH."""
    beside_python = Path(sys.executable).parent / name
    if beside_python.exists():
        return str(beside_python)
    return shutil.which(name)


def require_tool(name: str, how: str) -> str:
    path = find_tool(name)
    if path is None:
        pytest.skip(f"{name} is not installed ({how})")
    return path


def run(cmd: list[str], cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


def workloads(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] in ("Deployment", "StatefulSet")]


def contract_metrics() -> dict[str, str]:
    """Metric name -> type, from the Metrics table of docs/architecture.md.

    A row like `a_used_bytes` / `_free_bytes` names two metrics: the fragment replaces as many
    trailing words of the first name as it has.
    """
    text = (REPO / "docs" / "architecture.md").read_text()
    section = text.split("## Metrics", 1)[1].split("\n## ", 1)[0]
    metrics: dict[str, str] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or not cells[0].startswith("`"):
            continue
        names = re.findall(r"`([a-z0-9_]+)`", cells[0])
        first = names[0]
        for name in names:
            if name.startswith("_"):
                words = name.strip("_").split("_")
                name = "_".join(first.split("_")[: -len(words)] + words)
            metrics[name] = cells[1]
    return metrics


def series_names(metrics: dict[str, str]) -> set[str]:
    """Every series name Prometheus can hold for the contract's metrics, plus `up`."""
    names = {"up"}
    for name, kind in metrics.items():
        names.add(name)
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return names


PROMQL_WORDS = {
    "sum",
    "max",
    "min",
    "avg",
    "count",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "rate",
    "irate",
    "increase",
    "histogram_quantile",
    "le",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "topk",
    "bottomk",
    "quantile",
    "label_values",
    "abs",
    "clamp_min",
    "clamp_max",
}


def metrics_in(expr: str) -> set[str]:
    """Metric names used by a PromQL expression (label matchers and strings removed)."""
    stripped = re.sub(r"\{[^}]*\}", "", expr)
    stripped = re.sub(r'"[^"]*"', "", stripped)
    stripped = re.sub(r"\[[^\]]*\]", "", stripped)
    stripped = re.sub(r"\(\s*[a-z_,\s]*\)\s*(?=\()", "", stripped)  # by (le, target) before a call
    words = set(re.findall(r"\b[a-zA-Z_:][a-zA-Z0-9_:]*\b", stripped))
    labels_in_groupings = set()
    for group in re.findall(
        r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", expr
    ):
        labels_in_groupings |= {w.strip() for w in group.split(",")}
    return {w for w in words - PROMQL_WORDS - labels_in_groupings if not w.startswith("$")}
