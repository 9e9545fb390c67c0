"""A worker loading its whole repository skips models whose backend cannot run here."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest

from services.inference_worker.app import InferenceWorker
from services.inference_worker.backends import BackendUnavailable
from services.inference_worker.config import WorkerConfig

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    """The echo model plus a torch model, in a repository of their own."""
    root = tmp_path / "models"
    for name in ("echo", "minilm-l6-torch"):
        (root / name).mkdir(parents=True)
        config = json.loads((REPO_ROOT / "models" / name / "config.json").read_text())
        (root / name / "config.json").write_text(json.dumps(config))
    return root


@pytest.fixture
def without_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make `import torch` fail as it does where torch is not installed."""
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.delitem(sys.modules, "services.inference_worker.backends.torch_backend", False)


def worker(repository: Path, tmp_path: Path, models: str = "") -> InferenceWorker:
    return InferenceWorker(
        WorkerConfig(
            model_repository=str(repository), models=models, data_dir=str(tmp_path / "data")
        )
    )


@pytest.mark.usefixtures("without_torch")
def test_a_torch_model_is_skipped_with_one_warning_when_torch_is_missing(
    repository: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="services.inference_worker.app"):
        loaded = worker(repository, tmp_path)
    assert sorted(loaded.models) == ["echo"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert "minilm-l6-torch" in warnings[0] and "torch" in warnings[0]
    assert "not installed" in warnings[0]


@pytest.mark.usefixtures("without_torch")
def test_a_torch_model_asked_for_by_name_fails_the_worker_when_torch_is_missing(
    repository: Path, tmp_path: Path
) -> None:
    with pytest.raises(BackendUnavailable, match="needs torch"):
        worker(repository, tmp_path, models="echo,minilm-l6-torch")
