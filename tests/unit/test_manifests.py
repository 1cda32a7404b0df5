"""The Kubernetes manifests: schema-valid (kubernetes-validate, strict), and consistent with each other and
with the code they run (settings names, CLI subcommands, probe paths, RBAC ServiceAccount)."""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from deployments.bridge import BridgeSettings
from tasks.settings import Settings

K8S_DIR = Path(__file__).resolve().parents[2] / "deployments" / "kubernetes"
K8S_VERSION = "1.32.0"  # kubectl on our machines; the manifests use only long-stable APIs
MY_FILES = ("config.yaml", "secrets.yaml", "runner.yaml", "bridge.yaml")


def docs(*names: str) -> list[dict]:
    files = [K8S_DIR / n for n in names] if names else sorted(K8S_DIR.glob("*.yaml"))
    return [d for f in files for d in yaml.safe_load_all(f.read_text()) if d]


def find(kind: str, name: str) -> dict:
    [doc] = [d for d in docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def containers() -> list[tuple[dict, dict]]:
    return [
        (d, c) for d in docs(*MY_FILES) if d["kind"] == "Deployment" for c in d["spec"]["template"]["spec"]["containers"]
    ]


@pytest.mark.parametrize("doc", docs(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_schema_valid_strict(doc):
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_validation_catches_a_broken_manifest():
    """kubernetes-validate really checks: an unknown field and a wrong type are rejected."""
    broken = find("Deployment", "fd-alert-bridge")
    broken = yaml.safe_load(yaml.safe_dump(broken))
    broken["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)
    broken["spec"]["replicas"] = 1
    broken["spec"]["template"]["spec"]["containers"][0]["livenessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_everything_lives_in_the_ferrumdeck_namespace():
    assert {d["metadata"].get("namespace") for d in docs()} == {"ferrumdeck"}


@pytest.mark.parametrize("pair", containers(), ids=lambda p: p[1]["name"])
def test_containers_have_probes_resources_and_a_locked_down_security_context(pair):
    deployment, container = pair
    pod = deployment["spec"]["template"]["spec"]
    assert container["livenessProbe"] and container["readinessProbe"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind])
    assert pod["securityContext"]["runAsNonRoot"] is True
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert not container["image"].endswith(":latest") and ":" in container["image"]
    # read-only root: /tmp is an emptyDir and PREFECT_HOME points into it
    assert any(m["mountPath"] == "/tmp" for m in container["volumeMounts"])
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    assert env["PREFECT_HOME"].startswith("/tmp/")
    # probes point at a declared port
    ports = {p["name"] for p in container["ports"]} | {p["containerPort"] for p in container["ports"]}
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["port"] in ports


def test_selectors_match_pod_labels_and_the_service_reaches_the_bridge():
    for deployment in (d for d in docs(*MY_FILES) if d["kind"] == "Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service, bridge = find("Service", "fd-alert-bridge"), find("Deployment", "fd-alert-bridge")
    assert service["spec"]["selector"].items() <= bridge["spec"]["template"]["metadata"]["labels"].items()
    [container] = bridge["spec"]["template"]["spec"]["containers"]
    [port] = service["spec"]["ports"]
    assert port["targetPort"] in {p["name"] for p in container["ports"]}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["FD_BRIDGE_HOST"] == "0.0.0.0"
    assert int(env["FD_BRIDGE_PORT"]) == container["ports"][0]["containerPort"] == port["port"]
    # the heartbeat URL the post-recovery check uses points at this Service and port
    heartbeat_url = find("ConfigMap", "ferrumdeck-recovery")["data"]["FD_BRIDGE_HEARTBEAT_URL"]
    assert heartbeat_url == f"http://fd-alert-bridge.ferrumdeck.svc.cluster.local:{port['port']}/heartbeat"


def test_bridge_probe_paths_are_routes_of_the_bridge():
    from deployments.bridge import PrefectTarget, create_app

    app = create_app(BridgeSettings(token="x" * 16), target=PrefectTarget(events_url="http://p/api/events"))
    routes = {route.path for route in app.routes}
    [container] = find("Deployment", "fd-alert-bridge")["spec"]["template"]["spec"]["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] in routes
    assert container["readinessProbe"]["httpGet"]["path"] in routes


def test_every_referenced_secret_and_configmap_key_exists():
    objects = {(d["kind"], d["metadata"]["name"]): d for d in docs()}

    def keys(kind: str, name: str) -> set[str]:
        obj = objects[(kind, name)]
        return set(obj.get("stringData", {})) | set(obj.get("data", {}))

    for _, container in containers():
        for source in container.get("envFrom", []):
            if "secretRef" in source:
                assert ("Secret", source["secretRef"]["name"]) in objects
            if "configMapRef" in source:
                assert ("ConfigMap", source["configMapRef"]["name"]) in objects
        for var in container.get("env", []):
            ref = var.get("valueFrom", {})
            if "secretKeyRef" in ref:
                assert ref["secretKeyRef"]["key"] in keys("Secret", ref["secretKeyRef"]["name"])
            if "configMapKeyRef" in ref:
                assert ref["configMapKeyRef"]["key"] in keys("ConfigMap", ref["configMapKeyRef"]["name"])


def test_secrets_hold_only_placeholders():
    for secret in (d for d in docs("secrets.yaml") if d["kind"] == "Secret"):
        assert "data" not in secret  # no base64 blobs that could hide a real value
        for key, value in secret["stringData"].items():
            assert "REPLACE-ME" in value, f"{secret['metadata']['name']}/{key} looks like a real value"


def test_env_names_are_real_settings():
    """A typo in an FD_* variable would be silently ignored by pydantic-settings: catch it here."""
    fd_fields = {f"FD_{name.upper()}" for name in Settings.model_fields}
    bridge_fields = {f"FD_BRIDGE_{name.upper()}" for name in BridgeSettings.model_fields}
    names: set[str] = set()
    for _, container in containers():
        names |= {e["name"] for e in container.get("env", [])}
    for d in docs("config.yaml", "secrets.yaml"):
        names |= set(d.get("data", {})) | set(d.get("stringData", {}))
    fd_names = {n for n in names if n.startswith("FD_")}
    unknown = {n for n in fd_names if n not in fd_fields and n not in bridge_fields}
    assert not unknown, f"not settings of Settings or BridgeSettings: {sorted(unknown)}"


def test_commands_are_fd_recovery_subcommands_and_the_runner_uses_the_rbac_service_account():
    from deployments.cli import build_parser

    bridge = find("Deployment", "fd-alert-bridge")["spec"]["template"]["spec"]
    assert bridge["containers"][0]["command"] == ["fd-recovery", "bridge"]
    build_parser().parse_args(["bridge"])  # a real subcommand
    assert bridge["automountServiceAccountToken"] is False
    runner = find("Deployment", "ferrumdeck-recovery-runner")["spec"]
    # two replicas rolling: one always serves, and a dead one's runs are re-run by the other (issue 11)
    assert runner["replicas"] >= 2 and runner["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pod = runner["template"]["spec"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    # the typed results incident-timeline reads are kept (flows only)
    assert env["PREFECT_RESULTS_PERSIST_BY_DEFAULT"] == "true" and env["PREFECT_TASKS_DEFAULT_PERSIST_RESULT"] == "false"
    assert pod["containers"][0]["command"] == ["fd-recovery", "serve"]
    account = pod["serviceAccountName"]
    assert find("ServiceAccount", account)  # from rbac.yaml
    [binding] = [d for d in docs("rbac.yaml") if d["kind"] == "RoleBinding"]
    assert {"kind": "ServiceAccount", "name": account, "namespace": "ferrumdeck"} in binding["subjects"]
