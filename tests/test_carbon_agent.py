"""Emissions through a real agent process: metrics, API, ledger, reports, `jouleward top`."""

from __future__ import annotations

import csv
import http.server
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from agent.carbon import tables
from exporters import report
from tests.support import REPO, AgentProcess, metric_sum, metric_values, start_burner, two_socket_server, wait_until
from tests.test_carbon_report import codecarbon_columns

WATTS = {
    "intel-rapl:0": 60.0,
    "intel-rapl:1": 45.0,
    "intel-rapl:0:2": 6.0,
    "intel-rapl:1:2": 5.0,
    "intel-rapl:0:0": 40.0,
    "intel-rapl-mmio:0": 60.0,
    "intel-rapl:2": 150.0,
}


@pytest.fixture
def rapl(tmp_path):
    tree = two_socket_server(tmp_path / "sys")
    halt = threading.Event()

    def advance():
        last = time.monotonic()
        while not halt.wait(0.05):
            now = time.monotonic()
            for zone_id, watts in WATTS.items():
                tree.zones[zone_id].add_j(watts * (now - last))
            last = now

    thread = threading.Thread(target=advance, daemon=True)
    thread.start()
    yield tree
    halt.set()
    thread.join()


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("JOULEWARD_")}
    full_env["PYTHONPATH"] = str(REPO)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_static_intensity_emissions_metrics_ledger_and_report(tmp_path, rapl, processes, agents):
    config = write_config(
        tmp_path / "jouleward.toml",
        '[carbon]\nprovider = "static"\nintensity_g_per_kwh = 400.0\ncountry = "FRA"\npue = 1.5\n',
    )
    agent = AgentProcess(tmp_path / "state", sysfs=tmp_path / "sys", interval_s=0.2, config=config)
    agents.append(agent)
    burner = start_burner(0.5)
    processes.append(burner)
    _, job = agent.control("POST", "/v1/jobs", {"name": "carbon-job", "pids": [burner.pid]})
    wait_until(
        lambda: metric_sum(agent.metrics(), "jouleward_job_emissions_grams_total", job_id=job["id"]) > 0,
        what="the job's emissions",
    )
    agent.wait_ticks(3)

    samples = agent.metrics()
    job_j = metric_sum(samples, "jouleward_job_energy_joules_total", job_id=job["id"])
    job_g = metric_sum(samples, "jouleward_job_emissions_grams_total", job_id=job["id"])
    assert job_j > 0
    assert job_g == pytest.approx(job_j / 3.6e6 * 400.0 * 1.5, rel=1e-9)
    node_j = sum(metric_sum(samples, "jouleward_node_energy_joules_total", domain=d) for d in ("cpu", "dram", "gpu"))
    node_g = metric_sum(samples, "jouleward_node_emissions_grams_total")
    assert node_g == pytest.approx(node_j / 3.6e6 * 400.0 * 1.5, rel=1e-9)
    # The platform (psys) channel overlaps the packages and stays out of the node's emissions.
    assert metric_sum(samples, "jouleward_node_energy_joules_total", domain="platform") > 0
    ((labels, value),) = metric_values(samples, "jouleward_grid_carbon_intensity_grams_per_kwh")
    assert (labels, value) == ({"zone": "FRA", "source": "static"}, 400.0)
    assert metric_sum(samples, "jouleward_pue") == 1.5

    status, node = agent.get("/v1/node")
    assert status == 200 and node["carbon"]["grams_per_kwh"] == 400.0 and node["carbon"]["emissions_g"] > 0

    # Finished, the job's figures stop moving: the report's energy and emissions come from one state.
    burner.kill()
    burner.wait()
    wait_until(lambda: agent.get(f"/v1/jobs/{job['id']}")[1]["running"] is False, what="the job to finish")
    agent.wait_ticks(2)
    status, finished = agent.get(f"/v1/jobs/{job['id']}")
    assert finished["emissions_g"] == pytest.approx(sum(finished["energy_j"].values()) / 3.6e6 * 400 * 1.5, rel=1e-9)

    listen = f"--listen=127.0.0.1:{agent.port}"
    result = cli("report", job["id"], "--format", "csv", listen, "--config", str(config))
    assert result.returncode == 0, result.stderr
    reader = csv.DictReader(io.StringIO(result.stdout))
    assert reader.fieldnames == codecarbon_columns() + list(report.EFFICIENCY_COLUMNS)
    (row,) = list(reader)
    energy_kwh = float(row["energy_consumed"])
    assert energy_kwh == pytest.approx(sum(finished["energy_j"].values()) * 1.5 / 3.6e6, rel=1e-9)
    assert float(row["emissions"]) == pytest.approx(finished["emissions_g"] / 1000.0, rel=1e-9)
    assert energy_kwh * 400.0 / 1000.0 == pytest.approx(float(row["emissions"]), rel=1e-9)
    assert float(row["cpu_energy"]) + float(row["ram_energy"]) + float(row["gpu_energy"]) == pytest.approx(
        energy_kwh, rel=1e-12
    )
    assert (row["run_id"], row["project_name"], row["country_iso_code"], row["pue"]) == (
        job["id"],
        "carbon-job",
        "FRA",
        "1.5",
    )
    assert float(row["duration"]) > 0 and float(row["emissions_rate"]) == pytest.approx(
        float(row["emissions"]) / float(row["duration"]), rel=1e-12
    )

    appended = tmp_path / "emissions.csv"
    for _ in range(2):
        assert cli("report", job["id"], "--format", "json", listen, "--append", str(appended)).returncode == 0
    rows = list(csv.DictReader(io.StringIO(appended.read_text())))
    assert [r["run_id"] for r in rows] == [job["id"], job["id"]]
    bad = cli("report", "r-nosuchjob", listen)
    assert bad.returncode == 2 and "no job 'r-nosuchjob'" in bad.stderr

    # With the agent stopped, the report comes from the durable ledger with the same figures.
    assert agent.stop() == 0
    offline = cli(
        "report", job["id"], "--format", "json", listen, "--state-dir", str(tmp_path / "state"), "--config", str(config)
    )
    assert offline.returncode == 0, offline.stderr
    (obj,) = json.loads(offline.stdout)
    assert obj["emissions"] == pytest.approx(finished["emissions_g"] / 1000.0, rel=1e-12)
    listing = cli("jobs", listen, "--state-dir", str(tmp_path / "state"))
    assert listing.returncode == 0 and "carbon-job" in listing.stdout and "finished" in listing.stdout

    # Restarted, the emission counters resume from the ledger rather than from zero.
    again = AgentProcess(tmp_path / "state", sysfs=tmp_path / "sys", interval_s=0.2, config=config)
    agents.append(again)
    assert metric_sum(again.metrics(), "jouleward_node_emissions_grams_total") >= node_g


class FlakyApi:
    def __init__(self):
        self.mode = "500"
        api = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                if api.mode == "slow":
                    time.sleep(3.0)
                body, status = {
                    "500": (b"oops", 500),
                    "malformed": (b"{not json", 200),
                    "ok": (json.dumps({"carbonIntensity": 123.0}).encode(), 200),
                    "slow": (json.dumps({"carbonIntensity": 999.0}).encode(), 200),
                }[api.mode]
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    pass

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.block_on_close = False
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


def test_http_provider_misbehaving_never_stops_the_agent(tmp_path, rapl, agents):
    api = FlakyApi()
    try:
        config = write_config(
            tmp_path / "jouleward.toml",
            f'[carbon]\nprovider = "http"\nurl = "{api.url}"\nzone = "DE"\ntoken = "t"\n'
            'intensity_g_per_kwh = 300.0\ntimeout_s = 0.5\npoll_s = 1.0\n',
        )
        agent = AgentProcess(tmp_path / "state", sysfs=tmp_path / "sys", interval_s=0.2, config=config)
        agents.append(agent)

        def intensity():
            return metric_values(agent.metrics(), "jouleward_grid_carbon_intensity_grams_per_kwh")[0]

        def errors():
            return metric_sum(agent.metrics(), "jouleward_carbon_intensity_errors_total")

        for mode in ("500", "malformed", "slow"):
            api.mode = mode
            seen = errors()
            wait_until(lambda: errors() > seen, timeout_s=30, what=f"a failed poll ({mode})")
            ticks = agent.ticks()
            agent.wait_ticks(3)  # still ticking
            assert agent.ticks() >= ticks + 3
            assert intensity() == ({"zone": "DE", "source": "fallback_static"}, 300.0)
        api.mode = "ok"
        wait_until(
            lambda: intensity() == ({"zone": "DE", "source": "http"}, 123.0), timeout_s=30, what="the API's value"
        )
        assert agent.proc.poll() is None
    finally:
        api.server.shutdown()
        api.server.server_close()


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is installed by scripts/setup.d/50-tmux.sh")
def test_top_in_a_real_terminal(tmp_path, rapl, processes, agents):
    agent = AgentProcess(tmp_path / "state", sysfs=tmp_path / "sys", interval_s=0.2)
    agents.append(agent)
    burner = start_burner(0.3)
    sleeper = subprocess.Popen(["sleep", "120"])
    processes.extend([burner, sleeper])
    agent.control("POST", "/v1/jobs", {"name": "zz-burning", "pids": [burner.pid]})
    agent.control("POST", "/v1/jobs", {"name": "aa-sleeping", "pids": [sleeper.pid]})
    agent.wait_ticks(3)

    # Not a terminal: one plain snapshot.
    plain = cli("top", f"--listen=127.0.0.1:{agent.port}")
    assert plain.returncode == 0, plain.stderr
    assert "zz-burning" in plain.stdout and "aa-sleeping" in plain.stdout and "gCO2eq/kWh" in plain.stdout

    session = f"jwtop{os.getpid()}"
    socket_name = f"jouleward-test-{os.getpid()}"
    tmux = ["tmux", "-L", socket_name]
    command = f"cd {REPO} && PYTHONPATH={REPO} {sys.executable} -m agent.cli top --listen 127.0.0.1:{agent.port}"
    subprocess.run(
        [*tmux, "new-session", "-d", "-s", session, "-x", "160", "-y", "40", command],
        check=True,
        env={**os.environ, "TERM": "xterm-256color"},
    )
    try:

        def screen() -> str:
            return subprocess.run([*tmux, "capture-pane", "-p", "-t", session], capture_output=True, text=True).stdout

        def job_rows() -> list[str]:
            return [line for line in screen().splitlines() if "-burning" in line or "-sleeping" in line]

        wait_until(lambda: len(job_rows()) == 2, what="both jobs on screen")
        assert "sort: power" in screen() and "[q]uit" in screen()
        # Sorted by power: the burning job first.
        wait_until(lambda: "zz-burning" in job_rows()[0], what="the burning job on top")
        subprocess.run([*tmux, "send-keys", "-t", session, "n"], check=True)
        wait_until(lambda: "sort: name" in screen() and "aa-sleeping" in job_rows()[0], what="sorted by name")
        subprocess.run([*tmux, "send-keys", "-t", session, "q"], check=True)
        wait_until(
            lambda: subprocess.run([*tmux, "has-session", "-t", session], capture_output=True).returncode != 0,
            what="top to quit on q",
        )
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)


def test_wrap_prints_emissions_and_appends_codecarbon_rows(tmp_path):
    target = tmp_path / "emissions.csv"
    for name in ("first", "second"):
        result = cli(
            "wrap",
            "--standalone",
            "--name",
            name,
            "--emissions-csv",
            str(target),
            "--",
            sys.executable,
            "-c",
            "sum(range(4_000_000))",
        )
        assert result.returncode == 0, result.stderr
        assert "gCO2eq" in result.stderr
    text = target.read_text()
    assert text.count("timestamp,project_name") == 1
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [r["project_name"] for r in rows] == ["first", "second"]
    for row in rows:
        assert float(row["energy_consumed"]) > 0
        # Measured in-process with the default zone: codecarbon's world average.
        assert float(row["energy_consumed"]) * tables.world_average() / 1000.0 == pytest.approx(
            float(row["emissions"]), rel=1e-9
        )
