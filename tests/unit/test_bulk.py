"""The offline bulk builder: a trained, flushed collection whose stream position is the caller's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from services.retrieval_worker import bulk
from services.retrieval_worker.collection import Collection
from services.retrieval_worker.errors import InvalidArgument
from services.retrieval_worker.manifest import CollectionSpec, load_manifest


def unit(n: int, dim: int = 16, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_a_bulk_built_collection_opens_with_every_vector_searchable(tmp_path: Path) -> None:
    x = unit(3000)
    spec = CollectionSpec(name="b", dim=16, nlist=16, lists_per_block=4)
    info = bulk.build(
        tmp_path / "b", spec, np.arange(3000) + 7, x, [{"text": f"doc {i}"} for i in range(3000)]
    )
    assert info.count == 3000 and info.trained
    col = Collection.open(tmp_path / "b")
    try:
        _, ids = col.search(x[:5], 1, nprobe=16)
        assert ids[:, 0].tolist() == [7, 8, 9, 10, 11]
        assert col.fetch_payloads([7]) == [{"text": "doc 0"}]
    finally:
        col.close()


def test_the_manifest_records_the_given_stream_position_not_the_builders_internal_calls(
    tmp_path: Path,
) -> None:
    spec = CollectionSpec(name="b", dim=16, nlist=8)
    bulk.build(tmp_path / "fresh", spec, np.arange(500), unit(500))
    bulk.build(tmp_path / "later", spec, np.arange(500), unit(500), stream_seq=41)
    assert load_manifest(tmp_path / "fresh").last_applied_seq == 0
    assert load_manifest(tmp_path / "later").last_applied_seq == 41


def test_stream_messages_after_the_bulk_position_apply_on_top(tmp_path: Path) -> None:
    spec = CollectionSpec(name="b", dim=16, nlist=8)
    bulk.build(tmp_path / "b", spec, np.arange(500), unit(500), stream_seq=3)
    col = Collection.open(tmp_path / "b")
    try:
        assert not col.upsert(np.array([9000]), unit(1, seed=5), seq=3)  # already covered
        assert col.upsert(np.array([9000]), unit(1, seed=5), seq=4)
        col.flush()
        assert col.describe().count == 501 and col.last_applied_seq == 4
    finally:
        col.close()


def test_training_uses_a_random_sample_spread_over_the_whole_load() -> None:
    x = np.arange(100_000, dtype=np.float32)[:, None].repeat(4, axis=1)
    sample = bulk.training_sample(x, nlist=16, seed=1)
    assert sample.shape == (bulk.TRAIN_PER_LIST * 16, 4)
    assert sample[:, 0].max() > 90_000  # not the first rows of an ordered load


def test_too_few_vectors_to_train_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="nlist=64"):
        bulk.build(
            tmp_path / "b", CollectionSpec(name="b", dim=16, nlist=64), np.arange(10), unit(10)
        )


def test_the_command_line_builds_a_collection_from_npy_files(tmp_path: Path) -> None:
    np.save(tmp_path / "v.npy", unit(600))
    np.save(tmp_path / "ids.npy", np.arange(600, dtype=np.int64) * 2)
    bulk.main(
        [
            str(tmp_path / "v.npy"),
            "--name",
            "cli",
            "--ids",
            str(tmp_path / "ids.npy"),
            "--nlist",
            "8",
            "--collections-dir",
            str(tmp_path / "cols"),
        ]
    )
    col = Collection.open(tmp_path / "cols" / "cli")
    try:
        assert col.describe().count == 600 and col.last_applied_seq == 0
    finally:
        col.close()
