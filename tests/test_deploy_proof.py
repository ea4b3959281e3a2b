"""The proof: a real Prometheus scrapes a real agent that runs on a fixture
powercap tree, two fake GPUs behind the real NVML bindings, a kubelet on
loopback and real registered jobs, loads the recording and alert rules, and
answers every dashboard query and every rule through its HTTP API.

Nothing is skipped: every panel query and every recording rule must return
data, and every metric an alert reads must exist, so a metric that
disappears from the agent (or is renamed) fails this test. Every legend
names labels the query's results carry."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import yaml

from tests.fakenvml.build import FakeDevice, FakeMig, FakeProcess, FakeState
from tests.fakenvml.build import build as build_fake_nvml
from tests.support import free_port, wait_until
from tests.support.engines import EngineServer
from tests.support.kubelet_server import FakeKubelet
from tests.support.rapl import ConstantPowerRapl

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy" / "prometheus" / "jouleward-rules.yml"
SCRAPE_EXAMPLE = ROOT / "deploy" / "prometheus" / "prometheus.yml"
DASHBOARDS = sorted((ROOT / "grafana" / "dashboards").glob("*.json"))
PROMETHEUS = shutil.which("prometheus")
PACKAGE_W = 40.0
DRAM_W = 6.0
# Values for Grafana's variables: "All" for every template variable.
VARIABLES = {
    "$__rate_interval": "15s",
    "$__range": "1m",
    "$cluster": ".*",
    "$instance": ".*",
    "$job_namespace": ".*",
    "$job_name": ".*",
    "$job_id": ".*",
}
RECORDED = re.compile(r"\b[a-z_]+:[a-z_0-9]+:[a-z0-9_]+\b")
METRIC = re.compile(r"\b(?:jouleward_[a-z0-9_]+|process_[a-z0-9_]+|kube_[a-z0-9_]+|up)\b(?![(:])")
NODE_NAME = "proof-node"
KUBELET_TOKEN = "kubelet-token-for-the-proof"
# What kube-state-metrics says about the node: two GPUs (the agent reads them).
KSM_TEXT = (
    f'kube_node_status_capacity{{node="{NODE_NAME}",resource="nvidia_com_gpu",unit="integer"}} 2\n'
    f'kube_node_status_capacity{{node="{NODE_NAME}",resource="cpu",unit="core"}} 2\n'
)

pytestmark = pytest.mark.skipif(PROMETHEUS is None, reason="prometheus is not installed (Debian package prometheus)")


def wait_for(check, timeout_s: float, what: str):
    return wait_until(
        check,
        timeout_s,
        interval_s=0.25,
        what=what,
        ignore=(httpx.HTTPError, OSError, KeyError, ValueError, IndexError),
    )


class FakeStateMetrics:
    """kube-state-metrics' answer for this node, served on loopback."""

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                body = KSM_TEXT.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def alive(process: subprocess.Popen, log: Path) -> bool:
    if process.poll() is not None:
        raise AssertionError(f"{process.args[0]} exited with {process.returncode}:\n{log.read_text()[-3000:]}")
    return True


def burner() -> subprocess.Popen:
    # Busy a third of the time, so two of them leave room on a 2-core machine.
    code = (
        "import time\nwhile True:\n    end = time.monotonic() + 0.02\n"
        "    while time.monotonic() < end: pass\n    time.sleep(0.04)\n"
    )
    return subprocess.Popen([sys.executable, "-c", code])


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("proof")
    rapl = ConstantPowerRapl(tmp / "sys", PACKAGE_W, DRAM_W).start()
    kubelet = FakeKubelet(KUBELET_TOKEN)
    state_metrics = FakeStateMetrics()
    # train-a also serves a model behind a stand-in vLLM, so the per-model efficiency panels have data.
    engine = EngineServer("vllm", {"prompt": 1000.0, "generated": 500.0, "requests": 10.0})
    (tmp / "kubelet-token").write_text(KUBELET_TOKEN)
    agent_port, prom_port = free_port(), free_port()
    socket_path = tmp / "control.sock"
    # A clean grid: the info alert on grid intensity (above 400 g/kWh) belongs to dirty grids, not to this host.
    # The kubelet answers, so the pod-metadata health metrics exist.
    # Slurm's GPU job map (dcgm-exporter's convention) gives GPU 1 to job 4242,
    # so the allocation panels and rules have data: 4242 pays GPU 1's idle,
    # train-b uses GPU 1 without the allocation, GPUs 0 and 2 are nobody's.
    job_map = tmp / "gpu-job-map"
    job_map.mkdir()
    (job_map / "1").write_text("4242\n")
    (tmp / "config.toml").write_text(
        f"[agent]\nflush_interval_s = 1.0\nkubelet_enabled = true\nkubelet_url = \"{kubelet.url}\"\n"
        f"kubelet_token_file = \"{tmp / 'kubelet-token'}\"\nkubelet_ca_file = \"{kubelet.ca_file}\"\nkubelet_poll_s = 1\n"
        "work_source_poll_s = 0.5\nwork_source_discovery = false\n"
        f"slurm_gpu_job_map_dir = \"{job_map}\"\nslurm_gpu_job_map_poll_s = 1\n"
        "[carbon]\nprovider = \"static\"\nintensity_g_per_kwh = 50.0\ncountry = \"FRA\"\n"
        f"[[work_sources]]\njob = \"^train-a$\"\nurl = \"{engine.url}\"\n"
    )
    # Two fake GPUs behind the real NVML bindings, so the GPU panels and the
    # allocated-but-idle alert have data. GPU 0 idles at 60 W until train-a
    # computes on it at 300 W; train-b holds memory on GPU 1 without computing.
    agent_env = {**os.environ, "PYTHONPATH": str(ROOT), "NODE_NAME": NODE_NAME}
    agent_env.pop("CUDA_VISIBLE_DEVICES", None)
    gpu_state_path = tmp / "nvml-state"
    gpu_started = time.monotonic()
    gpu_devices = [
        FakeDevice(0, "GPU-0000aaaa-proof", epoch_s=gpu_started, power_mw=60_000),
        FakeDevice(1, "GPU-1111bbbb-proof", epoch_s=gpu_started, power_mw=70_000, mem_used=10 * 2**30),
        FakeDevice(2, "GPU-2222cccc-proof", epoch_s=gpu_started, power_mw=80_000, mig=1),  # two MIG instances
    ]
    gpu_migs = [
        FakeMig(2, "MIG-2222cccc-0000-4000-8000-000000000001", gi=1, slices=3),
        FakeMig(2, "MIG-2222cccc-0000-4000-8000-000000000002", gi=2, slices=4),
    ]
    # No compiler, no proof: the GPU panels and rules must have data too.
    library = build_fake_nvml(tmp / "fakenvml")
    FakeState(devices=gpu_devices, migs=gpu_migs).write(gpu_state_path)
    agent_env.update(LD_LIBRARY_PATH=str(library.parent), FAKENVML_STATE=str(gpu_state_path))
    processes: list[subprocess.Popen] = []
    control: httpx.Client | None = None
    reporter: threading.Thread | None = None
    agent_log = open(tmp / "agent.log", "w")
    prom_log = open(tmp / "prometheus.log", "w")
    try:
        agent = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "agent.cli",
                "run",
                "--listen",
                f"127.0.0.1:{agent_port}",
                "--state-dir",
                str(tmp / "state"),
                "--control-socket",
                str(socket_path),
                "--sysfs",
                str(tmp / "sys"),
                "--procfs",
                "/proc",
                "--interval",
                "0.5",
                "--config",
                str(tmp / "config.toml"),
            ],
            cwd=ROOT,
            env=agent_env,
            stdout=agent_log,
            stderr=subprocess.STDOUT,
        )
        processes.append(agent)
        agent_url = f"http://127.0.0.1:{agent_port}"
        wait_for(
            lambda: alive(agent, tmp / "agent.log") and httpx.get(f"{agent_url}/readyz", timeout=2).status_code == 200,
            60,
            "the agent to be ready",
        )

        workers = {"train-a": burner(), "train-b": burner()}
        processes.extend(workers.values())
        switch = time.monotonic()
        busy = gpu_devices[0]
        # Keep the counter continuous: what it counted at 60 W, then 300 W from now on.
        busy.energy_mj, busy.epoch_s = busy.power_mw * (switch - gpu_started), switch
        busy.power_mw, busy.util_gpu, busy.mem_used = 300_000, 70, 20 * 2**30
        FakeState(
            devices=gpu_devices,
            migs=gpu_migs,
            processes=[
                FakeProcess(0, workers["train-a"].pid, mem=20 * 2**30, sm=70),
                FakeProcess(1, workers["train-b"].pid, mem=10 * 2**30, sm=0),
            ],
        ).write(gpu_state_path)
        control = httpx.Client(transport=httpx.HTTPTransport(uds=str(socket_path)), base_url="http://agent", timeout=10)
        job_ids: list[str] = []
        work_answers: list[int] = []
        for name, worker in workers.items():
            answer = control.post("/v1/jobs", json={"name": name, "pids": [worker.pid], "labels": {"team": "research"}})
            assert answer.status_code == 201, answer.text
            job_ids.append(answer.json()["id"])

        def report_work() -> None:
            # A training loop's progress: samples for one job, tokens for the other.
            while not rapl.stop.wait(0.5):
                for job_id, unit in zip(job_ids, ("samples", "tokens")):
                    work_answers.append(
                        control.post(f"/v1/jobs/{job_id}/work", json={"unit": unit, "count": 64}).status_code
                    )
                engine.add(prompt=400.0, generated=100.0, requests=2.0)

        reporter = threading.Thread(target=report_work, daemon=True)
        reporter.start()

        config = yaml.safe_load(SCRAPE_EXAMPLE.read_text())
        config["global"].update(scrape_interval="1s", evaluation_interval="1s", scrape_timeout="1s")
        config["rule_files"] = [str(rules_every_second(tmp))]
        config["scrape_configs"][0]["static_configs"][0]["targets"] = [f"127.0.0.1:{agent_port}"]
        config["scrape_configs"].append(
            {
                "job_name": "kube-state-metrics",
                "honor_labels": True,
                "static_configs": [{"targets": [f"127.0.0.1:{state_metrics.port}"], "labels": {"cluster": "lab"}}],
            }
        )
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        prometheus = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={tmp / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prom_port}",
                "--log.level=warn",
            ],
            stdout=prom_log,
            stderr=subprocess.STDOUT,
        )
        processes.append(prometheus)
        prom = httpx.Client(base_url=f"http://127.0.0.1:{prom_port}", timeout=10)
        wait_for(
            lambda: alive(prometheus, tmp / "prometheus.log") and prom.get("/-/ready").status_code == 200,
            60,
            "Prometheus to be ready",
        )

        def instant(expr: str) -> list:
            return prom.get("/api/v1/query", params={"query": expr}).json()["data"]["result"]

        # Enough scrapes for 15 s rates, and every job's power recorded.
        wait_for(lambda: float(instant("count_over_time(up[1m])")[0]["value"][1]) >= 15, 90, "fifteen scrapes")
        wait_for(
            lambda: (
                {
                    r["metric"].get("job_name")
                    for r in instant("cluster_job_namespace_job_id_job_name:jouleward_job_energy_joules:rate5m")
                }
                >= set(workers)
            ),
            60,
            "the registered jobs in the recording rules",
        )
        exposition = httpx.get(f"{agent_url}/metrics", timeout=5).text
        yield {
            "prom": prom,
            "instant": instant,
            "exposition": exposition,
            "work_answers": work_answers,
            "agent_url": agent_url,
            "engine": engine,
            "gpu_w": sum(d.power_mw for d in gpu_devices) / 1000,
        }
        prom.close()
    finally:
        rapl.stop.set()
        if reporter is not None:
            reporter.join(timeout=5)
        if control is not None:
            control.close()
        for process in reversed(processes):
            stop(process)
        agent_log.close()
        prom_log.close()
        rapl.close()
        kubelet.stop()
        state_metrics.stop()
        engine.stop()


def rules_every_second(tmp: Path) -> Path:
    """The shipped rules, every group at the global (test) interval rather
    than its own (the budget group's minute)."""
    groups = yaml.safe_load(RULES.read_text())["groups"]
    for group in groups:
        group.pop("interval", None)
    path = tmp / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    return path


def fill(expr: str) -> str:
    for name in sorted(VARIABLES, key=len, reverse=True):
        expr = expr.replace(name, VARIABLES[name])
    return expr


def run_query(stack, expr: str) -> dict:
    answer = stack["prom"].get("/api/v1/query", params={"query": expr})
    body = answer.json()
    assert answer.status_code == 200 and body["status"] == "success", f"{expr}: {body.get('error')}"
    return body["data"]


def panel_queries() -> list[tuple[str, str, str]]:
    out = []
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            for target in panel.get("targets", []):
                out.append(
                    (
                        f"{path.stem}: {panel['title']} [{target['refId']}]",
                        target["expr"],
                        target.get("legendFormat", ""),
                    )
                )
    return out


def grouping_labels(expr: str) -> set[str]:
    return {
        label.strip()
        for grouping in re.findall(r"\b(?:by|on)\s*\(([^)]*)\)", expr)
        for label in grouping.split(",")
        if label.strip()
    }


def test_every_dashboard_query_returns_data_its_legend_can_name(stack):
    queries = panel_queries()
    assert len(queries) >= 50
    empty, unnamed = [], []
    for where, expr, legend in queries:
        result = run_query(stack, fill(expr))["result"]
        if not result:
            empty.append(f"{where}: {fill(expr)}")
            continue
        values = [float(r["value"][1]) for r in result]
        assert all(v == v and v >= 0 for v in values), f"{where}: {values}"
        # A legend label must be on the results (or be a grouping label, empty for these registered jobs).
        for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", legend):
            if label not in grouping_labels(expr) and any(label not in r["metric"] for r in result):
                unnamed.append(f"{where}: {{{{{label}}}}} is on none of {[r['metric'] for r in result][:2]}")
    assert empty == [], "panel queries without data:\n  " + "\n  ".join(empty)
    assert unnamed == []


def test_every_template_variable_query_answers(stack):
    for path in DASHBOARDS:
        for variable in json.loads(path.read_text())["templating"]["list"]:
            if variable["type"] != "query":
                continue
            match = re.fullmatch(r"label_values\((.*), (\w+)\)", variable["query"]["query"])
            selector, label = fill(match.group(1)), match.group(2)
            answer = stack["prom"].get(f"/api/v1/label/{label}/values", params={"match[]": selector}).json()
            assert answer["status"] == "success", answer
            values = set(answer["data"])
            if label == "job_name":
                assert {"train-a", "train-b"} <= values
            if label in ("cluster", "instance", "job_id"):
                assert values, f"{path.stem}: {variable['name']} has no values"


def test_every_rule_is_loaded_healthy_and_has_data(stack):
    groups = stack["prom"].get("/api/v1/rules").json()["data"]["groups"]
    loaded = {rule["name"]: rule for group in groups for rule in group["rules"]}
    defined = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    assert set(loaded) == {r.get("record") or r.get("alert") for r in defined}
    wait_for(
        lambda: all(
            rule.get("lastEvaluation", "").startswith("20")
            for group in stack["prom"].get("/api/v1/rules").json()["data"]["groups"]
            for rule in group["rules"]
        ),
        30,
        "every rule evaluated",
    )
    empty = []
    for rule in defined:
        name = rule.get("record") or rule.get("alert")
        assert loaded[name]["health"] != "err", f"{name}: {loaded[name].get('lastError')}"
        run_query(stack, rule["expr"])
        if "record" in rule:
            if not run_query(stack, rule["record"])["result"]:
                empty.append(f"{name}: {rule['expr']}")
            continue
        # An alert is quiet on a healthy host; every series it reads must exist.
        for metric in sorted(set(METRIC.findall(rule["expr"])) | set(RECORDED.findall(rule["expr"]))):
            if not run_query(stack, f"count({metric})")["result"]:
                empty.append(f"{name}: {metric}")
    assert empty == [], "rules reading nothing:\n  " + "\n  ".join(empty)


def test_work_units_are_accepted(stack):
    assert len(stack["work_answers"]) >= 10
    assert set(stack["work_answers"]) == {200}


def test_no_alert_fires_on_a_healthy_host(stack):
    alerts = stack["prom"].get("/api/v1/alerts").json()["data"]["alerts"]
    assert [a["labels"]["alertname"] for a in alerts if a["state"] == "firing"] == []
    # Slurm job 4242 is allocated GPU 1 and never computes on it: the
    # allocated-idle alert is pending (it fires only after 30 minutes), and
    # nothing else is.
    pending = {(a["labels"]["alertname"], a["labels"].get("job_name")) for a in alerts if a["state"] == "pending"}
    assert pending <= {("JoulewardGPUAllocatedIdle", "4242")}


def test_prometheus_sees_the_fixture_power(stack):
    (cpu,) = stack["instant"]('sum(rate(jouleward_node_energy_joules_total{domain="cpu"}[10s]))')
    (dram,) = stack["instant"]('sum(rate(jouleward_node_energy_joules_total{domain="dram"}[10s]))')
    assert float(cpu["value"][1]) == pytest.approx(PACKAGE_W, rel=0.1)
    assert float(dram["value"][1]) == pytest.approx(DRAM_W, rel=0.1)
    (node,) = stack["instant"]("cluster_instance:jouleward_node_energy_joules:rate5m")
    assert node["metric"] == {
        "__name__": "cluster_instance:jouleward_node_energy_joules:rate5m",
        "cluster": "lab",
        "instance": "127.0.0.1",
    }
    # The rule's 5 m window is mostly empty this early: check its arithmetic, and the power over 10 s.
    (direct,) = stack["instant"](
        'sum by (cluster, instance) (rate(jouleward_node_energy_joules_total{domain=~"cpu|dram|gpu"}[5m]))'
    )
    assert float(node["value"][1]) == pytest.approx(float(direct["value"][1]), rel=0.1)
    (power,) = stack["instant"]('sum(rate(jouleward_node_energy_joules_total{domain=~"cpu|dram|gpu"}[10s]))')
    assert float(power["value"][1]) == pytest.approx(PACKAGE_W + DRAM_W + stack["gpu_w"], rel=0.25)
    jobs = stack["instant"](
        'cluster_job_namespace_job_id_job_name:jouleward_job_energy_joules_total:sum{job_name=~"train-.*"}'
    )
    assert {j["metric"]["job_name"] for j in jobs} == {"train-a", "train-b"}
    assert all(0 < float(j["value"][1]) for j in jobs)
    # The node's name joins its GPU sensors to kube-state-metrics' node: the GPU-node alert sees NVML here.
    (nvml,) = stack["instant"](
        'max by (cluster, node) (jouleward_sensor_up{sensor="nvml"}'
        ' * on (cluster, instance) group_left (node) jouleward_node_info)'
    )
    assert nvml["metric"] == {"cluster": "lab", "node": NODE_NAME} and nvml["value"][1] == "1"


def test_no_exported_label_is_a_target_label(stack):
    """With GPUs, a kubelet and registered jobs' own labels: nothing the agent
    exports is renamed to exported_* by the scrape (static or Operator)."""
    names = stack["prom"].get("/api/v1/labels", params={"match[]": '{__name__=~"jouleward_.*"}'}).json()["data"]
    assert [n for n in names if n.startswith("exported_")] == []
    exposed = set(re.findall(r'[{,]([a-zA-Z_][a-zA-Z0-9_]*)="', stack["exposition"]))
    assert {"gpu", "UUID", "pci_bus_id", "Hostname", "job_namespace", "label_team"} <= exposed
    assert exposed & {"namespace", "pod", "service", "container", "endpoint", "instance", "job"} == set()


def test_the_served_job_shows_joules_per_generated_token(stack):
    """train-a's stand-in vLLM: its generated tokens are the job's work, and the
    job body, the report and the per-model dashboard query give J per token."""
    wait_for(
        lambda: stack["instant"]('jouleward_job_served_work_units_total{job_name="train-a", unit="tokens_generated"}'),
        30,
        "served tokens in Prometheus",
    )
    (job,) = [j for j in httpx.get(f"{stack['agent_url']}/v1/jobs", timeout=5).json() if j["name"] == "train-a"]
    generated = job["work_units"]["tokens_generated"]
    # The first scrape is the baseline: what the engine counted before it is not the job's.
    assert 0 < generated <= stack["engine"].counters["generated"] - 500.0
    assert job["efficiency"]["token_unit"] == "tokens_generated"
    assert job["efficiency"]["energy_per_token_j"] == pytest.approx(sum(job["energy_j"].values()) / generated)
    assert job["efficiency"]["energy_per_sample_j"] == pytest.approx(
        sum(job["energy_j"].values()) / job["work_units"]["samples"]
    )
    (row,) = httpx.get(f"{stack['agent_url']}/v1/jobs/{job['id']}/report", params={"format": "json"}, timeout=5).json()
    assert row["token_unit"] == "tokens_generated" and row["energy_per_token_j"] > 0
    (panel,) = [q for q in panel_queries() if q[0].startswith("job: Energy per unit of work, per served model")]
    models = {(r["metric"]["model"], r["metric"]["unit"]) for r in run_query(stack, fill(panel[1]))["result"]}
    assert ("meta-llama/Llama-3.1-8B-Instruct", "tokens_generated") in models
