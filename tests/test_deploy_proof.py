"""The proof: a real Prometheus scrapes a real agent that runs on a fixture
powercap tree with real registered jobs, loads the recording and alert rules,
and answers every dashboard query and every rule through its HTTP API.

A query whose metrics the agent does not export yet (GPU, carbon and work-unit
metrics arrive with their features), or that selects GPU series on this
GPU-less fixture host, is skipped and reported; once the agent exports them the
same query must return data."""

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
import warnings
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.fakenvml.build import BuildError, FakeDevice, FakeProcess, FakeState
from tests.fakenvml.build import build as build_fake_nvml
from tests.support import free_port, wait_until

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
    "$namespace": ".*",
    "$job_name": ".*",
}
RECORDED = re.compile(r"\b[a-z_]+:[a-z_]+:[a-z0-9_]+\b")
METRIC = re.compile(r"\b(?:jouleward|process)_[a-z0-9_]+\b")
COMPARISON = re.compile(r"^(?P<signal>.*?)\s*(?:==|!=|>=|<=|>|<)\s*[0-9.e+]+\s*$", re.S)

pytestmark = pytest.mark.skipif(PROMETHEUS is None, reason="prometheus is not installed (Debian package prometheus)")


def wait_for(check, timeout_s: float, what: str):
    return wait_until(
        check,
        timeout_s,
        interval_s=0.25,
        what=what,
        ignore=(httpx.HTTPError, OSError, KeyError, ValueError, IndexError),
    )


class FakeRapl:
    """Energy counters that advance at fixed power, written like the kernel's."""

    def __init__(self, sysfs: Path) -> None:
        self.package = sysfs / "class/powercap/intel-rapl:0"
        self.dram = self.package / "intel-rapl:0:0"
        for zone, name in ((self.package, "package-0"), (self.dram, "dram")):
            zone.mkdir(parents=True)
            (zone / "name").write_text(name + "\n")
            (zone / "max_energy_range_uj").write_text("262143328850\n")
            (zone / "energy_uj").write_text("1000000\n")
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        start = time.monotonic()
        while not self.stop.wait(0.05):
            elapsed = time.monotonic() - start
            for zone, watts in ((self.package, PACKAGE_W), (self.dram, DRAM_W)):
                tmp = zone / "energy_uj.tmp"
                tmp.write_text(f"{1000000 + int(watts * elapsed * 1e6)}\n")
                os.replace(tmp, zone / "energy_uj")


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
    rapl = FakeRapl(tmp / "sys")
    rapl.thread.start()
    agent_port, prom_port = free_port(), free_port()
    socket_path = tmp / "control.sock"
    # A clean grid: the info alert on grid intensity (above 400 g/kWh) belongs to dirty grids, not to this host.
    (tmp / "config.toml").write_text(
        "[agent]\nflush_interval_s = 1.0\n"
        "[carbon]\nprovider = \"static\"\nintensity_g_per_kwh = 50.0\ncountry = \"FRA\"\n"
    )
    # Two fake GPUs behind the real NVML bindings, so the GPU panels and the
    # allocated-but-idle alert have data. GPU 0 idles at 60 W until train-a
    # computes on it at 300 W; train-b holds memory on GPU 1 without computing.
    agent_env = {**os.environ, "PYTHONPATH": str(ROOT)}
    agent_env.pop("CUDA_VISIBLE_DEVICES", None)
    gpu_state_path = tmp / "nvml-state"
    gpu_started = time.monotonic()
    gpu_devices = [
        FakeDevice(0, "GPU-0000aaaa-proof", epoch_s=gpu_started, power_mw=60_000),
        FakeDevice(1, "GPU-1111bbbb-proof", epoch_s=gpu_started, power_mw=70_000, mem_used=10 * 2**30),
    ]
    try:
        library = build_fake_nvml(tmp / "fakenvml")
        FakeState(devices=gpu_devices).write(gpu_state_path)
        agent_env.update(LD_LIBRARY_PATH=str(library.parent), FAKENVML_STATE=str(gpu_state_path))
    except BuildError:
        library = None  # no compiler: the GPU queries are reported as skipped
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
        if library is not None:
            switch = time.monotonic()
            busy = gpu_devices[0]
            # Keep the counter continuous: what it counted at 60 W, then 300 W from now on.
            busy.energy_mj, busy.epoch_s = busy.power_mw * (switch - gpu_started), switch
            busy.power_mw, busy.util_gpu, busy.mem_used = 300_000, 70, 20 * 2**30
            FakeState(
                devices=gpu_devices,
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

        reporter = threading.Thread(target=report_work, daemon=True)
        reporter.start()

        config = yaml.safe_load(SCRAPE_EXAMPLE.read_text())
        config["global"].update(scrape_interval="1s", evaluation_interval="1s", scrape_timeout="1s")
        config["rule_files"] = [str(RULES)]
        config["scrape_configs"][0]["static_configs"][0]["targets"] = [f"127.0.0.1:{agent_port}"]
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
                    for r in instant("cluster_namespace_job_name:jouleward_job_power_watts:sum")
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
            "gpu_w": sum(d.power_mw for d in gpu_devices) / 1000 if library is not None else 0.0,
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
        rapl.thread.join(timeout=5)


def exported_samples(exposition: str) -> tuple[set[str], set[str]]:
    names, domains = set(), set()
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            names.add(sample.name)
            if "domain" in sample.labels:
                domains.add(sample.labels["domain"])
    return names, domains


def recording_rules() -> dict[str, str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {r["record"]: r["expr"] for g in groups for r in g["rules"] if "record" in r}


def needed_metrics(expr: str, records: dict[str, str]) -> set[str]:
    needed = set(METRIC.findall(RECORDED.sub(" ", expr)))
    for name in RECORDED.findall(expr):
        needed |= needed_metrics(records[name], records)
    return needed


def uses_gpu_series(expr: str, records: dict[str, str]) -> bool:
    return 'domain="gpu"' in expr or any(uses_gpu_series(records[n], records) for n in RECORDED.findall(expr))


def fill(expr: str) -> str:
    for name in sorted(VARIABLES, key=len, reverse=True):
        expr = expr.replace(name, VARIABLES[name])
    return expr


def classify(expr: str, stack) -> str | None:
    """None when the query must return data, else why it may not yet."""
    names, domains = exported_samples(stack["exposition"])
    records = recording_rules()
    missing = sorted(needed_metrics(expr, records) - names)
    if missing:
        return "not exported yet: " + ", ".join(missing)
    if "gpu" not in domains and uses_gpu_series(expr, records):
        return "no GPU on the fixture host"
    return None


def run_query(stack, expr: str) -> dict:
    answer = stack["prom"].get("/api/v1/query", params={"query": expr})
    body = answer.json()
    assert answer.status_code == 200 and body["status"] == "success", f"{expr}: {body.get('error')}"
    return body["data"]


def report(skipped: list[str]) -> None:
    if skipped:
        warnings.warn("queries skipped until the agent exports their metrics:\n  " + "\n  ".join(skipped))


def panel_queries() -> list[tuple[str, str]]:
    out = []
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            for target in panel.get("targets", []):
                out.append((f"{path.stem}: {panel['title']} [{target['refId']}]", target["expr"]))
    return out


def test_every_dashboard_query_parses_and_returns_data(stack):
    queries = panel_queries()
    assert len(queries) >= 40
    skipped, empty = [], []
    for where, expr in queries:
        query = fill(expr)
        data = run_query(stack, query)  # parses and runs, whatever the data
        reason = classify(query, stack)
        if reason:
            skipped.append(f"{where}: {reason}")
        elif not data["result"]:
            empty.append(f"{where}: {query}")
        else:
            values = [float(r["value"][1]) for r in data["result"]]
            assert all(v == v and v >= 0 for v in values), f"{where}: {values}"
    assert empty == []
    report(skipped)
    # Most of each dashboard works on a plain CPU host with the spine alone.
    assert len(skipped) <= len(queries) // 2, skipped


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
            if label in ("cluster", "instance"):
                assert values, f"{path.stem}: {variable['name']} has no values"


def test_every_rule_is_loaded_healthy_and_has_data(stack):
    groups = stack["prom"].get("/api/v1/rules").json()["data"]["groups"]
    loaded = {rule["name"]: rule for group in groups for rule in group["rules"]}
    defined = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    assert set(loaded) == {r.get("record") or r.get("alert") for r in defined}
    wait_for(
        lambda: all(
            rule.get("lastEvaluation", "").startswith("20") and not rule["lastEvaluation"].startswith("0001")
            for rule in stack["prom"].get("/api/v1/rules").json()["data"]["groups"][0]["rules"]
        ),
        30,
        "every rule evaluated",
    )
    skipped, empty = [], []
    for rule in defined:
        name = rule.get("record") or rule.get("alert")
        assert loaded[name]["health"] != "err", f"{name}: {loaded[name].get('lastError')}"
        run_query(stack, rule["expr"])
        # An alert's condition is quiet on a healthy host: ask for the signal
        # it compares instead, which must have data.
        signal_expr = COMPARISON.match(rule["expr"]).group("signal") if "alert" in rule else rule["expr"]
        reason = classify(signal_expr, stack)
        if reason:
            skipped.append(f"{name}: {reason}")
            continue
        if not run_query(stack, signal_expr)["result"]:
            empty.append(f"{name}: {signal_expr}")
    assert empty == []
    report(skipped)


def test_work_units_are_accepted(stack):
    assert len(stack["work_answers"]) >= 10
    assert set(stack["work_answers"]) == {200}


def test_no_alert_fires_on_a_healthy_host(stack):
    alerts = stack["prom"].get("/api/v1/alerts").json()["data"]["alerts"]
    assert [a["labels"]["alertname"] for a in alerts if a["state"] == "firing"] == []
    # train-b holds GPU 1 without computing: the allocated-idle alert is
    # pending (it fires only after 30 minutes), and nothing else is.
    pending = {(a["labels"]["alertname"], a["labels"].get("job_name")) for a in alerts if a["state"] == "pending"}
    assert pending <= {("JoulewardGPUAllocatedIdle", "train-b")}


def test_prometheus_sees_the_fixture_power(stack):
    (cpu,) = stack["instant"]('sum(rate(jouleward_node_energy_joules_total{domain="cpu"}[10s]))')
    (dram,) = stack["instant"]('sum(rate(jouleward_node_energy_joules_total{domain="dram"}[10s]))')
    assert float(cpu["value"][1]) == pytest.approx(PACKAGE_W, rel=0.1)
    assert float(dram["value"][1]) == pytest.approx(DRAM_W, rel=0.1)
    (node,) = stack["instant"]("cluster_instance:jouleward_node_power_watts:sum")
    assert node["metric"] == {
        "__name__": "cluster_instance:jouleward_node_power_watts:sum",
        "cluster": "lab",
        "instance": "127.0.0.1",
    }
    assert float(node["value"][1]) == pytest.approx(PACKAGE_W + DRAM_W + stack["gpu_w"], rel=0.25)
    jobs = stack["instant"]('cluster_namespace_job_name:jouleward_job_energy_joules:sum{job_name=~"train-.*"}')
    assert {j["metric"]["job_name"] for j in jobs} == {"train-a", "train-b"}
    assert all(0 < float(j["value"][1]) for j in jobs)
