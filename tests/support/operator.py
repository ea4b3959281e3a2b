"""The scrape configuration the Prometheus Operator generates from a
ServiceMonitor, written down the way the Operator builds it.

The Operator turns endpoint ``i`` of ServiceMonitor ``<ns>/<name>`` into a
scrape job ``serviceMonitor/<ns>/<name>/<i>`` with ``kubernetes_sd_configs``
(role ``endpoints``, the ServiceMonitor's namespaces) and these relabelings,
in this order (its golden files, e.g. ``pkg/prometheus/testdata/*ServiceMonitor*.golden``):

1. keep the previous ``job`` as ``__tmp_prometheus_job_name``;
2. ``keep`` on every ``selector.matchLabels`` pair: the Service's label and
   its ``labelpresent`` marker;
3. ``keep`` on the endpoint's port name (``port:``);
4. target labels: ``node`` or ``pod`` from the endpoint address' target,
   ``namespace``, ``service``, ``pod``, ``container``; ``drop`` pods in
   phase Failed or Succeeded; ``job`` from the Service name (or the
   ``jobLabel`` label); ``endpoint`` from the port name;
5. the endpoint's own ``relabelings``;
6. ``hashmod`` sharding on ``__address__`` and a ``keep`` of this shard
   (``$(SHARD)``, which the config reloader fills in: 0 when unsharded).

``honor_labels`` is the endpoint's ``honorLabels`` (false by default).

Without Kubernetes there is no endpoints discovery, so ``discovered_target``
writes the ``__meta_kubernetes_*`` labels that discovery would give the
agent's pod as a static target: Prometheus then runs the generated
relabelings itself, unchanged.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

_CAMEL_KEYS = {"sourceLabels": "source_labels", "targetLabel": "target_label"}


def manifests(root: Path) -> list[dict[str, Any]]:
    """Every Kubernetes object in the YAML files under ``root``."""
    found = []
    for path in sorted(root.rglob("*.yaml")):
        try:
            documents = list(yaml.safe_load_all(path.read_text()))
        except yaml.YAMLError:
            continue
        found += [doc for doc in documents if isinstance(doc, dict) and "kind" in doc and "apiVersion" in doc]
    return found


def one_of_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    matches = [o for o in objects if o["kind"] == kind]
    assert len(matches) == 1, f"expected one {kind} in the deploy tree, found {len(matches)}"
    return matches[0]


def sanitize(label: str) -> str:
    """How Kubernetes discovery writes a label key into a meta label name."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", label)


def _relabeling(rule: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in rule.items():
        key = _CAMEL_KEYS.get(key, key)
        out[re.sub(r"(?<!^)([A-Z])", r"_\1", key).lower()] = value
    if "action" in out:
        out["action"] = str(out["action"]).lower()
    return out


def scrape_job(monitor: dict[str, Any], index: int = 0, shard: int = 0) -> dict[str, Any]:
    """The job for endpoint ``index`` of ``monitor``, as the Operator writes it."""
    meta, spec = monitor["metadata"], monitor["spec"]
    endpoint = spec["endpoints"][index]
    namespaces = spec.get("namespaceSelector", {}).get("matchNames") or [meta.get("namespace", "default")]
    relabel: list[dict[str, Any]] = [{"source_labels": ["job"], "target_label": "__tmp_prometheus_job_name"}]
    for key, value in sorted(spec.get("selector", {}).get("matchLabels", {}).items()):
        relabel.append(
            {
                "action": "keep",
                "source_labels": [
                    f"__meta_kubernetes_service_label_{sanitize(key)}",
                    f"__meta_kubernetes_service_labelpresent_{sanitize(key)}",
                ],
                "regex": f"({value});true",
            }
        )
    assert "port" in endpoint, "the generator here covers named ports, as the shipped ServiceMonitor uses"
    relabel.append(
        {"action": "keep", "source_labels": ["__meta_kubernetes_endpoint_port_name"], "regex": endpoint["port"]}
    )
    for kind, label in (("Node", "node"), ("Pod", "pod")):
        relabel.append(
            {
                "source_labels": [
                    "__meta_kubernetes_endpoint_address_target_kind",
                    "__meta_kubernetes_endpoint_address_target_name",
                ],
                "separator": ";",
                "regex": f"{kind};(.*)",
                "replacement": "${1}",
                "target_label": label,
            }
        )
    relabel += [
        {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
        {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "service"},
        {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
        {"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"},
        {"action": "drop", "source_labels": ["__meta_kubernetes_pod_phase"], "regex": "(Failed|Succeeded)"},
    ]
    if spec.get("jobLabel"):
        relabel.append(
            {
                "source_labels": [f"__meta_kubernetes_service_label_{sanitize(spec['jobLabel'])}"],
                "target_label": "job",
                "regex": "(.+)",
                "replacement": "${1}",
            }
        )
    else:
        relabel.append(
            {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "job", "replacement": "${1}"}
        )
    relabel.append({"target_label": "endpoint", "replacement": endpoint["port"]})
    relabel += [_relabeling(rule) for rule in endpoint.get("relabelings", [])]
    relabel += [
        {"source_labels": ["__address__"], "target_label": "__tmp_hash", "modulus": 1, "action": "hashmod"},
        {"source_labels": ["__tmp_hash"], "regex": str(shard), "action": "keep"},
    ]
    job: dict[str, Any] = {
        "job_name": f"serviceMonitor/{meta.get('namespace', namespaces[0])}/{meta['name']}/{index}",
        "honor_labels": bool(endpoint.get("honorLabels", False)),
        "kubernetes_sd_configs": [{"role": "endpoints", "namespaces": {"names": list(namespaces)}}],
        "metrics_path": endpoint.get("path", "/metrics"),
        "relabel_configs": relabel,
    }
    if "interval" in endpoint:
        job["scrape_interval"] = endpoint["interval"]
    if "scrapeTimeout" in endpoint:
        job["scrape_timeout"] = endpoint["scrapeTimeout"]
    if endpoint.get("scheme"):
        job["scheme"] = endpoint["scheme"]
    if endpoint.get("metricRelabelings"):
        job["metric_relabel_configs"] = [_relabeling(rule) for rule in endpoint["metricRelabelings"]]
    return job


def discovered_target(
    address: str, namespace: str, service: dict[str, Any], port_name: str, pod: str, container: str, node: str
) -> dict[str, Any]:
    """A static target carrying the meta labels endpoints discovery gives a ready pod endpoint."""
    labels = {
        "__meta_kubernetes_namespace": namespace,
        "__meta_kubernetes_service_name": service["metadata"]["name"],
        "__meta_kubernetes_endpoint_port_name": port_name,
        "__meta_kubernetes_endpoint_port_protocol": "TCP",
        "__meta_kubernetes_endpoint_ready": "true",
        "__meta_kubernetes_endpoint_address_target_kind": "Pod",
        "__meta_kubernetes_endpoint_address_target_name": pod,
        "__meta_kubernetes_endpoint_node_name": node,
        "__meta_kubernetes_pod_name": pod,
        "__meta_kubernetes_pod_container_name": container,
        "__meta_kubernetes_pod_node_name": node,
        "__meta_kubernetes_pod_phase": "Running",
        "__meta_kubernetes_pod_ready": "true",
    }
    for key, value in service["metadata"].get("labels", {}).items():
        labels[f"__meta_kubernetes_service_label_{sanitize(key)}"] = value
        labels[f"__meta_kubernetes_service_labelpresent_{sanitize(key)}"] = "true"
    return {"targets": [address], "labels": labels}
