"""Durable ingest of a retrieval collection: replace, delete, reopen, crash, payloads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from services.retrieval_worker import collection as collection_mod
from services.retrieval_worker.collection import Collection
from services.retrieval_worker.errors import FailedPrecondition, InvalidArgument, NotFound
from services.retrieval_worker.manifest import CollectionSpec

DIM = 16
NLIST = 32


def clustered(n: int, seed: int = 0, centres: int = 50) -> np.ndarray:
    """Unit vectors around random unit centres (the benchmark's mixture, small)."""
    c = np.random.default_rng(0).standard_normal((centres, DIM)).astype(np.float32)
    rng = np.random.default_rng(seed)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    x = c[rng.integers(0, centres, n)] + 0.4 * rng.standard_normal((n, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


@pytest.fixture
def spec() -> CollectionSpec:
    return CollectionSpec(name="docs", dim=DIM, nlist=NLIST, lists_per_block=4)


@pytest.fixture
def data() -> np.ndarray:
    return clustered(3000)


@pytest.fixture
def col(tmp_path: Path, spec: CollectionSpec, data: np.ndarray) -> Collection:
    c = Collection.create(tmp_path / "docs", spec)
    c.train(data)
    c.upsert(np.arange(len(data)), data, seq=1)
    c.flush()
    return c


def test_search_finds_most_true_neighbours_of_clustered_data(col: Collection, data: np.ndarray):
    q = clustered(100, seed=7)
    exact = np.argsort(-(q @ data.T), axis=1)[:, :10]
    _, ids = col.search(q, 10, nprobe=8)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact, ids, strict=True)])
    assert recall >= 0.9


def test_upserting_an_existing_id_replaces_it_and_search_returns_it_once(
    col: Collection, data: np.ndarray
):
    target = data[5]
    col.upsert(np.array([17]), target[None, :], seq=2)  # id 17 now sits on top of id 5
    col.flush()
    _, ids = col.search(target[None, :], 10, nprobe=NLIST)
    assert list(ids[0]).count(17) == 1
    assert set(ids[0][:2]) == {5, 17}
    assert col.describe().count == len(data)


def test_replacing_an_id_twice_before_a_flush_keeps_only_the_last_vector(
    col: Collection, data: np.ndarray
):
    col.upsert(np.array([3]), data[100][None, :], seq=2)
    col.upsert(np.array([3]), data[200][None, :], seq=3)
    col.flush()
    _, ids = col.search(data[200][None, :], 5, nprobe=NLIST)
    assert ids[0][:2].tolist().count(3) == 1
    _, ids = col.search(data[100][None, :], 50, nprobe=NLIST)
    assert 3 not in ids[0][:1]
    assert col.describe().count == len(data)


def test_deleted_ids_are_never_returned(col: Collection, data: np.ndarray):
    gone = np.arange(0, 3000, 3)
    col.delete(gone, seq=2)
    col.flush()
    _, ids = col.search(data[:50], 10, nprobe=NLIST)
    assert not np.isin(ids, gone).any()
    assert col.describe().count == len(data) - len(gone)


def test_deleting_an_unknown_id_raises_not_found_and_changes_nothing(col: Collection):
    with pytest.raises(NotFound):
        col.delete(np.array([1, 999_999]), seq=2)
    assert col.describe().pending_ops == 0
    assert col.delete(np.array([999_999]), seq=2, missing_ok=True)


def test_reopening_after_close_gives_the_same_results(col: Collection, data: np.ndarray):
    col.delete(np.arange(10), seq=2)
    col.upsert(np.array([5000]), data[:1], seq=3)
    col.flush()
    before = col.search(data[:40], 10, nprobe=8)
    col.close()
    again = Collection.open(col.root)
    after = again.search(data[:40], 10, nprobe=8)
    np.testing.assert_array_equal(before[1], after[1])
    np.testing.assert_allclose(before[0], after[0], rtol=1e-6)
    assert again.last_applied_seq == 3


def test_crash_before_the_manifest_reopens_at_last_applied_seq_and_replay_converges(
    col: Collection, data: np.ndarray, monkeypatch: pytest.MonkeyPatch
):
    col.upsert(np.array([7000]), data[:1], seq=2)
    col.flush()

    def crash(*_a: object, **_k: object) -> None:
        raise OSError("simulated power loss")

    monkeypatch.setattr(collection_mod, "save_manifest", crash)
    col.upsert(np.array([7001]), data[1:2], [{"text": "lost"}], seq=3)
    col.delete(np.array([7000]), seq=4)
    with pytest.raises(OSError, match="power loss"):
        col.flush()  # payloads and block files written, manifest not
    monkeypatch.undo()

    reopened = Collection.open(col.root)
    assert reopened.last_applied_seq == 2
    _, ids = reopened.search(data[:2], 5, nprobe=NLIST)
    assert 7000 in ids[0] and 7001 not in ids[1]
    assert not list(col.root.glob("blocks/*/*.tmp"))
    # the worker replays from last_applied_seq + 1
    reopened.upsert(np.array([7001]), data[1:2], [{"text": "lost"}], seq=3)
    reopened.delete(np.array([7000]), seq=4)
    reopened.flush()
    _, ids = reopened.search(data[:2], 5, nprobe=NLIST)
    assert 7000 not in ids[0] and list(ids[1]).count(7001) == 1
    assert reopened.fetch_payloads([7001, 7000]) == [{"text": "lost"}, None]
    assert reopened.describe().count == len(data) + 1  # 7001 stays, 7000 went


def test_replayed_sequences_at_or_below_the_last_applied_one_are_ignored(
    col: Collection, data: np.ndarray
):
    assert not col.upsert(np.array([1]), data[9:10], seq=1)
    assert not col.delete(np.array([1]), seq=1)
    assert col.describe().pending_ops == 0


def test_a_flush_writes_only_the_blocks_of_the_lists_it_touched(
    col: Collection, data: np.ndarray
):
    before = {p.name: sorted(f.name for f in p.iterdir()) for p in col.root.glob("blocks/*")}
    new = data[:3] + 0.01
    new /= np.linalg.norm(new, axis=1, keepdims=True)
    _, lists = col._quantizer.search(new, 1)  # type: ignore[union-attr]
    expect = {f"b{b:06d}" for b in (lists[:, 0] // 4).tolist()}
    col.upsert(np.array([9000, 9001, 9002]), new, seq=2)
    col.flush()
    after = {p.name: sorted(f.name for f in p.iterdir()) for p in col.root.glob("blocks/*")}
    changed = {b for b in after if after[b] != before.get(b)}
    assert changed == expect


def test_many_small_upserts_cost_one_segment_per_touched_block_per_flush(
    tmp_path: Path, spec: CollectionSpec, data: np.ndarray
):
    c = Collection.create(tmp_path / "c", spec)
    c.train(data)
    for s in range(200):
        c.upsert(np.array([s]), data[s : s + 1], seq=s + 1)
    assert c.describe().segments == 0  # nothing written before the flush
    c.flush()
    info = c.describe()
    assert info.segments == info.blocks and info.count == 200
    assert c.last_applied_seq == 200


def test_an_untrained_collection_buffers_until_enough_vectors_to_train(
    tmp_path: Path, spec: CollectionSpec, data: np.ndarray
):
    c = Collection.create(tmp_path / "c", spec)
    c.upsert(np.arange(500), data[:500], seq=1)
    assert not c.flush()  # 500 < max(39 * nlist, 1000): stays pending, seq not recorded
    assert c.last_applied_seq == 0
    with pytest.raises(FailedPrecondition):
        c.search(data[:1], 5, nprobe=4)
    c.upsert(np.arange(500, 1300), data[500:1300], seq=2)
    assert c.flush()
    assert c.trained and c.describe().count == 1300 and c.last_applied_seq == 2


def test_payloads_round_trip_and_follow_replacement_and_deletion(
    col: Collection, data: np.ndarray
):
    col.upsert(np.array([1, 2, 3]), data[:3],
               [{"text": "één", "meta": {"n": 1}}, None, {"text": "c"}], seq=2)
    col.flush()
    assert col.fetch_payloads([3, 1, 2, -1]) == [
        {"text": "c"}, {"text": "één", "meta": {"n": 1}}, None, None]
    col.upsert(np.array([1]), data[:1], None, seq=3)  # replaced as a whole: payload cleared
    col.delete(np.array([3]), seq=4)
    col.flush()
    assert col.fetch_payloads([1, 3]) == [None, None]


def test_compaction_folds_segments_without_changing_results(col: Collection, data: np.ndarray):
    for s in range(2, 6):
        col.upsert(np.arange(s * 10, s * 10 + 10), data[s * 10 : s * 10 + 10][::-1], seq=s)
        col.flush()
    before = col.search(data[:30], 10, nprobe=8)
    assert col.compact() > 0
    info = col.describe()
    assert info.segments == info.blocks
    after = col.search(data[:30], 10, nprobe=8)
    np.testing.assert_array_equal(before[1], after[1])
    reopened_ids = Collection.open(col.root).search(data[:30], 10, nprobe=8)[1]
    np.testing.assert_array_equal(before[1], reopened_ids)


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda c, x: c.upsert(np.array([1, 2]), x[:3], seq=9), InvalidArgument),
        (lambda c, x: c.upsert(np.array([1]), x[:1, :8], seq=9), InvalidArgument),
        (lambda c, x: c.upsert(np.array([1]), np.full((1, DIM), np.nan, np.float32), seq=9),
         InvalidArgument),
        (lambda c, x: c.upsert(np.array([1, 1]), x[:2], seq=9), InvalidArgument),
        (lambda c, x: c.upsert(np.array([-4]), x[:1], seq=9), InvalidArgument),
        (lambda c, x: c.upsert(np.array([1.5]), x[:1], seq=9), InvalidArgument),
        (lambda c, x: c.upsert(np.array([1]), x[:1], [{"bad": object()}], seq=9),
         InvalidArgument),
        (lambda c, x: c.search(x[:2], 0, nprobe=4), InvalidArgument),
        (lambda c, x: c.search(x[:2], 5, nprobe=0), InvalidArgument),
        (lambda c, x: c.search(x[:2], 5, nprobe=NLIST + 1), InvalidArgument),
        (lambda c, x: c.search(x[:2].astype(np.int32), 5, nprobe=4), InvalidArgument),
        (lambda c, x: c.search(x[0], 5, nprobe=4), InvalidArgument),
        (lambda c, x: c.train(x), FailedPrecondition),
        (lambda c, x: c.place(10_000, c.placement()[0]), NotFound),
    ],
)
def test_bad_input_raises_a_typed_error(col: Collection, data: np.ndarray, call, error):
    with pytest.raises(error):
        call(col, data)


def test_a_closed_or_dropped_collection_refuses_work(col: Collection, data: np.ndarray):
    col.drop()
    assert not col.root.exists()
    with pytest.raises(FailedPrecondition):
        col.search(data[:1], 5, nprobe=4)
    with pytest.raises(NotFound):
        Collection.open(col.root)


def test_spec_rejects_nonsense():
    with pytest.raises(InvalidArgument):
        CollectionSpec(name="bad name!", dim=4)
    with pytest.raises(InvalidArgument):
        CollectionSpec(name="x", dim=4, nlist=8, lists_per_block=9)
    with pytest.raises(InvalidArgument):
        CollectionSpec(name="x", dim=4, metric="cosine")  # type: ignore[arg-type]


def test_vectors_too_large_for_float32_distances_are_refused_before_faiss_sees_them(
    tmp_path: Path,
) -> None:
    from services.retrieval_worker.manifest import CollectionSpec

    spec = CollectionSpec(name="big", dim=8, nlist=4, lists_per_block=2)
    col = Collection.create(tmp_path / "big", spec)
    huge = np.full((4, 8), 1e19, dtype=np.float32)
    with pytest.raises(InvalidArgument, match="within"):
        col.upsert(np.arange(4), huge, seq=1)
    col.close()
