"""The compose dev stack is valid compose, wires the process contract, and waits on health."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_support import DEPLOY, require_tool, run

COMPOSE = DEPLOY / "compose" / "compose.yaml"
SERVICES = {
    "router": 8001,
    "batcher": 50051,
    "inference-worker": 50052,
    "retrieval-worker": 50053,
    "tiering": 50054,
}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_file_matches_the_compose_specification_schema() -> None:
    tool = require_tool(
        "check-jsonschema", "pip install check-jsonschema; its builtin schemas work offline"
    )
    proc = run([tool, "--builtin-schema", "vendor.compose-spec", str(COMPOSE)])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_docker_compose_accepts_the_stack() -> None:
    tool = require_tool("docker-compose", "apt-get install docker-compose")
    proc = run([tool, "-f", str(COMPOSE), "config", "-q"])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_infermesh_service_runs_its_own_command_from_one_image(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    images = {services[name]["image"] for name in SERVICES}
    assert len(images) == 1
    for name in SERVICES:
        assert services[name]["command"] == [name.replace("-", "_")]
    assert services["router"]["build"]["dockerfile"] == "deploy/docker/Dockerfile"


def test_every_infermesh_service_has_a_grpc_health_check_on_its_port(
    compose: dict[str, Any],
) -> None:
    for name, port in SERVICES.items():
        test = compose["services"][name]["healthcheck"]["test"]
        assert test == ["CMD", "infermesh", "health", f"localhost:{port}"], name


def test_services_start_after_nats_is_healthy_and_router_after_the_batcher(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    assert "healthcheck" in services["nats"]
    for name in SERVICES:
        assert services[name]["depends_on"]["nats"]["condition"] == "service_healthy", name
    assert services["router"]["depends_on"]["batcher"]["condition"] == "service_healthy"


def test_nats_runs_jetstream_with_a_store_on_a_volume(compose: dict[str, Any]) -> None:
    nats = compose["services"]["nats"]
    cmd = nats["command"]
    assert "-js" in cmd and cmd[cmd.index("-sd") + 1] == "/data"
    assert any(v.endswith(":/data") for v in nats["volumes"])


def test_services_get_the_process_contract_env(compose: dict[str, Any]) -> None:
    for name, port in SERVICES.items():
        env = compose["services"][name]["environment"]
        assert env["INFERMESH_NATS_URL"] == "nats://nats:4222"
        assert env["INFERMESH_GRPC_HOST"] == "0.0.0.0"
        assert env["INFERMESH_GRPC_PORT"] == str(port)
        assert env["INFERMESH_ADVERTISE_HOST"] == name
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4317"


def test_router_is_published_on_8001_and_ui_ports_are_open(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert "8001:8001" in services["router"]["ports"]
    assert "16686:16686" in services["jaeger"]["ports"]
    assert "3000:3000" in services["grafana"]["ports"]
    for name in set(SERVICES) - {"router"}:
        assert "ports" not in services[name], f"{name} is internal"


def test_containers_run_read_only_with_writable_data_and_tmp_only(compose: dict[str, Any]) -> None:
    for name in SERVICES:
        svc = compose["services"][name]
        assert svc["read_only"] is True
        assert svc["tmpfs"] == ["/tmp"]
        assert svc["cap_drop"] == ["ALL"]
        assert [v.split(":")[1] for v in svc["volumes"]] == ["/var/lib/infermesh"]
        assert svc["stop_grace_period"] == "30s"


def test_every_file_compose_mounts_exists(compose: dict[str, Any]) -> None:
    mounted = 0
    for svc in compose["services"].values():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE.parent / source).exists(), source
                mounted += 1
    assert mounted >= 4


def test_otel_collector_exports_traces_to_jaeger_over_otlp() -> None:
    config = yaml.safe_load((DEPLOY / "compose" / "otel-collector.yaml").read_text())
    pipeline = config["service"]["pipelines"]["traces"]
    assert pipeline["receivers"] == ["otlp"]
    assert "4317" in config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
    (exporter,) = pipeline["exporters"]
    assert (
        exporter.startswith("otlp") and config["exporters"][exporter]["endpoint"] == "jaeger:4317"
    )


def test_prometheus_scrapes_every_service_metrics_port_and_loads_the_alert_rules() -> None:
    path = DEPLOY / "observability" / "prometheus" / "prometheus.yml"
    config = yaml.safe_load(path.read_text())
    targets = {
        t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]
    }
    assert {f"{name}:9464" for name in SERVICES} <= targets
    for rule_file in config["rule_files"]:
        assert (path.parent / rule_file).exists()


def test_grafana_provisions_the_prometheus_datasource_and_the_dashboard(
    compose: dict[str, Any],
) -> None:
    grafana = DEPLOY / "observability" / "grafana"
    ds = yaml.safe_load((grafana / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    assert ds["datasources"][0]["url"] == "http://prometheus:9090"
    provider = yaml.safe_load(
        (grafana / "provisioning" / "dashboards" / "infermesh.yaml").read_text()
    )
    path = Path(provider["providers"][0]["options"]["path"])
    mounts = compose["services"]["grafana"]["volumes"]
    assert any(
        v.split(":")[1].startswith(str(path)) and v.split(":")[0].endswith(".json") for v in mounts
    )
