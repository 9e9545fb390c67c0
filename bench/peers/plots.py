"""PNG plots of a compare.py run: throughput vs p99 per system, and the batch policy trace.

Runs in .bench/venvs/plot (matplotlib); prints the paths it wrote::

    .bench/venvs/plot/bin/python -m bench.peers.plots bench/results/DATE.json \
        bench/results/batching.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

COLOURS = {"infermesh": "tab:blue", "Triton": "tab:green", "Ray Serve": "tab:orange"}
MARKERS = {"perf_analyzer": "o", "python grpc.aio": "s"}


def throughput_vs_p99(result: dict[str, Any], out: Path) -> Path | None:
    """One panel per serving workload; a line per (system, client) through c = 1, 8, 32."""
    rows = result.get("serving", {}).get("rows", [])
    workloads = [w for w in ("inference", "overhead") if any(r["workload"] == w for r in rows)]
    if not workloads:
        return None
    fig, axes = plt.subplots(1, len(workloads), figsize=(6.5 * len(workloads), 4.8), squeeze=False)
    titles = {"inference": "MiniLM-L6, 32 tokens", "overhead": "trivial model, FP32[16]"}
    for ax, workload in zip(axes[0], workloads, strict=True):
        pairs = sorted({(r["system"], r["client"]) for r in rows if r["workload"] == workload})
        for system, client in pairs:
            pts = sorted(
                (r["concurrency"], r["throughput"], r["p99_ms"])
                for r in rows
                if r["workload"] == workload and r["system"] == system and r["client"] == client
            )
            ax.plot(
                [p[1] for p in pts],
                [p[2] for p in pts],
                marker=MARKERS.get(client, "^"),
                color=COLOURS.get(system, "grey"),
                linestyle="-" if client == "perf_analyzer" else "--",
                label=f"{system} ({client})",
            )
            for c, x, y in pts:
                ax.annotate(f"c={c}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xlabel("throughput (requests/s)")
        ax.set_ylabel("p99 latency (ms)")
        ax.set_yscale("log")
        ax.set_title(titles[workload])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(
        f"throughput vs p99, {result['machine'].split(',')[0]} "
        f"({'smoke run' if result['quick'] else result['date']})",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def policy_trace(batching: dict[str, Any], out: Path) -> Path | None:
    """The controller's policy over bench/batching.py's load trace: cap, load, p99 vs SLO."""
    policy = batching.get("policy") or {}
    if not policy:
        return None
    args = batching.get("args", {})
    fig, (ax, low) = plt.subplots(
        2, 1, figsize=(8, 6), sharex=True, gridspec_kw={"height_ratios": [3, 2]}
    )
    for label, points in policy.items():
        t = [p["t"] for p in points]
        ax.step(
            t, [p["max_batch_size"] for p in points], where="post", label=f"max batch size, {label}"
        )
        low.step(t, [p["p99_ms"] for p in points], where="post", label=f"p99 seen, {label}")
    ax.set_ylabel("max batch size")
    ax.set_yscale("log", base=2)
    rate = batching.get("rate") or []
    if rate:
        twin = ax.twinx()
        twin.plot(
            [r[0] for r in rate],
            [r[1] for r in rate],
            color="grey",
            alpha=0.5,
            label="offered load",
        )
        twin.set_ylabel("offered load (requests/s)")
        twin.legend(loc="upper right", fontsize=7)
    if "slo_ms" in args:
        low.axhline(float(args["slo_ms"]), color="red", linestyle=":", label="SLO")
    low.set_xlabel("time (s)")
    low.set_ylabel("p99 at the batcher (ms)")
    low.legend(loc="upper left", fontsize=7)
    low.grid(alpha=0.3)
    ax.set_title(
        f"batch controller over the load trace (bench/batching.py, model "
        f"{args.get('model', '?')}, SLO {args.get('slo_ms', '?')} ms)",
        fontsize=9,
    )
    ax.legend(loc="upper left", fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main() -> None:
    """Draw both plots next to the results file."""
    result_path = Path(sys.argv[1])
    result = json.loads(result_path.read_text())
    stem = result_path.with_suffix("")
    written = [throughput_vs_p99(result, stem.with_name(stem.name + "-throughput-p99.png"))]
    if len(sys.argv) > 2 and Path(sys.argv[2]).is_file():
        batching = json.loads(Path(sys.argv[2]).read_text())
        written.append(policy_trace(batching, stem.with_name(stem.name + "-batch-policy.png")))
    for path in written:
        if path is not None:
            print(path)


if __name__ == "__main__":
    main()
