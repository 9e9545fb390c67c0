"""Fixtures for the deployment checks: manifests rendered once per overlay."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import yaml
from deploy_support import DEPLOY, OVERLAYS, require_tool, run


@pytest.fixture(scope="session")
def render() -> Callable[[str], list[dict[str, Any]]]:
    """Render an overlay with `kubectl kustomize` into a list of objects (cached)."""
    cache: dict[str, list[dict[str, Any]]] = {}

    def _render(overlay: str) -> list[dict[str, Any]]:
        if overlay not in cache:
            kubectl = require_tool("kubectl", "kubectl renders the kustomize overlays")
            proc = run([kubectl, "kustomize", str(DEPLOY / "k8s" / "overlays" / overlay)])
            assert proc.returncode == 0, proc.stderr
            cache[overlay] = [d for d in yaml.safe_load_all(proc.stdout) if d]
        return cache[overlay]

    return _render


@pytest.fixture(scope="session", params=OVERLAYS)
def objects(
    request: pytest.FixtureRequest, render: Callable[[str], list[dict[str, Any]]]
) -> list[dict[str, Any]]:
    return render(request.param)
