"""GPU hot tier vs raw torch: QPS of HotBlock scans against a hand-written GEMM + top-k.

Needs only torch and numpy (the GPU host has neither faiss nor grpc). Data as in
bench/retrieval_engine.py (unit centres, points = centre + equal-norm noise, normalised),
made on the device; IVF lists from a spherical k-means in torch; blocks of
``--lists-per-block`` consecutive lists, as the engine lays them out. For each batch size the
same queries, coarse assignment and probed blocks go through (a) the engine's classes:
``HotBlock.scan_blocks`` over the probed blocks (what ``Searcher`` calls for hot blocks,
from the numpy (query, list) pairs to the (n, k) top-k on the host) and (b) raw torch: the same
per-block GEMM, mask and top-k, written inline, merged on the device. Coarse assignment is
outside both. Goal: (a) >= 0.8x (b). Recall@k of (a) against exact brute force is printed.

Device run: ``python -m bench.gpu_tier --out $OUT/gpu_tier.json``; CPU smoke test:
``python -m bench.gpu_tier --device cpu --n 20000 --dim 64 --nlist 64``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import platform
import time
from typing import Any

import numpy as np
import torch

from services.retrieval_worker.gpu_tier import HotBlock


def mixture(n: int, centres: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Points around the centres (noise with the centre's norm), normalised."""
    idx = torch.randint(0, centres.shape[0], (n,), generator=gen, device=centres.device)
    c = centres[idx]
    noise = torch.randn(c.shape, generator=gen, device=c.device)
    noise *= (c.norm(dim=1) / noise.norm(dim=1))[:, None]
    x = c + noise
    return x / x.norm(dim=1, keepdim=True)


def kmeans(x: torch.Tensor, k: int, iters: int, gen: torch.Generator) -> torch.Tensor:
    """Spherical k-means (inner product), seeded from random points."""
    cent = x[torch.randperm(x.shape[0], generator=gen, device=x.device)[:k]].clone()
    for _ in range(iters):
        assign = assign_lists(x, cent, 1)[:, 0]
        sums = torch.zeros_like(cent).index_add_(0, assign, x)
        empty = sums.norm(dim=1) == 0
        sums[empty] = cent[empty]
        cent = sums / sums.norm(dim=1, keepdim=True)
    return cent


def assign_lists(x: torch.Tensor, cent: torch.Tensor, nprobe: int) -> torch.Tensor:
    """Nearest ``nprobe`` centroids of each row (chunked so the score matrix stays small)."""
    out = []
    for lo in range(0, x.shape[0], 65536):
        out.append(torch.topk(x[lo : lo + 65536] @ cent.T, nprobe, dim=1).indices)
    return torch.cat(out)


def raw_scan(q: torch.Tensor, blocks: list[dict[str, Any]], jobs: list[tuple[int, Any, Any]],
             k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Baseline: per probed block GEMM + mask + top-k in plain torch, merged on the device."""
    n = q.shape[0]
    cq, cs, ci = [], [], []
    for b, rows, mask in jobs:
        blk = blocks[b]
        scores = q.index_select(0, rows) @ blk["x"].T
        scores.masked_fill_(~mask.index_select(1, blk["lists"]), -math.inf)
        s, j = torch.topk(scores, min(k, blk["x"].shape[0]), dim=1)
        cq.append(rows[:, None].expand_as(j).reshape(-1))
        cs.append(s.reshape(-1))
        ci.append(blk["ids"][j].reshape(-1))
    qa, sa, ia = torch.cat(cq), torch.cat(cs), torch.cat(ci)
    order = torch.argsort(sa, descending=True, stable=True)
    order = order[torch.argsort(qa[order], stable=True)]
    qa, sa, ia = qa[order], sa[order], ia[order]
    rank = torch.arange(qa.numel(), device=q.device) - torch.searchsorted(
        qa, torch.arange(n, device=q.device))[qa]
    keep = rank < k
    out_s = torch.full((n, k), -math.inf, device=q.device)
    out_i = torch.full((n, k), -1, dtype=torch.int64, device=q.device)
    out_s[qa[keep], rank[keep]] = sa[keep]
    out_i[qa[keep], rank[keep]] = ia[keep]
    return out_s.cpu(), out_i.cpu()


def probe_jobs(lists: np.ndarray, lpb: int, nlist: int) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """(block, query rows, rows x lists mask) for every probed block: what Searcher builds."""
    qq, cc = np.nonzero(lists >= 0)
    flat = lists[qq, cc]
    blocks = flat // lpb
    jobs = []
    for b in np.unique(blocks).tolist():
        sel = blocks == b
        rows, inv = np.unique(qq[sel], return_inverse=True)
        nl = min((b + 1) * lpb, nlist) - b * lpb
        mask = np.zeros((rows.size, nl), dtype=bool)
        mask[inv, flat[sel] - b * lpb] = True
        jobs.append((b, rows, mask))
    return jobs


def timed(fn: Any, reps_s: float, sync: Any) -> float:
    """Seconds per call of ``fn`` (after one warm-up), repeated for about ``reps_s``."""
    fn()
    sync()
    calls, t0 = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        if time.perf_counter() - t0 > reps_s:
            break
    sync()
    return (time.perf_counter() - t0) / calls


def main() -> None:
    """Build data, lists and blocks on the device; print QPS of both scans per batch size."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--centres", type=int, default=1000)
    ap.add_argument("--nlist", type=int, default=1024)
    ap.add_argument("--lists-per-block", type=int, default=8)
    ap.add_argument("--nprobe", type=int, default=32)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--batches", default="1,64,1024")
    ap.add_argument("--seconds", type=float, default=3.0, help="timing per cell")
    ap.add_argument("--kmeans-iters", type=int, default=10)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="", help="also write the rows as JSON here")
    args = ap.parse_args()
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    gen = torch.Generator(device=dev).manual_seed(args.seed)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor()
    print(f"device {dev} ({name}); torch {torch.__version__}; python {platform.python_version()}")

    t = time.perf_counter()
    centres = torch.randn(args.centres, args.dim, generator=gen, device=dev)
    centres /= centres.norm(dim=1, keepdim=True)
    xb = mixture(args.n, centres, gen)
    sample = xb[torch.randperm(args.n, generator=gen, device=dev)[: 64 * args.nlist]]
    cent = kmeans(sample, args.nlist, args.kmeans_iters, gen)
    lists = assign_lists(xb, cent, 1)[:, 0]
    order = torch.argsort(lists, stable=True)
    counts = torch.bincount(lists, minlength=args.nlist).cpu().numpy()
    xs, ids_sorted = xb[order], order
    offs = np.zeros(args.nlist + 1, dtype=np.int64)
    np.cumsum(counts, out=offs[1:])
    lpb = args.lists_per_block
    nblocks = -(-args.nlist // lpb)
    hot: list[HotBlock] = []
    raw: list[dict[str, Any]] = []
    for b in range(nblocks):
        lo, hi = b * lpb, min((b + 1) * lpb, args.nlist)
        a, e = int(offs[lo]), int(offs[hi])
        x_np = xs[a:e].cpu().numpy()
        i_np = ids_sorted[a:e].cpu().numpy()
        hot.append(HotBlock(b, x_np, i_np, offs[lo : hi + 1] - a, metric="ip",
                            device=str(dev)))
        raw.append({"x": xs[a:e].contiguous(), "ids": ids_sorted[a:e].contiguous(),
                    "lists": torch.from_numpy(np.repeat(np.arange(hi - lo),
                                                        np.diff(offs[lo : hi + 1]))).to(dev)})
    sync()
    print(f"data {args.n} x {args.dim}, nlist {args.nlist}, {nblocks} blocks of "
          f"{lpb} lists; built in {time.perf_counter() - t:.1f}s")

    rows_out = []
    print(f"{'batch':>5} {'blocks':>6} {'hot qps':>10} {'raw qps':>10} {'ratio':>6} "
          f"{'recall':>7}")
    for batch in [int(v) for v in args.batches.split(",")]:
        xq = mixture(batch, centres, gen)
        probed = assign_lists(xq, cent, args.nprobe).cpu().numpy()
        jobs = probe_jobs(probed, lpb, args.nlist)
        q_np = xq.cpu().numpy()
        hot_jobs = [(hot[b], rows, mask) for b, rows, mask in jobs]
        raw_jobs = [(b, torch.from_numpy(rows).to(dev), torch.from_numpy(mask).to(dev))
                    for b, rows, mask in jobs]

        ours = functools.partial(hot[0].scan_blocks, q_np, hot_jobs, args.k)
        theirs = functools.partial(raw_scan, xq, raw, raw_jobs, args.k)

        s_hot = timed(ours, args.seconds, sync)
        s_raw = timed(theirs, args.seconds, sync)
        _, i_o = ours()
        _, i_r = theirs()
        truth = torch.topk(xq @ xb.T, args.k, dim=1).indices.cpu().numpy()
        rec = float(np.mean([len(set(a) & set(t)) / args.k for a, t in zip(i_o, truth,
                                                                              strict=True)]))
        agree = float(np.mean(np.sort(i_o, axis=1) == np.sort(i_r.numpy(), axis=1)))
        row = {"batch": batch, "blocks_probed": len(jobs), "hot_qps": round(batch / s_hot, 1),
               "raw_qps": round(batch / s_raw, 1), "ratio": round(s_raw / s_hot, 3),
               "recall": round(rec, 4), "same_ids_as_raw": round(agree, 4)}
        rows_out.append(row)
        print(f"{batch:>5} {len(jobs):>6} {batch / s_hot:10.0f} {batch / s_raw:10.0f} "
              f"{s_raw / s_hot:6.2f} {rec:7.3f}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": name, "args": vars(args), "rows": rows_out}, f, indent=1)


if __name__ == "__main__":
    main()
