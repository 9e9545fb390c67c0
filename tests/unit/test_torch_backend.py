"""The torch backend embeds like the original sentence-transformers model, on CPU and GPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip(
    "torch",
    reason="torch not installed: the torch backend is tested where torch exists "
    "(pip install torch==2.13.0)",
)

from services.inference_worker.backends import Item  # noqa: E402 (after the torch skip)
from services.inference_worker.backends.factory import make_backend  # noqa: E402
from services.inference_worker.backends.torch_backend import TorchBackend  # noqa: E402
from services.inference_worker.repository import load_model  # noqa: E402
from shared.errors import InvalidArgument  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
FIXTURE = REPO_ROOT / "tests" / "fixtures" / "minilm_reference.npz"

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA GPU: the fp16 path runs only on a GPU"
)


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    with np.load(FIXTURE) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def cpu_backend() -> TorchBackend:
    return TorchBackend({"device": "cpu", "fp16": True}, threads=2)


def worst_cosine(a: np.ndarray, b: np.ndarray) -> float:
    cosine = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(cosine.min())


def test_cpu_fp32_matches_sentence_transformers_to_cosine_0_999(
    cpu_backend: TorchBackend, reference: dict[str, np.ndarray]
) -> None:
    sentences = [str(s) for s in reference["sentences"]]
    (out,) = cpu_backend.execute([Item(texts=sentences)])
    embedding = out["embedding"]
    assert embedding.dtype == np.float32 and embedding.shape == (len(sentences), 384)
    assert worst_cosine(embedding, reference["embeddings"]) >= 0.999
    np.testing.assert_allclose(np.linalg.norm(embedding, axis=1), 1.0, atol=1e-5)


def test_fp16_is_ignored_on_cpu_where_half_precision_is_slower(
    cpu_backend: TorchBackend,
) -> None:
    assert cpu_backend.device.type == "cpu"
    assert cpu_backend.dtype == torch.float32


def test_text_and_pretokenized_items_in_one_batch_come_back_in_order(
    cpu_backend: TorchBackend,
) -> None:
    assert cpu_backend.encoder is not None
    texts = ["A man is playing a guitar.", "The weather is cold today, with a strong wind."]
    ids, mask = cpu_backend.encoder.encode([texts[1]])
    short_ids, _ = cpu_backend.encoder.encode(["hi"])
    alone = cpu_backend.execute([Item(texts=[t]) for t in [*texts, "hi"]])
    mixed = cpu_backend.execute(
        [
            Item(texts=[texts[0]]),
            Item(inputs={"input_ids": ids, "attention_mask": mask}),
            # No attention_mask: every token counts, as in the onnx backend.
            Item(inputs={"input_ids": short_ids}),
            Item(texts=texts),
        ]
    )
    assert [r["embedding"].shape for r in mixed] == [(1, 384), (1, 384), (1, 384), (2, 384)]
    for got, want in zip(mixed[:3], alone, strict=True):
        np.testing.assert_allclose(got["embedding"], want["embedding"], atol=1e-5)
    np.testing.assert_allclose(
        mixed[3]["embedding"],
        np.concatenate([alone[0]["embedding"], alone[1]["embedding"]]),
        atol=1e-5,
    )


def test_token_ids_outside_the_vocabulary_are_refused_before_reaching_the_device(
    cpu_backend: TorchBackend,
) -> None:
    ids = np.array([[101, 10**6, 102]], dtype=np.int64)
    with pytest.raises(InvalidArgument, match="input_ids must lie in"):
        cpu_backend.execute([Item(inputs={"input_ids": ids})])


def test_a_row_without_real_tokens_embeds_to_zeros_not_nan(cpu_backend: TorchBackend) -> None:
    ids = np.array([[101, 7592, 102], [0, 0, 0]], dtype=np.int64)
    mask = np.array([[1, 1, 1], [0, 0, 0]], dtype=np.int64)
    out = cpu_backend.embed(ids, mask)
    assert not np.isnan(out).any()
    np.testing.assert_array_equal(out[1], 0.0)


def test_fp16_weights_copy_is_loaded_from_a_directory(
    tmp_path: Path, cpu_backend: TorchBackend, reference: dict[str, np.ndarray]
) -> None:
    from safetensors.numpy import load_file, save_file

    from services.inference_worker.bert_onnx import default_model_dir

    source = default_model_dir()
    weights = load_file(str(source / "model.safetensors"))
    save_file(
        {k: v.astype(np.float16) for k, v in weights.items() if v.dtype == np.float32},
        str(tmp_path / "model.fp16.safetensors"),
    )
    for name in ("config.json", "tokenizer.json", "sentence_bert_config.json"):
        (tmp_path / name).write_bytes((source / name).read_bytes())
    backend = TorchBackend({"device": "cpu", "weights": str(tmp_path)}, threads=2)
    sentences = [str(s) for s in reference["sentences"][:8]]
    (out,) = backend.execute([Item(texts=sentences)])
    assert worst_cosine(out["embedding"], reference["embeddings"][:8]) >= 0.999


def test_the_repository_model_is_built_by_the_factory_with_its_output_name(
    tmp_path: Path,
) -> None:
    config = load_model(REPO_ROOT / "models" / "minilm-l6-torch")
    backend = make_backend(config, REPO_ROOT / "models" / "minilm-l6-torch", tmp_path, 2)
    try:
        (out,) = backend.execute([Item(texts=["hello world"])])
        assert list(out) == ["embedding"]
        assert out["embedding"].shape == (1, 384)
    finally:
        backend.close()


@needs_cuda
def test_gpu_fp16_matches_sentence_transformers_to_cosine_0_999(
    reference: dict[str, np.ndarray],
) -> None:
    backend = TorchBackend({"fp16": True})
    assert backend.device.type == "cuda" and backend.dtype == torch.float16
    sentences = [str(s) for s in reference["sentences"]]
    (out,) = backend.execute([Item(texts=sentences)])
    assert out["embedding"].dtype == np.float32
    assert worst_cosine(out["embedding"], reference["embeddings"]) >= 0.999


# --- shape buckets, CUDA graphs, threads ----------------------------------------------------

needs_cuda_graphs = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA GPU: CUDA graphs are captured only on a GPU (bench/gpu_inference.py "
    "runs these paths on the GPU host)",
)

SENTENCES = [
    "A man is playing a guitar.",
    "The weather is cold today, with a strong wind from the north and rain by evening.",
    "hi",
    "Vector search partitions a collection into inverted lists and probes a few of them.",
    "Dynamic batching trades a little queueing delay for much larger batches.",
]


@pytest.fixture(scope="module")
def bucketed_backend() -> TorchBackend:
    return TorchBackend({"device": "cpu", "buckets": True}, threads=2)


def test_a_size_is_rounded_up_to_the_smallest_bucket_that_holds_it() -> None:
    from services.inference_worker.backends.torch_backend import BATCH_BUCKETS, bucket_of

    assert bucket_of(1, BATCH_BUCKETS) == 1
    assert bucket_of(3, BATCH_BUCKETS) == 4
    assert bucket_of(32, BATCH_BUCKETS) == 32
    assert bucket_of(33, BATCH_BUCKETS) == 64
    assert bucket_of(BATCH_BUCKETS[-1] + 1, BATCH_BUCKETS) is None


def test_a_batch_is_padded_to_row_and_token_buckets_capped_by_max_seq_length(
    bucketed_backend: TorchBackend,
) -> None:
    assert bucketed_backend.bucket(3, 20) == (4, 32)
    assert bucketed_backend.bucket(32, 32) == (32, 32)
    # Past the largest row bucket the rows stay as they are (that batch runs eagerly).
    assert bucketed_backend.bucket(5000, 200) == (5000, 256)
    small = TorchBackend(
        {"device": "cpu", "buckets": True, "max_seq_length": 100, "max_graph_rows": 64}, threads=2
    )
    assert small.seq_buckets == (16, 32, 64, 100)
    assert small.bucket(65, 70) == (65, 100)


def test_bucketing_pads_rows_and_tokens_without_changing_any_embedding(
    cpu_backend: TorchBackend, bucketed_backend: TorchBackend
) -> None:
    assert not cpu_backend.bucketing and bucketed_backend.bucketing
    # 5 rows of up to ~20 tokens run as [8, 32]: 3 padded rows, padded positions in each.
    items = [Item(texts=[t]) for t in SENTENCES]
    plain = cpu_backend.execute(items)
    padded = bucketed_backend.execute(items)
    for got, want in zip(padded, plain, strict=True):
        assert got["embedding"].shape == (1, 384)
        np.testing.assert_allclose(got["embedding"], want["embedding"], atol=1e-5)


def test_the_fast_tokenizer_path_gives_the_ids_of_the_model_tokenizer(
    cpu_backend: TorchBackend, reference: dict[str, np.ndarray]
) -> None:
    from services.inference_worker.text import TextEncoder

    assert cpu_backend.encoder is not None
    sentences = [str(s) for s in reference["sentences"]]
    plain = TextEncoder(cpu_backend.model_files)
    fast_ids, fast_mask = cpu_backend.encoder.encode(sentences)
    ids, mask = plain.encode(sentences)
    np.testing.assert_array_equal(fast_ids, ids)
    np.testing.assert_array_equal(fast_mask, mask)


def test_two_threads_executing_at_once_each_get_their_own_embeddings(
    bucketed_backend: TorchBackend,
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    batches = [[Item(texts=[t]) for t in SENTENCES[i:] + SENTENCES[:i]] for i in range(4)]
    expected = [bucketed_backend.execute(b) for b in batches]
    with ThreadPoolExecutor(max_workers=2) as pool:
        # Each batch many times, interleaved: a shared buffer or a race would mix rows.
        futures = [pool.submit(bucketed_backend.execute, batches[i % 4]) for i in range(24)]
        results = [f.result(timeout=120) for f in futures]
    for i, got in enumerate(results):
        for g, w in zip(got, expected[i % 4], strict=True):
            np.testing.assert_allclose(g["embedding"], w["embedding"], atol=1e-5)


def test_cuda_graphs_are_ignored_on_cpu_so_one_config_serves_both() -> None:
    backend = TorchBackend({"device": "cpu", "cuda_graphs": True}, threads=2)
    assert not backend.cuda_graphs and not backend.bucketing and backend.graphs == {}


def test_cuda_graphs_and_torch_compile_together_are_refused() -> None:
    with pytest.raises(InvalidArgument, match="set one"):
        TorchBackend({"device": "cpu", "cuda_graphs": True, "compile": True}, threads=2)


@needs_cuda_graphs
def test_a_cuda_graph_is_captured_once_per_bucket_and_matches_eager_execution() -> None:
    eager = TorchBackend({"fp16": True, "cuda_graphs": False})
    graphed = TorchBackend({"fp16": True, "cuda_graphs": True, "max_graphs": 3})
    assert graphed.cuda_graphs and graphed.bucketing and not eager.bucketing
    captured = len(graphed.graphs)  # the warm-up batch's bucket
    items = [Item(texts=[t]) for t in SENTENCES]
    for _ in range(3):
        for got, want in zip(graphed.execute(items), eager.execute(items), strict=True):
            assert worst_cosine(got["embedding"], want["embedding"]) >= 0.9999
    assert len(graphed.graphs) == captured + 1  # [8, 32], reused on the 2nd and 3rd call
    # Past max_graphs new buckets run eagerly, still correct.
    for n in (1, 20, 40):
        batch = [Item(texts=[SENTENCES[i % 5]]) for i in range(n)]
        for got, ref in zip(graphed.execute(batch), eager.execute(batch), strict=True):
            assert worst_cosine(got["embedding"], ref["embedding"]) >= 0.9999
    assert len(graphed.graphs) == 3
    graphed.close()
    eager.close()


@needs_cuda_graphs
def test_two_threads_replaying_cuda_graphs_at_once_each_get_their_own_embeddings() -> None:
    from concurrent.futures import ThreadPoolExecutor

    backend = TorchBackend({"fp16": True, "cuda_graphs": True})
    batches = [[Item(texts=[t]) for t in SENTENCES[i:] + SENTENCES[:i]] for i in range(4)]
    expected = [backend.execute(b) for b in batches]
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(backend.execute, batches[i % 4]) for i in range(200)]
        results = [f.result(timeout=120) for f in futures]
    for i, got in enumerate(results):
        for g, w in zip(got, expected[i % 4], strict=True):
            np.testing.assert_array_equal(g["embedding"], w["embedding"])
    backend.close()
