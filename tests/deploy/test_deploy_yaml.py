"""Every YAML file under deploy/ passes yamllint."""

from __future__ import annotations

from deploy_support import DEPLOY, require_tool, run


def test_all_deploy_yaml_passes_yamllint_strictly() -> None:
    yamllint = require_tool("yamllint", "pip install yamllint")
    files = sorted(str(p) for p in DEPLOY.rglob("*.y*ml"))
    assert len(files) >= 15
    proc = run([yamllint, "--strict", "-c", str(DEPLOY / ".yamllint.yaml"), *files])
    assert proc.returncode == 0, proc.stdout + proc.stderr
