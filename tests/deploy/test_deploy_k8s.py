"""The Kubernetes manifests render, validate against the API schemas, follow the mesh's policies."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import yaml
from deploy_support import DEPLOY, DRAIN_SECONDS, OVERLAYS, REPO, workloads

SERVICES = {  # k8s name -> gRPC port (docs/architecture.md)
    "router": 8001,
    "batcher": 50051,
    "inference-worker": 50052,
    "retrieval-worker": 50053,
    "tiering": 50054,
}
CRD_KINDS = {"ScaledObject", "ServiceMonitor", "PodMonitor", "PrometheusRule"}
Objects = list[dict[str, Any]]


def containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    return workload["spec"]["template"]["spec"]["containers"]


def find(objs: Objects, kind: str, name: str) -> dict[str, Any]:
    matches = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert matches, f"no {kind}/{name}"
    return matches[0]


def selects(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """Label-selector semantics (matchLabels + matchExpressions In/NotIn/Exists/DoesNotExist)."""
    if selector is None:
        return False
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {
            "In": labels.get(key) in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def pod_labels(workload: dict[str, Any]) -> dict[str, str]:
    return workload["spec"]["template"]["metadata"]["labels"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_overlay_renders_every_service_and_nats(
    overlay: str, render: Callable[[str], Objects]
) -> None:
    names = {w["metadata"]["name"] for w in workloads(render(overlay))}
    assert names == {*SERVICES, "nats"}


@pytest.mark.parametrize("version", ["1.27.0", "1.37.0"])
def test_rendered_objects_validate_strictly_against_the_kubernetes_schemas(
    objects: Objects, version: str
) -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    checked = 0
    for obj in objects:
        if obj["kind"] in CRD_KINDS:
            continue  # custom resources: no schema in kubernetes-validate
        kv.validate(obj, version, strict=True)
        checked += 1
    assert checked > 20


def test_every_container_has_startup_readiness_and_liveness_probes(objects: Objects) -> None:
    for w in workloads(objects):
        for c in containers(w):
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert probe in c, f"{w['metadata']['name']}/{c['name']} lacks {probe}"


def test_infermesh_services_probe_their_grpc_port_with_the_native_grpc_probe(
    objects: Objects,
) -> None:
    for name, port in SERVICES.items():
        w = next(w for w in workloads(objects) if w["metadata"]["name"] == name)
        c = containers(w)[0]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe].get("grpc", {}).get("port") == port, f"{name} {probe}"
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports == {"grpc": port, "metrics": 9464}
        env = {e["name"]: e for e in c["env"]}
        assert env["INFERMESH_GRPC_PORT"]["value"] == str(port)


def test_every_container_requests_and_limits_cpu_and_memory(objects: Objects) -> None:
    for w in workloads(objects):
        for c in containers(w):
            res = c.get("resources", {})
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(res.get(part, {})), (
                    f"{w['metadata']['name']} {part}"
                )


def test_every_pod_meets_the_restricted_security_profile(objects: Objects) -> None:
    for w in workloads(objects):
        spec = w["spec"]["template"]["spec"]
        name = w["metadata"]["name"]
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        assert spec.get("automountServiceAccountToken") is False, name
        for c in containers(w):
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["capabilities"]["drop"] == ["ALL"], name
            assert not sc["capabilities"].get("add"), name


def test_namespace_enforces_the_restricted_pod_security_standard(objects: Objects) -> None:
    ns = find(objects, "Namespace", "infermesh")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_every_writable_path_is_a_volume_under_var_lib_infermesh_or_tmp(objects: Objects) -> None:
    for w in workloads(objects):
        if w["metadata"]["name"] == "nats":
            continue
        for c in containers(w):
            writable = {m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")}
            assert writable == {"/var/lib/infermesh", "/tmp"}, w["metadata"]["name"]


def test_every_workload_is_selected_by_a_pod_disruption_budget(objects: Objects) -> None:
    pdbs = [o for o in objects if o["kind"] == "PodDisruptionBudget"]
    for w in workloads(objects):
        assert any(selects(p["spec"]["selector"], pod_labels(w)) for p in pdbs), w["metadata"][
            "name"
        ]


def test_no_pod_disruption_budget_blocks_draining_a_single_replica_workload(
    objects: Objects,
) -> None:
    pdbs = [o for o in objects if o["kind"] == "PodDisruptionBudget"]
    for w in workloads(objects):
        if w["spec"].get("replicas", 1) > 1:
            continue
        for p in pdbs:
            if selects(p["spec"]["selector"], pod_labels(w)):
                assert p["spec"].get("maxUnavailable", 0) >= 1, w["metadata"]["name"]


def test_every_workload_is_autoscaled_or_marked_fixed_with_a_reason(objects: Objects) -> None:
    targets = set()
    for o in objects:
        if o["kind"] in ("HorizontalPodAutoscaler", "ScaledObject"):
            ref = o["spec"]["scaleTargetRef"]
            targets.add((ref.get("kind", "Deployment"), ref["name"]))
    # Each workload has exactly one scaler: KEDA and an HPA on the same target fight.
    scalers = [o for o in objects if o["kind"] in ("HorizontalPodAutoscaler", "ScaledObject")]
    refs = [
        (o["spec"]["scaleTargetRef"].get("kind", "Deployment"), o["spec"]["scaleTargetRef"]["name"])
        for o in scalers
    ]
    assert len(refs) == len(set(refs)), refs
    for w in workloads(objects):
        key = (w["kind"], w["metadata"]["name"])
        annotations = w["metadata"].get("annotations", {})
        if annotations.get("infermesh.io/scaling") == "fixed":
            assert annotations.get("infermesh.io/scaling-reason"), key
            assert key not in targets, f"{key} is marked fixed but autoscaled"
        else:
            assert key in targets, f"{key} has no HPA or ScaledObject"
    for ref in targets:
        assert any((w["kind"], w["metadata"]["name"]) == ref for w in workloads(objects)), (
            f"scaler targets missing {ref}"
        )


def test_tiering_runs_one_replica_and_the_data_path_at_least_two(objects: Objects) -> None:
    replicas = {w["metadata"]["name"]: w["spec"]["replicas"] for w in workloads(objects)}
    assert replicas["tiering"] == 1
    for name in ("router", "batcher", "retrieval-worker"):
        assert replicas[name] >= 2, name


def test_retrieval_worker_scales_on_ingest_lag_of_the_jetstream_stream(objects: Objects) -> None:
    so = find(objects, "ScaledObject", "retrieval-worker")
    triggers = {t["type"]: t for t in so["spec"]["triggers"]}
    assert triggers["nats-jetstream"]["metadata"]["stream"] == "INFERMESH_INGEST"


def test_termination_grace_outlasts_prestop_sleep_plus_grpc_drain(objects: Objects) -> None:
    for w in workloads(objects):
        spec = w["spec"]["template"]["spec"]
        for c in containers(w):
            pre = c["lifecycle"]["preStop"]
            if "sleep" in pre:
                pre_seconds = int(pre["sleep"]["seconds"])
            elif pre["exec"]["command"][0] == "sleep":
                pre_seconds = int(pre["exec"]["command"][1])
            else:
                pre_seconds = 0  # nats lame-duck signal returns at once
            assert spec["terminationGracePeriodSeconds"] > pre_seconds + DRAIN_SECONDS, w[
                "metadata"
            ]["name"]


def test_services_advertise_their_pod_ip_from_the_downward_api(objects: Objects) -> None:
    for w in workloads(objects):
        if w["metadata"]["name"] == "nats":
            continue
        env = {e["name"]: e for e in containers(w)[0]["env"]}
        assert (
            env["INFERMESH_ADVERTISE_HOST"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
        )


def test_env_configmap_sets_only_variables_of_the_process_contract(objects: Objects) -> None:
    contract = (REPO / "docs" / "architecture.md").read_text()
    cm = next(
        o
        for o in objects
        if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("infermesh-env")
    )
    assert cm["data"]["INFERMESH_NATS_URL"].startswith("nats://nats")
    assert cm["data"]["INFERMESH_GRPC_HOST"] == "0.0.0.0"
    for key in cm["data"]:
        assert f"`{key}`" in contract, f"{key} is not in docs/architecture.md"
    for w in workloads(objects):
        for c in containers(w):
            refs = [e["configMapRef"]["name"] for e in c.get("envFrom", [])]
            if w["metadata"]["name"] != "nats":
                assert cm["metadata"]["name"] in refs, w["metadata"]["name"]


def test_router_has_a_cluster_ip_entry_and_internal_grpc_services_are_headless(
    objects: Objects,
) -> None:
    entry = find(objects, "Service", "router")
    assert entry["spec"].get("clusterIP") != "None"
    assert [p["port"] for p in entry["spec"]["ports"]] == [8001]
    for name in ("router-headless", "batcher", "inference-worker", "retrieval-worker", "tiering"):
        assert find(objects, "Service", name)["spec"]["clusterIP"] == "None", name


def test_every_service_selects_a_workload_through_named_ports(objects: Objects) -> None:
    for svc in (o for o in objects if o["kind"] == "Service"):
        matched = [
            w
            for w in workloads(objects)
            if selects({"matchLabels": svc["spec"]["selector"]}, pod_labels(w))
        ]
        assert matched, svc["metadata"]["name"]
        port_names = {p["name"] for c in containers(matched[0]) for p in c["ports"]}
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in port_names, (svc["metadata"]["name"], p)


def test_retrieval_worker_keeps_its_blocks_on_a_persistent_volume_per_shard(
    objects: Objects,
) -> None:
    sts = find(objects, "StatefulSet", "retrieval-worker")
    claims = {t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]}
    assert "data" in claims
    mounts = {m["name"]: m["mountPath"] for m in containers(sts)[0]["volumeMounts"]}
    assert mounts["data"] == "/var/lib/infermesh"
    assert not any(v["name"] == "data" for v in sts["spec"]["template"]["spec"]["volumes"])


def test_nats_runs_jetstream_on_persistent_storage(objects: Objects) -> None:
    sts = find(objects, "StatefulSet", "nats")
    assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    conf = find(objects, "ConfigMap", "nats-config")["data"]["nats.conf"]
    assert "store_dir: /data" in conf
    assert sts["spec"]["replicas"] == conf.count("nats://nats-")


def test_pods_are_annotated_for_prometheus_scraping_on_the_metrics_port(objects: Objects) -> None:
    for w in workloads(objects):
        if w["metadata"]["name"] == "nats":
            continue
        ann = w["spec"]["template"]["metadata"]["annotations"]
        assert ann["prometheus.io/scrape"] == "true"
        assert ann["prometheus.io/port"] == "9464"


def test_gpu_overlay_gives_each_worker_a_gpu_on_gpu_nodes_with_the_gpu_image(
    render: Callable[[str], Objects],
) -> None:
    objs = render("gpu")
    for w in workloads(objs):
        name = w["metadata"]["name"]
        spec = w["spec"]["template"]["spec"]
        c = containers(w)[0]
        gpus = c["resources"]["limits"].get("nvidia.com/gpu")
        if name in ("inference-worker", "retrieval-worker"):
            assert gpus == "1", name
            assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
            assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
            assert "infermesh-gpu" in c["image"]
        else:
            assert gpus is None, name
            assert "infermesh-gpu" not in c["image"], name
    so = find(objs, "ScaledObject", "inference-worker")
    assert any(
        "infermesh_gpu_utilization_ratio" in t["metadata"].get("query", "")
        for t in so["spec"]["triggers"]
    )


def test_cpu_overlay_requests_no_gpus_and_sets_real_images(
    render: Callable[[str], Objects],
) -> None:
    for w in workloads(render("cpu")):
        for c in containers(w):
            assert "nvidia.com/gpu" not in c["resources"]["limits"]
            assert "/" in c["image"] or c["image"].startswith("nats:"), c["image"]


def test_secret_ships_only_placeholders(objects: Objects) -> None:
    secret = find(objects, "Secret", "infermesh-credentials")
    assert set(secret["stringData"].values()) == {"REPLACE_ME"}


# --- NetworkPolicy: evaluate the rendered policies like a CNI would -------------------------

Endpoint = tuple[str, dict[str, str]]  # (namespace, pod labels)


def _peer_matches(peer: dict[str, Any], policy_ns: str, src: Endpoint) -> bool:
    ns, labels = src
    ns_labels = {"kubernetes.io/metadata.name": ns}
    if "ipBlock" in peer:
        return False
    if "namespaceSelector" in peer:
        if not selects(peer["namespaceSelector"], ns_labels) and peer["namespaceSelector"] != {}:
            return False
    elif ns != policy_ns:
        return False
    if "podSelector" in peer:
        return peer["podSelector"] == {} or selects(peer["podSelector"], labels)
    return True


def _rule_allows(
    rule: dict[str, Any], key: str, policy_ns: str, other: Endpoint, port: int
) -> bool:
    ports = rule.get("ports")
    if ports and not any(p.get("port") == port for p in ports):
        return False
    peers = rule.get(key)
    return not peers or any(_peer_matches(p, policy_ns, other) for p in peers)


def _direction_allows(
    policies: Objects, direction: str, me: Endpoint, other: Endpoint, port: int
) -> bool:
    key = "from" if direction == "Ingress" else "to"
    field = "ingress" if direction == "Ingress" else "egress"
    ns, labels = me
    applying = [
        p
        for p in policies
        if p["metadata"]["namespace"] == ns
        and direction in p["spec"].get("policyTypes", ["Ingress"])
        and (p["spec"]["podSelector"] == {} or selects(p["spec"]["podSelector"], labels))
    ]
    if not applying:
        return True
    return any(
        _rule_allows(r, key, ns, other, port) for p in applying for r in p["spec"].get(field, [])
    )


def allowed(policies: Objects, src: Endpoint, dst: Endpoint, port: int) -> bool:
    src_ok = src[0] != "infermesh" or _direction_allows(policies, "Egress", src, dst, port)
    dst_ok = dst[0] != "infermesh" or _direction_allows(policies, "Ingress", dst, src, port)
    return src_ok and dst_ok


def _pod(name: str) -> Endpoint:
    return ("infermesh", {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": "infermesh"})


CLIENT: Endpoint = ("clients", {"app": "client"})
PROMETHEUS: Endpoint = ("monitoring", {"app": "prometheus"})
DNS: Endpoint = ("kube-system", {"k8s-app": "kube-dns"})

REQUIRED_FLOWS = [
    (CLIENT, _pod("router"), 8001),
    (_pod("router"), _pod("batcher"), 50051),
    (_pod("batcher"), _pod("inference-worker"), 50052),
    (_pod("batcher"), _pod("retrieval-worker"), 50053),
    (_pod("retrieval-worker"), _pod("tiering"), 50054),
    (_pod("inference-worker"), _pod("tiering"), 50054),
    (_pod("tiering"), _pod("retrieval-worker"), 50053),
    (_pod("tiering"), _pod("inference-worker"), 50052),
    *[(_pod(s), _pod("nats"), 4222) for s in SERVICES],
    *[(_pod(s), DNS, 53) for s in SERVICES],
    *[(PROMETHEUS, _pod(s), 9464) for s in SERVICES],
    (_pod("nats"), _pod("nats"), 6222),
]
FORBIDDEN_FLOWS = [
    (CLIENT, _pod("batcher"), 50051),
    (CLIENT, _pod("inference-worker"), 50052),
    (CLIENT, _pod("nats"), 4222),
    (_pod("router"), _pod("inference-worker"), 50052),
    (_pod("router"), _pod("retrieval-worker"), 50053),
    (_pod("inference-worker"), _pod("batcher"), 50051),
    (_pod("router"), _pod("router"), 9464),
    (_pod("batcher"), CLIENT, 443),
]


def _flow_id(flow: tuple[Endpoint, Endpoint, int]) -> str:
    (sns, sl), (dns, dl), port = flow
    return (
        f"{sl.get('app.kubernetes.io/name', sns)}->{dl.get('app.kubernetes.io/name', dns)}:{port}"
    )


@pytest.mark.parametrize("flow", REQUIRED_FLOWS, ids=_flow_id)
def test_network_policy_allows_the_mesh_flow(
    render: Callable[[str], Objects], flow: tuple[Endpoint, Endpoint, int]
) -> None:
    policies = [o for o in render("cpu") if o["kind"] == "NetworkPolicy"]
    assert allowed(policies, *flow)


@pytest.mark.parametrize("flow", FORBIDDEN_FLOWS, ids=_flow_id)
def test_network_policy_denies_flows_outside_the_mesh(
    render: Callable[[str], Objects], flow: tuple[Endpoint, Endpoint, int]
) -> None:
    policies = [o for o in render("cpu") if o["kind"] == "NetworkPolicy"]
    default_deny = [p for p in policies if p["spec"]["podSelector"] == {}]
    assert default_deny and set(default_deny[0]["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    assert not allowed(policies, *flow)


def test_base_kustomization_lists_every_manifest_file_in_base() -> None:
    base = DEPLOY / "k8s" / "base"
    listed = set(yaml.safe_load((base / "kustomization.yaml").read_text())["resources"])
    on_disk = {p.name for p in base.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk
