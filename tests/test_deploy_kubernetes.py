"""The Kubernetes overlays build with kustomize, every object validates
strictly against the oldest and newest Kubernetes that kubernetes-validate
ships, and the objects agree with each other and with the rules file. The
plain overlays need no CRDs; the Prometheus Operator's objects, the
NetworkPolicy and the Grafana dashboards come as components."""

from __future__ import annotations

import copy
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from agent import config as agent_config

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "kubernetes"
RULES = ROOT / "deploy" / "prometheus" / "jouleward-rules.yml"
DASHBOARDS = ROOT / "grafana" / "dashboards"
OVERLAYS = ["plain-nodes", "gpu-nodes"]
COMPONENTS = ["prometheus-operator", "network-policy", "grafana-dashboards"]
KUSTOMIZE = shutil.which("kustomize")
KUBECTL = shutil.which("kubectl")
# Prometheus Operator kinds: kubernetes-validate ships no schema for CRDs and
# says so with a warning; their shape is checked by the tests below instead.
OPERATOR_KINDS = {"ServiceMonitor", "PrometheusRule"}

validate_utils = pytest.importorskip("kubernetes_validate.utils")
VERSIONS = [validate_utils.all_versions()[0], validate_utils.all_versions()[-1]]


def kustomize(directory: Path) -> str:
    if KUSTOMIZE:
        command = [KUSTOMIZE, "build", str(directory)]
    elif KUBECTL:
        command = [KUBECTL, "kustomize", str(directory)]
    else:
        pytest.skip("neither kustomize nor kubectl is installed (scripts/setup.d/60-deploy.sh)")
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def objects(overlay: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(kustomize(K8S / "overlays" / overlay)) if doc]


def build_overlay(directory: Path, base: str = "plain-nodes", components: list[str] = (), **extra) -> list[dict]:
    """An overlay of the user's, over one of ours, with some of our components."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(K8S / "overlays" / base, directory)],
                "components": [os.path.relpath(K8S / "components" / name, directory) for name in components],
                **extra,
            }
        )
    )
    return [doc for doc in yaml.safe_load_all(kustomize(directory)) if doc]


def with_components(tmp_path: Path, base: str = "plain-nodes") -> list[dict]:
    return build_overlay(tmp_path / f"{base}-all", base, COMPONENTS)


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [doc for doc in docs if doc["kind"] == kind]


def validate(path: Path, version: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", "-k", version, str(path)],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("overlay", [*OVERLAYS, "gpu-nodes+components"])
@pytest.mark.parametrize("version", VERSIONS)
def test_every_object_validates_strictly(overlay, version, tmp_path):
    docs = with_components(tmp_path, "gpu-nodes") if overlay.endswith("+components") else objects(overlay)
    built = tmp_path / f"{overlay}.yaml"
    built.write_text(yaml.safe_dump_all(docs))
    done = validate(built, version)
    assert done.returncode == 0, done.stdout + done.stderr
    passed = {
        line.split("for resource ")[1].split(" against")[0]
        for line in done.stdout.splitlines()
        if line.startswith("INFO") and " passed " in line
    }
    expected = {f"{d['kind'].lower()}/{d['metadata']['name']}" for d in docs if d["kind"] not in OPERATOR_KINDS}
    assert passed == expected
    warned = [line for line in done.stdout.splitlines() if line.startswith("WARN")]
    assert len(warned) == len([d for d in docs if d["kind"] in OPERATOR_KINDS])
    assert all("monitoring.coreos.com" in line for line in warned)
    assert ("ServiceMonitor" in {d["kind"] for d in docs}) == overlay.endswith("+components")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_plain_apply_needs_no_custom_resources(overlay):
    """`kubectl apply -k` of an overlay works on a cluster without the
    Prometheus Operator: only built-in API groups."""
    groups = {d["apiVersion"].rsplit("/", 1)[0] if "/" in d["apiVersion"] else "" for d in objects(overlay)}
    assert groups <= {"", "apps", "rbac.authorization.k8s.io"}, groups


def test_strict_validation_rejects_a_misspelt_field(tmp_path):
    docs = objects("plain-nodes")
    daemonset = copy.deepcopy(by_kind(docs, "DaemonSet")[0])
    daemonset["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFS"] = True
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump(daemonset))
    done = validate(broken, VERSIONS[-1])
    assert done.returncode != 0
    assert "readOnlyRootFS" in done.stdout


@pytest.mark.skipif(KUSTOMIZE is None or KUBECTL is None, reason="needs both kustomize and kubectl")
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kubectl_kustomize_builds_the_same_objects(overlay):
    done = subprocess.run(
        [KUBECTL, "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert [d for d in yaml.safe_load_all(done.stdout) if d] == objects(overlay)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_daemonsets_are_locked_down(overlay):
    daemonsets = by_kind(objects(overlay), "DaemonSet")
    assert len(daemonsets) == {"plain-nodes": 1, "gpu-nodes": 2}[overlay]
    for ds in daemonsets:
        pod = ds["spec"]["template"]["spec"]
        assert pod["hostPID"] is True
        assert pod.get("hostNetwork", False) is False
        assert pod["serviceAccountName"] == "jouleward"
        assert {"operator": "Exists"} in pod["tolerations"]
        (container,) = pod["containers"]
        sc = container["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["privileged"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
        for kind in ("requests", "limits"):
            assert set(container["resources"][kind]) == {"cpu", "memory"}
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        for name, host_path in (("proc", "/proc"), ("sys", "/sys")):
            assert volumes[name]["hostPath"]["path"] == host_path
            assert mounts[name]["readOnly"] is True
        assert volumes["state"]["hostPath"]["path"] == "/var/lib/jouleward"
        assert "--state-dir=" + mounts["state"]["mountPath"] in container["args"]
        assert "--procfs=" + mounts["proc"]["mountPath"] in container["args"]
        assert "--sysfs=" + mounts["sys"]["mountPath"] in container["args"]
        # Nothing asks for a GPU: the agent watches them all and takes none.
        assert not any("nvidia.com" in key for key in container["resources"]["limits"])


def test_gpu_agent_sees_the_gpus_and_only_runs_on_gpu_nodes():
    docs = objects("gpu-nodes")
    plain, gpu = sorted(by_kind(docs, "DaemonSet"), key=lambda d: d["metadata"]["name"])
    assert (plain["metadata"]["name"], gpu["metadata"]["name"]) == ("jouleward", "jouleward-gpu")
    pod = gpu["spec"]["template"]["spec"]
    assert pod["runtimeClassName"] == "nvidia"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert env["NVIDIA_DRIVER_CAPABILITIES"] == "utility"
    # GPU allocation from the kubelet's pod-resources socket, mounted read-only; the plain agent has none.
    assert env["JOULEWARD_POD_RESOURCES_ENABLED"] == "true"
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["pod-resources"] == {
        "name": "pod-resources",
        "mountPath": "/var/lib/kubelet/pod-resources",
        "readOnly": True,
    }
    assert {"proc", "sys", "state", "config"} <= mounts.keys()  # the base's mounts survive the patch
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["pod-resources"]["hostPath"] == {"path": "/var/lib/kubelet/pod-resources", "type": "Directory"}
    assert "proc" in volumes
    plain_pod = plain["spec"]["template"]["spec"]
    assert "pod-resources" not in {v["name"] for v in plain_pod["volumes"]}
    (term,) = plain["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]["nodeSelectorTerms"]
    assert term["matchExpressions"] == [{"key": "nvidia.com/gpu.present", "operator": "NotIn", "values": ["true"]}]
    # The two DaemonSets own disjoint pods, and the Service reaches both.
    assert plain["spec"]["selector"] != gpu["spec"]["selector"]
    (service,) = by_kind(docs, "Service")
    for ds in (plain, gpu):
        labels = ds["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items()


def test_rbac_grants_only_the_kubelet_pods_read():
    docs = objects("plain-nodes")
    (role,) = by_kind(docs, "ClusterRole")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["nodes/pods"], "verbs": ["get"]}]
    (binding,) = by_kind(docs, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "jouleward", "namespace": "jouleward"}]
    assert [sa["metadata"] for sa in by_kind(docs, "ServiceAccount")][0]["namespace"] == "jouleward"
    assert not by_kind(docs, "Role") and not by_kind(docs, "RoleBinding")


def test_legacy_component_adds_nodes_proxy(tmp_path):
    overlay = tmp_path / "legacy"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(K8S / "overlays" / "plain-nodes", overlay)],
                "components": [os.path.relpath(K8S / "components" / "kubelet-proxy-legacy", overlay)],
            }
        )
    )
    (role,) = by_kind([d for d in yaml.safe_load_all(kustomize(overlay)) if d], "ClusterRole")
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["nodes/pods"], "verbs": ["get"]},
        {"apiGroups": [""], "resources": ["nodes/proxy"], "verbs": ["get"]},
    ]


def test_service_monitor_scrapes_the_service(tmp_path):
    docs = build_overlay(tmp_path / "operator", components=["prometheus-operator"])
    (service,) = by_kind(docs, "Service")
    (monitor,) = by_kind(docs, "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == [service["metadata"]["namespace"]]
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    ds = by_kind(docs, "DaemonSet")[0]
    ports = {p["name"]: p["containerPort"] for p in ds["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert ports["metrics"] == service["spec"]["ports"][0]["port"] == 9883


def test_prometheus_rule_carries_the_promtool_tested_rules(tmp_path):
    tested = yaml.safe_load(RULES.read_text())["groups"]
    for overlay in OVERLAYS:
        (rule,) = by_kind(build_overlay(tmp_path / overlay, overlay, ["prometheus-operator"]), "PrometheusRule")
        assert rule["spec"]["groups"] == tested
        assert rule["metadata"]["namespace"] == "jouleward"


def test_prometheus_rule_file_is_regenerated():
    spec = importlib.util.spec_from_file_location("generate_prometheusrule", K8S / "generate_prometheusrule.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    committed = (K8S / "components" / "prometheus-operator" / "prometheusrule.yaml").read_text()
    assert module.render(RULES.read_text()) == committed, "run deploy/kubernetes/generate_prometheusrule.py"


def test_containerfile_copies_what_exists():
    lines = (ROOT / "Containerfile").read_text().splitlines()
    copies = [line.split()[1:-1] for line in lines if line.startswith("COPY ") and "--from" not in line]
    sources = [src for srcs in copies for src in srcs]
    assert {"pyproject.toml", "agent", "exporters"} <= set(sources)
    missing = [src for src in sources if not (ROOT / src).exists()]
    if missing == ["README.md"]:
        pytest.skip("README.md does not exist yet; pyproject.toml and the image build need it")
    assert missing == []
    assert 'ENTRYPOINT ["/opt/jouleward/bin/jouleward"]' in lines
    # The dependencies come from the lock, checked against its hashes.
    assert any("--require-hashes" in line and "requirements/runtime.lock" in line for line in lines)


def test_agent_configuration_is_a_mounted_configmap(tmp_path):
    for overlay in OVERLAYS:
        docs = objects(overlay)
        configmaps = {c["metadata"]["name"]: c for c in by_kind(docs, "ConfigMap")}
        for ds in by_kind(docs, "DaemonSet"):
            pod = ds["spec"]["template"]["spec"]
            (container,) = pod["containers"]
            (volume,) = [v for v in pod["volumes"] if "configMap" in v]
            (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
            assert mount["readOnly"] is True
            assert f"--config={mount['mountPath']}/config.toml" in container["args"]
            # The generated name (content hash) is the one the DaemonSet mounts.
            data = configmaps[volume["configMap"]["name"]]["data"]
            assert data == {"config.toml": (K8S / "base" / "agent" / "config.toml").read_text()}
    # The shipped file is a configuration the agent accepts, with the agent's defaults.
    path = tmp_path / "config.toml"
    path.write_text(data["config.toml"])
    loaded = agent_config.build(path, environ={})
    assert loaded.pod_job_labels == agent_config.DEFAULT_JOB_LABELS
    assert loaded.carbon.provider == "world"
    assert "kubelet_insecure_skip_verify" in data["config.toml"] and "kubelet_ca_file" in data["config.toml"]


def test_api_tokens_come_from_an_optional_secret():
    for ds in by_kind(objects("gpu-nodes"), "DaemonSet"):
        (container,) = ds["spec"]["template"]["spec"]["containers"]
        refs = {
            e["name"]: e["valueFrom"]["secretKeyRef"]
            for e in container["env"]
            if "secretKeyRef" in e.get("valueFrom", {})
        }
        assert refs == {
            "JOULEWARD_CARBON_TOKEN": {"name": "jouleward-secrets", "key": "carbon-token", "optional": True}
        }
    # The environment variable is one the agent reads: [carbon] token.
    assert agent_config.build(None, environ={"JOULEWARD_CARBON_TOKEN": "t0ken"}).carbon.token == "t0ken"


def documented_overlay(tmp_path: Path) -> list[dict]:
    """The user's overlay of docs/deploy.md, as written, beside a checkout
    named jouleward."""
    text = (ROOT / "docs" / "deploy.md").read_text()
    section = text.split("## Kubernetes", 1)[1]
    block = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    checkout = tmp_path / "jouleward"
    checkout.symlink_to(ROOT)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "kustomization.yaml").write_text(block)
    return [doc for doc in yaml.safe_load_all(kustomize(mine)) if doc]


def test_the_documented_overlay_sets_image_and_priority_and_adds_every_component(tmp_path):
    docs = documented_overlay(tmp_path)
    daemonsets = by_kind(docs, "DaemonSet")
    assert len(daemonsets) == 2
    for ds in daemonsets:
        pod = ds["spec"]["template"]["spec"]
        assert pod["containers"][0]["image"] == "registry.example/jouleward:0.1.0"
        assert pod["priorityClassName"] == "telemetry"
    kinds = {d["kind"] for d in docs}
    assert {"ServiceMonitor", "PrometheusRule", "NetworkPolicy"} <= kinds
    assert "jouleward-dashboards" in {c["metadata"]["name"] for c in by_kind(docs, "ConfigMap")}
    for ds in by_kind(objects("gpu-nodes"), "DaemonSet"):
        pod = ds["spec"]["template"]["spec"]
        assert pod["containers"][0]["image"] == "ghcr.io/jouleward/jouleward:0.1.0"
        assert pod["priorityClassName"] == "system-node-critical"


def test_network_policy_component_admits_only_prometheus_to_the_metrics_port(tmp_path):
    docs = build_overlay(tmp_path / "netpol", "gpu-nodes", ["network-policy"])
    (policy,) = by_kind(docs, "NetworkPolicy")
    assert policy["metadata"]["namespace"] == "jouleward"
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    for ds in by_kind(docs, "DaemonSet"):
        labels = ds["spec"]["template"]["metadata"]["labels"]
        assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
        ports = {p["name"] for p in ds["spec"]["template"]["spec"]["containers"][0]["ports"]}
        (rule,) = policy["spec"]["ingress"]
        assert [p["port"] for p in rule["ports"]] == ["metrics"] and "metrics" in ports
        assert rule["from"] == [
            {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}
        ]


def test_dashboards_configmap_is_generated_from_the_committed_json(tmp_path):
    docs = build_overlay(tmp_path / "grafana", components=["grafana-dashboards"])
    (configmap,) = [c for c in by_kind(docs, "ConfigMap") if c["metadata"]["name"] == "jouleward-dashboards"]
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["metadata"]["namespace"] == "jouleward"
    committed = {p.name: p.read_text() for p in DASHBOARDS.glob("*.json")}
    assert len(committed) >= 3
    assert configmap["data"] == committed
    # Small enough for a ConfigMap and for kubectl apply's last-applied annotation.
    assert sum(map(len, committed.values())) < 256 * 1024
