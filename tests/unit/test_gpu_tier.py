"""The hot (GPU) tier: a hot block's own scan equals the CPU scan; no GPU means two tiers.

Run with torch (on the CPU, the ``allow_cpu`` test device), e.g. ``/tmp/torchvenv``; where torch
is missing the hot-scan tests skip and say so. The no-GPU tests need no torch.
"""

from __future__ import annotations

import threading
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from test_search import DIM, NLIST, N, assert_same_up_to_ties, faiss_reference, mixture

from services.retrieval_worker.blocks import Tier
from services.retrieval_worker.collection import Collection
from services.retrieval_worker.errors import FailedPrecondition
from services.retrieval_worker.gpu_tier import cuda_available, hot_source
from services.retrieval_worker.manifest import CollectionSpec


@pytest.fixture
def torch() -> ModuleType:
    return pytest.importorskip(
        "torch",
        reason="torch is not installed: the hot (GPU) tier is tested where torch exists "
        "(pip install torch==2.13.0 gives a CPU build to run these)",
    )


def build(root: Path, metric: str = "ip", hot: bool = True) -> Collection:
    spec = CollectionSpec(name="h", dim=DIM, nlist=NLIST, metric=metric,  # type: ignore[arg-type]
                          lists_per_block=4)
    source = hot_source(metric, allow_cpu=True) if hot else None
    col = Collection.create(root, spec, sources={Tier.HOT: source} if source else None)
    x = mixture(N, 1)
    col.train(x)
    col.upsert(np.arange(N) * 3 + 11, x, seq=1)
    col.flush()
    return col


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("path", ["grouped", "faiss"])
def test_hot_blocks_scanned_on_the_device_return_what_the_cpu_scan_returns(
    torch: ModuleType, tmp_path: Path, metric: str, path: str
) -> None:
    col = build(tmp_path / "c", metric)
    q = mixture(120, 2)
    searcher = col._searcher
    assert searcher is not None
    before = searcher.search(q, 10, 8, path=path)  # type: ignore[arg-type]
    for b in range(0, col.spec.nblocks, 2):
        col.place(b, Tier.HOT)
    col.place(1, Tier.COLD)
    assert col.describe().blocks_by_tier["hot"] == (col.spec.nblocks + 1) // 2
    searcher = col._searcher
    assert searcher is not None
    s, i, reads = searcher.search(q, 10, 8, path=path)  # type: ignore[arg-type]
    assert_same_up_to_ties((before[0], before[1]), (s, i), metric == "ip")
    assert any(tier is Tier.HOT for _, tier in reads)
    ref = faiss_reference(col, 8).search(q, 10)
    assert_same_up_to_ties(ref, (s, i), metric == "ip")


def test_an_all_hot_collection_pads_missing_results_like_the_cpu(
    torch: ModuleType, tmp_path: Path
) -> None:
    col = build(tmp_path / "c")
    for b in range(col.spec.nblocks):
        col.place(b, Tier.HOT)
    s, i = col.search(mixture(3, 5), 500, nprobe=1, block_filter={0})
    assert (i == -1).any() and np.isneginf(s[i == -1]).all()
    assert len(set(i[0][i[0] >= 0])) == int((i[0] >= 0).sum())  # no id twice


def test_hot_reads_are_counted_as_hot_for_the_tiering_service(
    torch: ModuleType, tmp_path: Path
) -> None:
    col = build(tmp_path / "c")
    for b in range(col.spec.nblocks):
        col.place(b, Tier.HOT)
    col.read_counts(drain=True)
    col.search(mixture(50, 6), 5, nprobe=4)
    counts = col.read_counts(drain=True)
    assert counts and all(set(c) == {"hot"} for c in counts.values())
    assert sum(c["hot"] for c in counts.values()) == 50 * 4


def test_moving_blocks_to_and_from_hot_during_searches_never_changes_results(
    torch: ModuleType, tmp_path: Path
) -> None:
    col = build(tmp_path / "c")
    q = mixture(30, 7)
    expected = col.search(q, 10, nprobe=8)[1]
    failures: list[str] = []
    stop = threading.Event()

    def searching() -> None:
        while not stop.is_set():
            ids = col.search(q, 10, nprobe=8)[1]
            if not np.array_equal(np.sort(ids, axis=1), np.sort(expected, axis=1)):
                failures.append("results changed during a move")

    t = threading.Thread(target=searching)
    t.start()
    try:
        for tier in (Tier.HOT, Tier.COLD, Tier.HOT, Tier.WARM):
            for b in range(col.spec.nblocks):
                col.place(b, tier)
    finally:
        stop.set()
        t.join()
    assert not failures


@pytest.mark.skipif(cuda_available(), reason="this machine has a GPU")
def test_without_a_gpu_there_is_no_hot_tier_and_placing_hot_says_why(tmp_path: Path) -> None:
    assert hot_source("ip") is None
    col = build(tmp_path / "c", hot=False)
    with pytest.raises(FailedPrecondition, match=r"no hot \(GPU\) tier.*two tiers"):
        col.place(0, Tier.HOT)
    assert col.placement()[0] is Tier.WARM


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_the_device_picks_the_same_lists_as_the_cpu_coarse_quantizer(
    torch: ModuleType, metric: str
) -> None:
    import faiss

    from services.retrieval_worker.gpu_tier import HotBlock

    rng = np.random.default_rng(7)
    centroids = rng.standard_normal((64, 16)).astype(np.float32)
    queries = rng.standard_normal((200, 16)).astype(np.float32)
    flat = faiss.IndexFlatIP(16) if metric == "ip" else faiss.IndexFlatL2(16)
    flat.add(centroids)
    _, want = flat.search(queries, 8)
    vectors = rng.standard_normal((10, 16)).astype(np.float32)
    block = HotBlock(0, vectors, np.arange(10), np.array([0, 10]), metric=metric, device="cpu")
    got = block.assign(queries, centroids, 8, {})
    # Same set of lists per query (order may differ only between exact ties).
    assert [set(r) for r in got.tolist()] == [set(r) for r in want.tolist()]
