"""Two nodes, one distributed job, one real Prometheus configured the way the
Prometheus Operator configures it from the shipped ServiceMonitor.

Two agents run as real processes, each on its own fixture powercap tree and
its own view of the host's processes, with a distinct NODE_NAME and its own
kubelet (a real HTTP server on loopback). One PyTorchJob, ``llama-ft``, has a
worker pod in a real kubepods cgroup on each node. The job ends, and a new
PyTorchJob of the same name (a new UID) starts on one node: a rerun.

Prometheus scrapes both agents through the scrape job the Operator generates
from the ServiceMonitor found in the deploy tree (its relabelings run
unchanged; only Kubernetes discovery is replaced by static targets carrying
the same discovery labels), and loads the shipped rules. The test asserts:

- the Operator's target labels (``namespace="jouleward"``, ``pod``,
  ``service``, ``container``, ``endpoint``, ``job``) and the agent's own
  labels coexist: no ``exported_*`` label anywhere, the job's namespace in
  ``job_namespace``;
- recording rules and dashboard queries that group by the job's namespace
  return ``research``, never ``jouleward``;
- the job's energy, summed by ``job_id`` across the two nodes, is each
  agent's figure counted once;
- the rerun is its own job, starting from zero.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest
import yaml

from tests.support import BURNER, REPO, AgentProcess, free_port, wait_until
from tests.support.cgroups import Cgroups, pod_dir
from tests.support.kubelet_server import FakeKubelet, pod_item
from tests.support.operator import discovered_target, manifests, one_of_kind, scrape_job
from tests.support.rapl import ConstantPowerRapl, NodeProcfs

PROMETHEUS = shutil.which("prometheus")
RULES = REPO / "deploy" / "prometheus" / "jouleward-rules.yml"
DASHBOARDS = sorted((REPO / "grafana" / "dashboards").glob("*.json"))
TOKEN = "kubelet-bearer-token-for-fleet-tests"
KUBEFLOW = "training.kubeflow.org/job-name"
NODES = ("node-a", "node-b")
RUN_1, RUN_2 = str(uuid.uuid4()), str(uuid.uuid4())
JOB_1, JOB_2 = f"k8s-{RUN_1}", f"k8s-{RUN_2}"
# The Operator's target labels: none of the agent's labels may collide with them.
TARGET_LABELS = {"namespace", "pod", "service", "container", "endpoint", "job", "instance"}
VARIABLES = {
    "$__rate_interval": "15s",
    "$__range": "2m",
    "$cluster": ".*",
    "$instance": ".*",
    "$job_namespace": ".*",
    "$job_name": ".*",
    "$job_id": ".*",
}

pytestmark = [
    pytest.mark.skipif(PROMETHEUS is None, reason="prometheus is not installed (Debian package prometheus)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="placing pods' processes in cgroups needs root"),
]


def deploy_objects() -> dict[str, dict]:
    """The ServiceMonitor, wherever the deploy tree keeps it, and the Service
    and DaemonSet it selects."""
    objects = manifests(REPO / "deploy")
    monitor = one_of_kind(objects, "ServiceMonitor")
    selector = monitor["spec"]["selector"]["matchLabels"]
    services = [
        o for o in objects if o["kind"] == "Service" and selector.items() <= o["metadata"].get("labels", {}).items()
    ]
    assert len(services) == 1, "the ServiceMonitor selects no Service, or several"
    # The DaemonSet itself, not the overlays' patches of it: the one whose pods match the Service.
    pod_selector = services[0]["spec"]["selector"]
    (daemonset,) = [
        o
        for o in objects
        if o["kind"] == "DaemonSet"
        and pod_selector.items() <= o["spec"].get("template", {}).get("metadata", {}).get("labels", {}).items()
    ]
    return {"monitor": monitor, "service": services[0], "daemonset": daemonset}


def operator_config(objects: dict[str, dict], agents: dict[str, AgentProcess]) -> dict:
    monitor, service = objects["monitor"], objects["service"]
    endpoint = monitor["spec"]["endpoints"][0]
    (port,) = [p for p in service["spec"]["ports"] if p["name"] == endpoint["port"]]
    # The container whose port the Service targets.
    (container,) = [
        c
        for c in objects["daemonset"]["spec"]["template"]["spec"]["containers"]
        if any(p.get("name") == port["targetPort"] for p in c.get("ports", []))
    ]
    namespace = monitor["spec"]["namespaceSelector"]["matchNames"][0]
    job = scrape_job(monitor)
    job.pop("kubernetes_sd_configs")
    job["static_configs"] = [
        discovered_target(
            f"127.0.0.1:{agent.port}",
            namespace,
            service,
            port["name"],
            f"jouleward-{node[-1]}x7k2",
            container["name"],
            node,
        )
        for node, agent in agents.items()
    ]
    # Seconds, not the shipped 15 s, so the test finishes; nothing else differs.
    job.update(scrape_interval="1s", scrape_timeout="1s")
    return {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"}, "scrape_configs": [job]}


def rules_every_second(tmp: Path) -> Path:
    """The shipped rules, every group evaluated at the global (test) interval
    rather than its own (the budget group's minute)."""
    groups = yaml.safe_load(RULES.read_text())["groups"]
    for group in groups:
        group.pop("interval", None)
    path = tmp / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    return path


class Fleet:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.cgroups = Cgroups()
        self.rapl: dict[str, ConstantPowerRapl] = {}
        self.procfs: dict[str, NodeProcfs] = {}
        self.kubelets: dict[str, FakeKubelet] = {}
        self.agents: dict[str, AgentProcess] = {}
        self.workers: dict[str, subprocess.Popen] = {}
        self.prometheus: subprocess.Popen | None = None
        self.prom: httpx.Client | None = None
        (tmp / "token").write_text(TOKEN)

    def start_agents(self) -> None:
        for node in NODES:
            self.rapl[node] = ConstantPowerRapl(self.tmp / node / "sys").start()
            self.procfs[node] = NodeProcfs(self.tmp / node / "proc")
            self.kubelets[node] = FakeKubelet(TOKEN)
            config = self.tmp / node / "agent.toml"
            config.write_text(f"""
[agent]
flush_interval_s = 1.0
kubelet_enabled = true
kubelet_url = "{self.kubelets[node].url}"
kubelet_token_file = "{self.tmp / 'token'}"
kubelet_ca_file = "{self.kubelets[node].ca_file}"
kubelet_poll_s = 1
kubelet_timeout_s = 1
[carbon]
provider = "static"
intensity_g_per_kwh = 100.0
""")
            self.agents[node] = AgentProcess(
                self.tmp / node / "state",
                "--procfs",
                str(self.procfs[node].root),
                sysfs=self.tmp / node / "sys",
                config=config,
                interval_s=0.5,
                env={"NODE_NAME": node},
            )

    def start_pod(self, node: str, name: str, run_uid: str) -> None:
        """A worker pod of PyTorchJob llama-ft (UID ``run_uid``) on ``node``."""
        pod_uid = str(uuid.uuid4())
        kubelet = self.kubelets[node]
        kubelet.pods = kubelet.pods + [
            pod_item(
                pod_uid, name, "research", {KUBEFLOW: "llama-ft"}, node=node, owner=("PyTorchJob", "llama-ft", run_uid)
            )
        ]
        worker = self.cgroups.spawn(pod_dir(pod_uid), [sys.executable, "-c", BURNER, "0.15"])
        self.procfs[node].add(worker.pid)
        self.workers[name] = worker

    def stop_pod(self, name: str) -> None:
        worker = self.workers[name]
        worker.kill()
        worker.wait(timeout=10)

    def start_prometheus(self, config: dict) -> None:
        path = self.tmp / "prometheus.yml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        port = free_port()
        self._log = open(self.tmp / "prometheus.log", "wb")
        self.prometheus = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={path}",
                f"--storage.tsdb.path={self.tmp / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.prom = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)

        def ready() -> bool:
            if self.prometheus.poll() is not None:
                raise AssertionError((self.tmp / "prometheus.log").read_text()[-3000:])
            return self.prom.get("/-/ready").status_code == 200

        wait_until(ready, 60, interval_s=0.25, what="Prometheus to be ready", ignore=(httpx.HTTPError,))

    def query(self, expr: str) -> list[dict]:
        body = self.prom.get("/api/v1/query", params={"query": expr}).json()
        assert body["status"] == "success", f"{expr}: {body.get('error')}"
        return body["data"]["result"]

    def agent_job(self, node: str, job_id: str) -> dict | None:
        status, body = self.agents[node].get(f"/v1/jobs/{job_id}")
        return body if status == 200 else None

    def close(self) -> None:
        if self.prom is not None:
            self.prom.close()
        if self.prometheus is not None and self.prometheus.poll() is None:
            self.prometheus.terminate()
            try:
                self.prometheus.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.prometheus.kill()
                self.prometheus.wait()
        for agent in self.agents.values():
            agent.stop()
        for kubelet in self.kubelets.values():
            kubelet.stop()
        for rapl in self.rapl.values():
            rapl.close()
        self.cgroups.cleanup()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    fleet = Fleet(tmp_path_factory.mktemp("fleet"))
    try:
        objects = deploy_objects()
        fleet.start_agents()
        fleet.start_pod("node-a", "llama-ft-worker-0", RUN_1)
        fleet.start_pod("node-b", "llama-ft-worker-1", RUN_1)
        config = operator_config(objects, fleet.agents)
        config["rule_files"] = [str(rules_every_second(fleet.tmp))]
        fleet.start_prometheus(config)
        wait_until(
            lambda: (
                {
                    r["metric"]["instance"]
                    for r in fleet.query(f'jouleward_job_energy_joules_total{{job_id="{JOB_1}"}} > 0')
                }
                == set(NODES)
            ),
            60,
            interval_s=0.5,
            what="run 1's energy from both nodes in Prometheus",
        )
        fleet.agents["node-a"].wait_ticks(10)
        # Run 1 ends; a new PyTorchJob of the same name starts on node-a.
        fleet.stop_pod("llama-ft-worker-0")
        fleet.stop_pod("llama-ft-worker-1")
        wait_until(
            lambda: all((fleet.agent_job(node, JOB_1) or {}).get("finished_at") for node in NODES),
            30,
            interval_s=0.25,
            what="run 1 to finish on both nodes",
        )
        fleet.start_pod("node-a", "llama-ft-worker-0", RUN_2)
        wait_until(
            lambda: fleet.query(f'jouleward_job_energy_joules_total{{job_id="{JOB_2}"}} > 0'),
            60,
            interval_s=0.5,
            what="run 2 in Prometheus",
        )
        # Both agents' final figures for run 1 scraped, and the rules evaluated on them.
        totals = {node: sum(fleet.agent_job(node, JOB_1)["energy_j"].values()) for node in NODES}
        wait_until(
            lambda: [
                r
                for r in fleet.query(
                    f'cluster_job_namespace_job_id_job_name:jouleward_job_energy_joules_total:sum{{job_id="{JOB_1}"}}'
                )
                if float(r["value"][1]) == pytest.approx(sum(totals.values()), rel=1e-9)
            ],
            30,
            interval_s=0.5,
            what="the recording rule on run 1's final totals",
        )
        fleet.run1_totals = totals
        yield fleet
    finally:
        fleet.close()


def test_operator_target_labels_and_agent_labels_coexist(fleet):
    up = fleet.query("up")
    assert len(up) == 2 and all(r["value"][1] == "1" for r in up)
    targets = {r["metric"]["instance"]: r["metric"] for r in up}
    assert set(targets) == set(NODES)  # the ServiceMonitor's relabeling: instance is the node
    for labels in targets.values():
        assert labels["namespace"] == "jouleward" and labels["service"] == "jouleward"
        assert labels["container"] == "agent" and labels["endpoint"] == "metrics" and labels["job"] == "jouleward"
        assert labels["pod"].startswith("jouleward-")
    # No label of ours was renamed on the way in.
    names = fleet.prom.get("/api/v1/labels", params={"match[]": '{__name__=~"jouleward_.*"}'}).json()["data"]
    assert [n for n in names if n.startswith("exported_")] == []
    assert {"job_namespace", "job_id", "job_name", "job_kind"} <= set(names)
    # The job's series: the target's namespace and the job's, each in its own label.
    series = fleet.query('jouleward_job_energy_joules_total{job_name="llama-ft"}')
    assert {(s["metric"]["namespace"], s["metric"]["job_namespace"]) for s in series} == {("jouleward", "research")}
    # And no exported label name is one of the target labels the Operator adds.
    text = fleet.agents["node-a"].metrics_text()
    exported = set(re.findall(r'[{,]([a-zA-Z_][a-zA-Z0-9_]*)="', text))
    assert exported & TARGET_LABELS == set(), exported & TARGET_LABELS


def test_rules_and_dashboards_group_by_the_jobs_namespace(fleet):
    for record in (
        "cluster_job_namespace:jouleward_job_energy_joules:rate5m",
        "cluster_job_namespace:jouleward_job_emissions_grams:rate5m",
        "cluster_job_namespace_job_id_job_name:jouleward_job_energy_joules_total:sum",
        "cluster_job_namespace_job_id_job_name:jouleward_job_energy_joules_total:max_over_time1d",
    ):
        result = fleet.query(record)
        assert result, record
        # research, and empty for a pod's first ticks before its metadata arrived (pod-<uid>); never jouleward.
        assert "research" in {r["metric"].get("job_namespace") for r in result}, record
        assert {r["metric"].get("job_namespace", "") for r in result} <= {"research", ""}, record
        assert all("namespace" not in r["metric"] for r in result), record
    grouped = 0
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            for target in panel.get("targets", []):
                expr = target["expr"]
                if not re.search(r"\b(?:by|on)\s*\([^)]*\bjob_namespace\b", expr):
                    continue
                if "gpu" in expr:
                    continue  # no GPUs on these nodes: tests/test_deploy_proof.py has them
                for name in sorted(VARIABLES, key=len, reverse=True):
                    expr = expr.replace(name, VARIABLES[name])
                result = fleet.query(expr)
                assert result, f"{path.stem}: {panel['title']}: {expr}"
                namespaces = {r["metric"].get("job_namespace", "") for r in result}
                assert "research" in namespaces and namespaces <= {"research", ""}, (panel["title"], namespaces)
                grouped += 1
        for variable in board["templating"]["list"]:
            if variable["name"] == "job_namespace":
                match = re.fullmatch(r"label_values\((.*), (\w+)\)", variable["query"]["query"])
                selector = match.group(1).replace('$cluster', '.*')
                values = fleet.prom.get(f"/api/v1/label/{match.group(2)}/values", params={"match[]": selector}).json()[
                    "data"
                ]
                assert values == ["research"], path.stem  # a label with an empty value is no value
    assert grouped >= 4


def test_one_job_across_two_nodes_is_summed_once_by_id(fleet):
    totals = fleet.run1_totals
    assert all(value > 0 for value in totals.values()), totals
    per_node = {
        r["metric"]["instance"]: float(r["value"][1])
        for r in fleet.query(f'sum by (instance) (jouleward_job_energy_joules_total{{job_id="{JOB_1}"}})')
    }
    assert per_node == pytest.approx(totals, rel=1e-9)
    (summed,) = fleet.query(f'sum by (job_id) (jouleward_job_energy_joules_total{{job_id="{JOB_1}"}})')
    assert float(summed["value"][1]) == pytest.approx(sum(totals.values()), rel=1e-9)
    (recorded,) = fleet.query(
        f'cluster_job_namespace_job_id_job_name:jouleward_job_energy_joules_total:sum{{job_id="{JOB_1}"}}'
    )
    assert recorded["metric"] == {
        "__name__": "cluster_job_namespace_job_id_job_name:jouleward_job_energy_joules_total:sum",
        "job_namespace": "research",
        "job_id": JOB_1,
        "job_name": "llama-ft",
    }
    assert float(recorded["value"][1]) == pytest.approx(sum(totals.values()), rel=1e-9)
    # Each node names itself: the info metric joins job series to the node.
    nodes = {
        r["metric"]["node"]
        for r in fleet.query(
            f'sum by (node) (jouleward_job_energy_joules_total{{job_id="{JOB_1}"}}'
            ' * on (instance) group_left (node) jouleward_node_info)'
        )
    }
    assert nodes == set(NODES)


def test_a_rerun_with_the_same_name_is_a_separate_job(fleet):
    runs = {
        r["metric"]["job_id"]
        for r in fleet.query('count by (job_id) (jouleward_job_energy_joules_total{job_name="llama-ft"})')
    }
    assert runs == {JOB_1, JOB_2}
    # The rerun starts from zero on node-a instead of continuing run 1's counter there.
    history = fleet.prom.get(
        "/api/v1/query", params={"query": f'jouleward_job_energy_joules_total{{job_id="{JOB_2}"}}[10m]'}
    ).json()["data"]["result"]
    assert history
    first_value = sum(float(series["values"][0][1]) for series in history)
    assert first_value < fleet.run1_totals["node-a"]
    assert fleet.agent_job("node-a", JOB_2)["first_seen"] >= fleet.agent_job("node-a", JOB_1)["finished_at"] - 1
    assert fleet.agent_job("node-b", JOB_2) is None

    # Budgets are per run: two series, neither the sum of both.
    def both_runs() -> dict[str, float] | None:
        found = {
            r["metric"]["job_id"]: float(r["value"][1])
            for r in fleet.query(
                'cluster_job_namespace_job_id_job_name:jouleward_job_energy_joules_total:max_over_time1d{job_name="llama-ft"}'
            )
        }
        return found if set(found) == {JOB_1, JOB_2} else None

    budget = wait_until(both_runs, 20, interval_s=0.5, what="both runs' budget series")
    assert budget[JOB_1] == pytest.approx(sum(fleet.run1_totals.values()), rel=1e-9)
