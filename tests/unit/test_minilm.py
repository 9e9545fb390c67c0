"""The torch-free minilm-l6 ONNX build agrees with the original sentence-transformers model."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from services.inference_worker.build_model import MODEL_NAME, build
from services.inference_worker.text import TextEncoder

REPO_ROOT = Path(__file__).resolve().parents[2]
FIXTURE = REPO_ROOT / "tests" / "fixtures" / "minilm_reference.npz"


class Built:
    """A model built once for the whole test session, with how long the build took."""

    def __init__(self, out_dir: Path, model_path: Path, seconds: float) -> None:
        self.out_dir = out_dir
        self.model_path = model_path
        self.seconds = seconds


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    out_dir = tmp_path_factory.mktemp("models")
    start = time.perf_counter()
    model_path = build(out_dir)
    return Built(out_dir, model_path, time.perf_counter() - start)


@pytest.fixture(scope="session")
def session(built: Built) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(built.model_path), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="session")
def encoder(built: Built) -> TextEncoder:
    # Load from the build directory, not the source package: the build must be self-contained.
    return TextEncoder(built.model_path.parent)


@pytest.fixture(scope="session")
def reference() -> dict[str, np.ndarray]:
    with np.load(FIXTURE) as z:
        return {k: z[k] for k in z.files}


def embed(session: ort.InferenceSession, encoder: TextEncoder, texts: list[str]) -> np.ndarray:
    input_ids, attention_mask = encoder.encode(texts)
    (out,) = session.run(["embedding"], {"input_ids": input_ids, "attention_mask": attention_mask})
    return np.asarray(out)


@pytest.fixture(scope="session")
def reference_embeddings(
    session: ort.InferenceSession, encoder: TextEncoder, reference: dict[str, np.ndarray]
) -> np.ndarray:
    return embed(session, encoder, [str(s) for s in reference["sentences"]])


def test_building_takes_seconds_not_minutes(built: Built) -> None:
    assert built.model_path == built.out_dir / MODEL_NAME / "model.onnx"
    assert built.model_path.is_file()
    assert built.seconds < 60


def test_every_reference_sentence_matches_sentence_transformers_to_cosine_0_999(
    reference: dict[str, np.ndarray], reference_embeddings: np.ndarray
) -> None:
    ref = reference["embeddings"]
    assert len(ref) >= 60
    cosine = np.sum(ref * reference_embeddings, axis=1) / (
        np.linalg.norm(ref, axis=1) * np.linalg.norm(reference_embeddings, axis=1)
    )
    worst = int(np.argmin(cosine))
    assert cosine[worst] >= 0.999, f"sentence {reference['sentences'][worst]!r}: {cosine[worst]}"


def test_each_paraphrase_pair_is_closer_than_every_unrelated_pair(
    reference: dict[str, np.ndarray], reference_embeddings: np.ndarray
) -> None:
    sim = reference_embeddings @ reference_embeddings.T
    paraphrase = [float(sim[a, b]) for a, b in reference["paraphrase_pairs"]]
    unrelated = [float(sim[a, b]) for a, b in reference["unrelated_pairs"]]
    assert min(paraphrase) > max(unrelated)


def test_embeddings_are_float32_unit_vectors_of_dimension_384(
    session: ort.InferenceSession, encoder: TextEncoder
) -> None:
    out = embed(session, encoder, ["one", "two sentences here", ""])
    assert out.shape == (3, 384)
    assert out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


def test_text_beyond_max_seq_length_is_truncated_to_256_tokens(
    session: ort.InferenceSession, encoder: TextEncoder
) -> None:
    long_text = " ".join(f"word{i}" for i in range(2000))
    input_ids, attention_mask = encoder.encode([long_text])
    assert input_ids.shape == attention_mask.shape == (1, 256)
    assert attention_mask.all()
    # Whatever follows the first 256 tokens is dropped, so it cannot move the embedding.
    a, b = embed(session, encoder, [long_text, long_text + " an entirely different ending"])
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_padding_in_a_batch_does_not_change_an_embedding(
    session: ort.InferenceSession, encoder: TextEncoder
) -> None:
    short = "A short sentence."
    alone = embed(session, encoder, [short])[0]
    in_batch = embed(session, encoder, [short, "a much longer sentence " * 20])[0]
    np.testing.assert_allclose(alone, in_batch, atol=1e-5)


def test_batches_are_padded_to_their_longest_text(encoder: TextEncoder) -> None:
    input_ids, attention_mask = encoder.encode(["hi", "hello there my friend"])
    assert input_ids.dtype == attention_mask.dtype == np.int64
    assert input_ids.shape == (2, 6)  # [CLS] hello there my friend [SEP]
    assert attention_mask[0].tolist() == [1, 1, 1, 0, 0, 0]


def test_fixed_length_encoder_pads_and_truncates_to_that_length(built: Built) -> None:
    fixed = TextEncoder(built.model_path.parent, fixed_length=32)
    input_ids, attention_mask = fixed.encode(["hi", "word " * 100])
    assert input_ids.shape == attention_mask.shape == (2, 32)
    assert attention_mask[0].sum() == 3
    assert attention_mask[1].all()


def test_building_twice_skips_the_second_build(built: Built) -> None:
    before = built.model_path.stat()
    assert build(built.out_dir) == built.model_path
    after = built.model_path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_build_cli_reports_a_failure_in_one_line_with_nonzero_exit(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    result = subprocess.run(
        [sys.executable, "-m", "services.inference_worker.build_model", "--out", str(not_a_dir)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "300"},
        timeout=120,
        check=False,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr


def test_inference_worker_modules_never_import_torch() -> None:
    code = (
        "import sys\n"
        "import services.inference_worker.bert_onnx, services.inference_worker.text\n"
        "import services.inference_worker.build_model\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True, timeout=120)
