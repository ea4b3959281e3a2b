"""``jouleward wrap`` end to end: real commands, real signals, real agent."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from agent.client import Job
from tests.test_control_security import control_socket  # noqa: F401 - fixture

ROOT = Path(__file__).resolve().parents[1]
BURN = "import sys, time\nt = time.process_time()\nwhile time.process_time() - t < 3: pass\nsys.exit(3)"


def wrap(*args, **kwargs):
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", "wrap", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        **kwargs,
    )


def test_standalone_wrap_measures_a_cpu_burn_and_keeps_its_exit_status(tmp_path):
    report = tmp_path / "r.json"
    done = wrap(
        "--standalone",
        "--name",
        "burn",
        "--label",
        "team=nlp",
        "--report",
        str(report),
        "--",
        sys.executable,
        "-c",
        BURN + "\n",
    )
    assert done.returncode == 3, done.stderr
    summary = json.loads(report.read_text())
    assert summary["mode"] == "standalone" and summary["exit_status"] == 3
    assert summary["energy_j"]["cpu"] > 0
    assert summary["duration_s"] >= 2.9
    # The model's ceiling bounds what 3 CPU-seconds can cost: no CPU draws a kilowatt.
    assert summary["total_energy_j"] < 3 * 1000
    assert abs(summary["average_power_w"] - summary["total_energy_j"] / summary["duration_s"]) < 1e-3
    assert "energy" in done.stderr and "J" in done.stderr


def test_output_passes_through_and_signals_are_forwarded(tmp_path):
    assert wrap("--standalone", "--", "sh", "-c", "echo out; echo err >&2").stdout == "out\n"
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "wrap", "--standalone", "--", "sleep", "60"],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 128 + signal.SIGTERM


def test_cli_errors_exit_2_and_missing_commands_127():
    assert wrap("--label", "novalue", "--", "true").returncode == 2
    assert wrap("--name", "bad\x01name", "--", "true").returncode == 2
    no_command = wrap()
    assert no_command.returncode == 2 and "no command given" in no_command.stderr
    assert "Traceback" not in no_command.stderr
    missing = wrap("--standalone", "--", "no-such-command-xyz")
    assert missing.returncode == 127 and "no-such-command-xyz" in missing.stderr


def test_wrap_through_the_agent_reports_work_units(control_socket, tmp_path):  # noqa: F811
    report = tmp_path / "r.json"
    child = (
        "from agent.client import report_work\n"
        + BURN.replace("sys.exit(3)", "")
        + "assert report_work('tokens', 5000)\nassert report_work('tokens', 1000)\n"
    )
    done = wrap(
        "--require-agent",
        "--socket",
        str(control_socket),
        "--name",
        "ft",
        "--report",
        str(report),
        "--",
        sys.executable,
        "-c",
        child,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(report.read_text())
    assert summary["mode"] == "agent" and summary["job_id"].startswith("r-")
    assert summary["work_units"] == {"tokens": 6000.0}
    assert summary["energy_j"].get("cpu", 0) > 0
    assert "per token" in done.stderr


def test_client_context_manager_measures_in_process_without_an_agent(tmp_path):
    with Job("inline", socket_path=tmp_path / "absent.sock", interval_s=0.2) as job:
        t = time.process_time()
        while time.process_time() - t < 1.5:
            pass
        job.add_work("samples", 64)
    summary = job.summary
    assert summary.mode == "standalone"
    assert summary.energy_j["cpu"] > 0
    assert summary.work_units == {"samples": 64.0}
