"""The search engine: equal to FAISS IndexIVFFlat, shardable by blocks, stable under tier moves."""

from __future__ import annotations

import threading
from pathlib import Path

import faiss
import numpy as np
import pytest

from services.retrieval_worker.blocks import Tier
from services.retrieval_worker.collection import Collection
from services.retrieval_worker.errors import InvalidArgument
from services.retrieval_worker.manifest import CollectionSpec
from services.retrieval_worker.search import merge_topk
from services.retrieval_worker.tiers import Codec

DIM = 24
NLIST = 48
N = 6000


def mixture(n: int, seed: int) -> np.ndarray:
    """Unit vectors around 80 fixed unit centres."""
    c = np.random.default_rng(0).standard_normal((80, DIM)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    x = c[rng.integers(0, 80, n)] + 0.5 * rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def build(root: Path, metric: str = "ip", dtype: str = "float32") -> Collection:
    spec = CollectionSpec(name="s", dim=DIM, nlist=NLIST, metric=metric,  # type: ignore[arg-type]
                          dtype=dtype, lists_per_block=4)  # type: ignore[arg-type]
    col = Collection.create(root, spec)
    x = mixture(N, 1)
    col.train(x)
    col.upsert(np.arange(N) * 3 + 11, x, seq=1)
    col.flush()
    return col


def faiss_reference(col: Collection, nprobe: int) -> faiss.IndexIVFFlat:
    """FAISS IndexIVFFlat with the collection's centroids and (storage-rounded) vectors."""
    metric = faiss.METRIC_INNER_PRODUCT if col.spec.metric == "ip" else faiss.METRIC_L2
    quant = faiss.IndexFlatIP(DIM) if col.spec.metric == "ip" else faiss.IndexFlatL2(DIM)
    quant.add(col.centroids)
    ivf = faiss.IndexIVFFlat(quant, DIM, NLIST, metric)
    ivf.is_trained = True
    x = mixture(N, 1).astype(col.spec.dtype).astype(np.float32)
    ivf.add_with_ids(x, np.arange(N, dtype=np.int64) * 3 + 11)
    ivf.nprobe = nprobe
    return ivf


def assert_same_up_to_ties(ref: tuple[np.ndarray, np.ndarray], got: tuple[np.ndarray, np.ndarray],
                           higher_is_better: bool) -> None:
    """Same id sets per query, except ids whose score ties the k-th best (within rounding)."""
    (rs, ri), (gs, gi) = ref, got
    np.testing.assert_allclose(np.sort(gs, axis=1), np.sort(rs, axis=1), rtol=1e-4, atol=1e-5)
    for row in range(ri.shape[0]):
        kth = rs[row].min() if higher_is_better else rs[row].max()
        diff = set(ri[row]) ^ set(gi[row])
        for i in diff:
            s = np.concatenate([rs[row][ri[row] == i], gs[row][gi[row] == i]])
            assert np.all(np.abs(s - kth) < 1e-4), f"query {row}: id {i} differs, not a tie"


@pytest.mark.parametrize(("metric", "dtype"),
                         [("ip", "float32"), ("l2", "float32"), ("ip", "float16")])
@pytest.mark.parametrize("path", ["grouped", "faiss", "auto"])
def test_both_paths_return_what_faiss_ivfflat_returns_with_the_same_centroids(
    tmp_path: Path, metric: str, dtype: str, path: str
):
    col = build(tmp_path / "c", metric, dtype)
    q = mixture(150, 2)
    nprobe = 6
    ref = faiss_reference(col, nprobe).search(q, 10)
    searcher = col._searcher
    assert searcher is not None
    s, i, _ = searcher.search(q, 10, nprobe, path=path)  # type: ignore[arg-type]
    assert_same_up_to_ties(ref, (s, i), metric == "ip")


def test_cold_and_warm_blocks_mixed_give_the_same_results_on_both_paths(tmp_path: Path):
    col = build(tmp_path / "c")
    for b in range(0, col.spec.nblocks, 2):
        col.place(b, Tier.COLD)
    q = mixture(40, 3)
    ref = faiss_reference(col, 8).search(q, 10)
    searcher = col._searcher
    assert searcher is not None
    for path in ("grouped", "faiss"):
        s, i, _ = searcher.search(q, 10, 8, path=path)  # type: ignore[arg-type]
        assert_same_up_to_ties(ref, (s, i), True)


def test_searching_two_halves_of_the_blocks_and_merging_equals_one_full_search(tmp_path: Path):
    col = build(tmp_path / "c")
    q = mixture(64, 4)
    blocks = list(range(col.spec.nblocks))
    full = col.search(q, 10, nprobe=8)
    a = col.search(q, 10, nprobe=8, block_filter=set(blocks[::2]))
    b = col.search(q, 10, nprobe=8, block_filter=set(blocks[1::2]))
    merged = merge_topk([a, b], 10, "ip")
    np.testing.assert_array_equal(merged[1], full[1])
    np.testing.assert_allclose(merged[0], full[0], rtol=1e-6)


def test_merge_topk_orders_by_metric_and_pads_missing_results():
    sa, ia = np.array([[0.9, 0.1]], np.float32), np.array([[1, 2]])
    sb, ib = np.array([[0.5, -np.inf]], np.float32), np.array([[3, -1]])
    s, i = merge_topk([(sa, ia), (sb, ib)], 5, "ip")
    assert i.tolist() == [[1, 3, 2, -1, -1]]
    assert s[0, :3].tolist() == pytest.approx([0.9, 0.5, 0.1]) and np.isneginf(s[0, 3:]).all()
    s, i = merge_topk([(sa, ia), (sb, ib)], 2, "l2")
    assert i.tolist() == [[2, 3]]
    with pytest.raises(InvalidArgument):
        merge_topk([(sa, ia)], 0)


def test_fewer_vectors_than_k_pads_with_minus_one(tmp_path: Path):
    col = build(tmp_path / "c")
    s, i = col.search(mixture(2, 5), 50, nprobe=1, block_filter={0})
    assert (i == -1).any() and np.isneginf(s[i == -1]).all()


def test_moving_blocks_between_warm_and_cold_during_concurrent_searches_keeps_results(
    tmp_path: Path,
):
    col = build(tmp_path / "c")
    small, big = mixture(2, 6), mixture(300, 7)  # one batch per path
    want = [col.search(small, 10, 8), col.search(big, 10, 8)]
    errors: list[BaseException] = []
    stop = threading.Event()

    def searcher(q: np.ndarray, expect: tuple[np.ndarray, np.ndarray]) -> None:
        try:
            while not stop.is_set():
                s, i = col.search(q, 10, 8)
                np.testing.assert_array_equal(i, expect[1])
                np.testing.assert_allclose(s, expect[0], rtol=1e-5, atol=1e-6)
        except BaseException as e:  # handed to the main thread, which re-raises it
            errors.append(e)

    threads = [threading.Thread(target=searcher, args=(small, want[0])),
               threading.Thread(target=searcher, args=(big, want[1]))]
    for t in threads:
        t.start()
    try:
        for rnd in range(3):
            for b in range(col.spec.nblocks):
                col.place(b, Tier.COLD if (b + rnd) % 2 == 0 else Tier.WARM)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors[0]
    assert set(col.placement().values()) == {Tier.COLD, Tier.WARM}


def test_read_counters_count_block_scans_by_tier(tmp_path: Path):
    col = build(tmp_path / "c")
    col.place(0, Tier.COLD)
    col.read_counts(drain=True)
    col.search(mixture(200, 8), 10, nprobe=NLIST)  # every list probed once per batch
    counts = col.read_counts(drain=True)
    # each list is scanned once, plus once more for the queries it is nearest to
    assert set(counts[0]) == {"cold"} and 4 <= counts[0]["cold"] <= 8
    assert all(set(c) == {"warm"} and c["warm"] >= 4 for b, c in counts.items() if b != 0)
    assert col.read_counts() == {}
    info = col.describe()
    assert info.blocks_by_tier["cold"] == 1 and info.bytes_by_tier["cold"] > 0


@pytest.mark.parametrize(
    ("dtype", "codec", "expected"),
    [("float32", Codec.NONE, "grouped"), ("float16", Codec.NONE, "faiss"),
     ("float32", Codec.FLOAT16, "faiss"), ("float32", Codec.SQ8, "faiss")],
)
def test_auto_path_keeps_compressed_blocks_on_faiss_where_float32_ones_go_grouped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: str, codec: Codec, expected: str
):
    # 12.5 queries per probed list: past the float32 crossover, below those of float16 and
    # SQ8 blocks (the grouped scan would convert every such list it reads).
    build(tmp_path / "c", "ip", dtype).close()
    col = Collection.open(tmp_path / "c", warm_codec=codec)
    searcher = col._searcher
    assert searcher is not None
    ran: list[str] = []

    def recorded(name: str):  # type: ignore[no-untyped-def]
        method = getattr(searcher, f"_search_{name}")

        def run(*args):  # type: ignore[no-untyped-def]
            ran.append(name)
            return method(*args)

        return run

    for name in ("grouped", "faiss"):
        monkeypatch.setattr(searcher, f"_search_{name}", recorded(name))
    q = mixture(100, 2)
    s, i, _ = searcher.search(q, 10, 6)
    assert ran == [expected]
    if codec is Codec.NONE:  # a codec scores what it holds: not the stored vectors' scores
        assert_same_up_to_ties(faiss_reference(col, 6).search(q, 10), (s, i), True)
