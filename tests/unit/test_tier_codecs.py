"""Per-tier codecs: warm (and hot) blocks held as float16 or SQ8, searched correctly, sized right.

The block files keep the collection's dtype; a codec only changes what a fast tier holds. A
compressed tier's results are exact *for the compressed vectors*: these tests compare against
a brute-force scan of the decoded vectors of the probed lists, and check that each format
finds nearly all of float32's top-k on clustered data.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import faiss
import numpy as np
import pytest
from test_search import DIM, NLIST, N, mixture

from services.retrieval_worker.blocks import SQ8, Codec, Tier, WarmBlock
from services.retrieval_worker.collection import Collection
from services.retrieval_worker.config import RetrievalConfig
from services.retrieval_worker.gpu_tier import hot_source
from services.retrieval_worker.holdings import Held, Holdings
from services.retrieval_worker.manifest import CollectionSpec
from services.retrieval_worker.tiering import TierAgent
from shared.config import ConfigError, from_env
from shared.events import BlockAccess, TierMove, TierMoved


def build(root: Path, codec: Codec, metric: str = "ip", default: Tier = Tier.WARM,
          sources: Any = None) -> Collection:
    spec = CollectionSpec(name="q", dim=DIM, nlist=NLIST, metric=metric,  # type: ignore[arg-type]
                          lists_per_block=4)
    col = Collection.create(root, spec, default_tier=default, warm_codec=codec, sources=sources)
    x = mixture(N, 1)
    col.train(x)
    col.upsert(np.arange(N) * 7 + 3, x, seq=1)
    col.flush()
    return col


def decoded_rows(col: Collection) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every row as its tier holds it (decoded to float32), its id and its IVF list."""
    vs, ids, lists = [], [], []
    for b, view in col._views.items():
        for j in range(len(col.spec.lists_of_block(b))):
            for chunk in view.chunks(j):
                v = chunk.vectors
                v = chunk.sq8.decode(v) if chunk.sq8 is not None else v.astype(np.float32)
                vs.append(v)
                ids.append(np.asarray(chunk.ids))
                lists.append(np.full(len(v), b * col.spec.lists_per_block + j))
    return np.concatenate(vs), np.concatenate(ids), np.concatenate(lists)


def brute_force(col: Collection, q: np.ndarray, k: int, nprobe: int) -> np.ndarray:
    """Top-k ids per query over the probed lists, scored on the held (decoded) vectors."""
    x, ids, lists = decoded_rows(col)
    quant = faiss.IndexFlatIP(DIM) if col.spec.metric == "ip" else faiss.IndexFlatL2(DIM)
    quant.add(col.centroids)
    _, probe = quant.search(q, nprobe)
    out = np.full((len(q), k), -1, dtype=np.int64)
    for i in range(len(q)):
        sel = np.isin(lists, probe[i])
        xs = x[sel]
        s = xs @ q[i] if col.spec.metric == "ip" else -((xs - q[i]) ** 2).sum(1)
        top = np.argsort(-s, kind="stable")[:k]
        out[i, : top.size] = ids[sel][top]
    return out


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([np.isin(x[x >= 0], y).mean() for x, y in zip(a, b, strict=True)]))


def test_sq8_codes_are_faiss_qt_8bit_codes_and_decode_within_half_a_step() -> None:
    x = mixture(500, 3)
    sq = SQ8.train(x)
    codes = sq.encode(x)
    ref = faiss.ScalarQuantizer(DIM, faiss.ScalarQuantizer.QT_8bit)
    faiss.copy_array_to_vector(np.concatenate([sq.vmin, sq.vdiff]), ref.trained)
    assert (codes == ref.compute_codes(x)).mean() > 0.999  # float rounding at step edges
    np.testing.assert_allclose(sq.decode(codes), ref.decode(codes), rtol=0, atol=1e-6)
    err = np.abs(sq.decode(codes) - x)
    assert (err <= sq.vdiff / 510 + 1e-6).all()
    q = mixture(20, 4)
    exact = q @ x.T
    np.testing.assert_allclose(sq.scores(q, codes), q @ sq.decode(codes).T, rtol=0, atol=1e-4)
    assert (np.abs(sq.scores(q, codes) - exact) <= sq.max_error(q)[:, None] + 1e-5).all()


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("codec", [Codec.FLOAT16, Codec.SQ8])
def test_compressed_warm_blocks_return_the_exact_top_k_of_what_they_hold(
    tmp_path: Path, codec: Codec, metric: str
) -> None:
    col = build(tmp_path / "c", codec, metric)
    q = mixture(60, 2)
    want = brute_force(col, q, 10, 6)
    searcher = col._searcher
    assert searcher is not None
    if codec is Codec.SQ8 and metric == "ip":
        assert searcher._sq8 is not None and searcher._sq8.stack is not None  # FAISS scores them
    scores = {}
    for path in ("grouped", "faiss"):
        scores[path], got, _ = searcher.search(q, 10, 6, path=path)  # type: ignore[arg-type]
        assert overlap(got, want) > 0.995, path  # equal but for exact ties
    np.testing.assert_allclose(scores["faiss"], scores["grouped"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dim", [24, 32, 384])
def test_faiss_scores_sq8_blocks_as_numpy_does_at_any_dimension(tmp_path: Path, dim: int) -> None:
    # FAISS 1.15.1's QT_8bit_direct scored wrong at dimensions that are multiples of 16
    rng = np.random.default_rng(dim)
    centres = rng.standard_normal((40, dim)).astype(np.float32)
    x = centres[rng.integers(0, 40, 3000)] + 0.5 * rng.standard_normal((3000, dim)).astype(
        np.float32)
    spec = CollectionSpec(name="d", dim=dim, nlist=32, lists_per_block=4)
    col = Collection.create(tmp_path / "d", spec, warm_codec=Codec.SQ8)
    col.train(x)
    col.upsert(np.arange(3000), x, seq=1)
    col.flush()
    searcher = col._searcher
    assert searcher is not None and searcher._sq8 is not None
    q = x[:40] + 0.05
    s_np, i_np, _ = searcher.search(q, 10, 3, path="grouped")
    s_fa, i_fa, _ = searcher.search(q, 10, 3, path="faiss")
    assert overlap(i_fa, i_np) > 0.99
    np.testing.assert_allclose(s_fa, s_np, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("codec", [Codec.FLOAT16, Codec.SQ8])
def test_compressed_warm_blocks_find_nearly_all_of_float32s_top_k(
    tmp_path: Path, codec: Codec
) -> None:
    plain = build(tmp_path / "f32", Codec.NONE)
    packed = build(tmp_path / "packed", codec)
    q = mixture(200, 5)
    ref = plain.search(q, 10, 6)[1]
    got = packed.search(q, 10, 6)[1]
    assert overlap(got, ref) >= (0.99 if codec is Codec.FLOAT16 else 0.95)
    assert not np.array_equal(decoded_rows(packed)[0], decoded_rows(plain)[0])  # compressed


@pytest.mark.parametrize(("codec", "row"), [(Codec.NONE, DIM * 4 + 8),
                                            (Codec.FLOAT16, DIM * 2 + 8),
                                            (Codec.SQ8, DIM + 8)])
def test_a_warm_block_takes_the_bytes_of_its_codec(
    tmp_path: Path, codec: Codec, row: int
) -> None:
    col = build(tmp_path / "c", codec)
    for b, view in col._views.items():
        assert isinstance(view, WarmBlock)
        ranges = 2 * DIM * 4 if codec is Codec.SQ8 else 0
        assert view.nbytes == view.count * row + ranges
        assert col.block_bytes()[b] == view.nbytes


def test_cold_blocks_report_the_smaller_size_they_would_take_warm(tmp_path: Path) -> None:
    col = build(tmp_path / "c", Codec.SQ8, default=Tier.COLD)
    cold = col.block_bytes()
    warm = col.bytes_in(Tier.WARM)
    assert set(warm) == set(cold)
    b = next(iter(cold))
    col.place(b, Tier.WARM)
    assert col.block_bytes()[b] == warm[b]  # the estimate is what the block takes
    assert warm[b] * 3 < cold[b]
    assert col.bytes_in(Tier.COLD)[b] <= cold[b]


async def test_the_agent_budgets_compressed_blocks_by_their_compressed_size(
    tmp_path: Path,
) -> None:
    col = build(tmp_path / "q", Codec.SQ8, default=Tier.COLD)
    holdings = Holdings(tmp_path, flush_rows=10**9)
    holdings.held["q"] = Held(col)
    sent: list[Any] = []

    class Bus:
        async def publish(self, subject: str, event: Any) -> None:
            sent.append(event)

    warm = col.bytes_in(Tier.WARM)
    # room for every block as SQ8 codes, for a quarter of them as float32 files
    agent = TierAgent(Bus(), holdings, "w", period_s=1.0,  # type: ignore[arg-type]
                      hot_budget=0, warm_budget=sum(warm.values()))
    for b in sorted(warm):
        await agent.on_move(TierMove(collection="q", block=b, tier="warm"))
    assert all(isinstance(m, TierMoved) and m.ok for m in sent)
    assert set(col.placement().values()) == {Tier.WARM}
    report = agent.accesses()[0]
    assert isinstance(report, BlockAccess)
    assert report.bytes_in["warm"] == col.block_bytes()


def test_the_codec_is_chosen_by_environment_and_a_typo_names_the_variable() -> None:
    cfg = from_env(RetrievalConfig, {"INFERMESH_WARM_CODEC": "sq8"})
    assert Codec(cfg.warm_codec) is Codec.SQ8
    with pytest.raises(ConfigError, match="INFERMESH_WARM_CODEC"):
        from_env(RetrievalConfig, {"INFERMESH_WARM_CODEC": "int4"})


@pytest.fixture
def torch() -> ModuleType:
    return pytest.importorskip(
        "torch",
        reason="torch is not installed: the hot (GPU) tier is tested where torch exists "
        "(pip install torch==2.13.0 gives a CPU build to run these)",
    )


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("codec", [Codec.FLOAT16, Codec.SQ8])
def test_hot_blocks_held_compressed_return_what_warm_blocks_of_the_same_codec_return(
    torch: ModuleType, tmp_path: Path, codec: Codec, metric: str
) -> None:
    hot = hot_source(metric, allow_cpu=True, codec=codec)
    col = build(tmp_path / "c", codec, metric, sources={Tier.HOT: hot})
    q = mixture(80, 6)
    warm = col.search(q, 10, 6)
    for b in range(col.spec.nblocks):
        col.place(b, Tier.HOT)
    hot_result = col.search(q, 10, 6)
    # the same rows in the same order train the same ranges: the same codes, the same scores
    assert overlap(hot_result[1], warm[1]) > 0.995
    np.testing.assert_allclose(np.sort(hot_result[0], 1), np.sort(warm[0], 1), rtol=1e-4,
                               atol=1e-4)
    per_row = DIM + 8 if codec is Codec.SQ8 else 2 * DIM + 8
    for view in col._views.values():
        assert view.nbytes >= view.count * per_row
