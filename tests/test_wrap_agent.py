"""``jouleward wrap`` and the read commands against a real agent: where they
find it, what the last partial interval is charged to, the exit status when
the agent or the CSV file misbehave, and job ids that hold ``/``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from agent.config import Config
from tests.faultkit import FakeProcfs, Powercap, boot_ticks
from tests.support import REPO, AgentProcess, UnixHTTPConnection, free_port, wait_until
from tests.support.kubelet_server import FakeKubelet, pod_item

BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < {s}: pass\n"


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOULEWARD_")}
    return {**env, "PYTHONPATH": str(REPO), **extra}


def jouleward(*args: str, env: dict[str, str] | None = None, timeout_s: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=env or clean_env(),
        check=False,
    )


def test_the_last_partial_interval_is_charged_to_the_job(tmp_path):
    # Ticks 30 s apart: the whole 1.5 s burn falls between two ticks.
    agent = AgentProcess(tmp_path / "state", interval_s=30)
    try:
        report = tmp_path / "r.json"
        done = jouleward(
            "wrap",
            "--require-agent",
            "--socket",
            agent.socket_path,
            "--report",
            str(report),
            "--",
            sys.executable,
            "-c",
            BURN.format(s=1.5),
        )
        assert done.returncode == 0, done.stderr
        summary = json.loads(report.read_text())
        assert summary["mode"] == "agent"
        status, job = agent.get(f"/v1/jobs/{summary['job_id']}")
        assert status == 200 and job["running"] is False
        assert job["cpu_s"] >= 1.4, job  # the burn's CPU time, booked by the sample taken at finish
        assert summary["energy_j"]["cpu"] > 0
    finally:
        agent.stop()


def test_wrap_keeps_the_commands_status_when_the_agent_vanishes(tmp_path):
    agent = AgentProcess(tmp_path / "state")
    wrapped = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agent.cli",
            "wrap",
            "--require-agent",
            "--socket",
            agent.socket_path,
            "--",
            "sh",
            "-c",
            "sleep 2; exit 7",
        ],
        cwd=REPO,
        env=clean_env(),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # The wrapper's own registration, not a job the agent found on the host (a systemd unit, a scope).
        wait_until(
            lambda: any(j["running"] and j["kind"] == "registered" for j in agent.get("/v1/jobs")[1]),
            timeout_s=20,
            what="registration",
        )
        assert agent.stop() == 0
        _, stderr = wrapped.communicate(timeout=60)
        assert wrapped.returncode == 7, stderr
        assert "cannot finish job" in stderr and "Traceback" not in stderr
    finally:
        if wrapped.poll() is None:
            wrapped.kill()
            wrapped.wait()


def test_wrap_keeps_the_commands_status_when_the_emissions_csv_is_not_utf8(tmp_path):
    csv = tmp_path / "emissions.csv"
    csv.write_bytes(b"\xff\xfe t\x00i\x00m\x00e\x00\n")
    done = jouleward("wrap", "--standalone", "--emissions-csv", str(csv), "--", "sh", "-c", "exit 5")
    assert done.returncode == 5, done.stderr
    assert "not a UTF-8 CSV file" in done.stderr and "Traceback" not in done.stderr
    assert csv.read_bytes() == b"\xff\xfe t\x00i\x00m\x00e\x00\n"


def test_wrap_finds_the_agent_through_the_same_flags_config_and_environment_as_every_command(tmp_path):
    agent = AgentProcess(tmp_path / "state")
    try:
        config = tmp_path / "jouleward.toml"
        config.write_text(f'[agent]\ncontrol_socket = "{agent.socket_path}"\n')
        ways = [
            (("--state-dir", str(agent.state_dir)), clean_env()),
            (("--config", str(config)), clean_env()),
            ((), clean_env(JOULEWARD_STATE_DIR=str(agent.state_dir))),
            ((), clean_env(JOULEWARD_CONTROL_SOCKET=agent.socket_path)),
        ]
        for flags, env in ways:
            report = tmp_path / "r.json"
            done = jouleward("wrap", "--require-agent", *flags, "--report", str(report), "--", "true", env=env)
            assert done.returncode == 0, (flags, done.stderr)
            assert json.loads(report.read_text())["mode"] == "agent", flags
        bad = jouleward("wrap", "--config", str(tmp_path / "absent.toml"), "--", "true")
        assert bad.returncode == 2 and "--config" in bad.stderr and "Traceback" not in bad.stderr
    finally:
        agent.stop()


def test_by_default_clients_look_where_the_shipped_deployments_put_the_socket():
    unit = (REPO / "deploy/systemd/jouleward.service").read_text()
    unit_socket = next(
        line.split("=", 2)[2] for line in unit.splitlines() if line.startswith("Environment=JOULEWARD_CONTROL_SOCKET=")
    )
    daemonset = (REPO / "deploy/kubernetes/base/agent/daemonset.yaml").read_text().splitlines()
    index = next(i for i, line in enumerate(daemonset) if "name: JOULEWARD_CONTROL_SOCKET" in line)
    pod_socket = daemonset[index + 1].split("value:", 1)[1].strip()
    candidates = Config().control_socket_candidates
    assert Path(unit_socket) in candidates and Path(pod_socket) in candidates
    # The state directory's own socket first (where `jouleward run` puts it by default).
    assert candidates[0] == Config().state_dir / "control.sock"
    from agent.client import DEFAULT_CONTROL_SOCKETS

    assert set(DEFAULT_CONTROL_SOCKETS) <= set(candidates)


def test_a_wrap_inside_a_registered_job_runs_standalone_instead_of_stealing_it(tmp_path):
    agent = AgentProcess(tmp_path / "state")
    try:
        inner_report = tmp_path / "inner.json"
        inner = f"{sys.executable} -m agent.cli wrap --report {inner_report} -- sh -c 'exit 4'"
        done = jouleward(
            "wrap",
            "--require-agent",
            "--socket",
            agent.socket_path,
            "--",
            "sh",
            "-c",
            f"{inner}; echo inner=$?",
            env=clean_env(JOULEWARD_CONTROL_SOCKET=agent.socket_path),
        )
        assert done.returncode == 0, done.stderr
        assert "inner=4" in done.stdout
        assert "already belongs to registered job" in done.stderr and "measuring this command standalone" in done.stderr
        assert json.loads(inner_report.read_text())["mode"] == "standalone"
        assert sum(1 for j in agent.get("/v1/jobs")[1] if j["kind"] == "registered") == 1
    finally:
        agent.stop()


POD_UID = "5d1f3a2b-0000-4c1d-8e2f-000000000000"
WORK_UID = "5d1f3a2b-1111-4c1d-8e2f-111111111111"


def test_pod_job_ids_are_served_by_id_report_and_the_cli(tmp_path):
    """A Kubernetes job (``k8s-<namespace>.<name>`` where no run UID names it), from a fixture procfs and a
    real kubelet server: served by id, report and the CLI, literal or percent-encoded."""
    procfs = FakeProcfs(tmp_path / "proc")
    for pid, uid in ((4242, POD_UID), (4243, WORK_UID)):
        procfs.add(pid, boot_ticks() - 100, 0)
        (procfs.root / str(pid) / "cgroup").write_text(
            f"0::/kubepods.slice/kubepods-pod{uid.replace('-', '_')}.slice/cri-containerd-{'e' * 64}.scope\n"
        )
    kubelet = FakeKubelet(
        None,
        [
            pod_item(POD_UID, "llama-ft-worker-0", "research", {"training.kubeflow.org/job-name": "llama-ft"}),
            # A job whose name is also a sub-resource's: only its encoded id is unambiguous.
            pod_item(WORK_UID, "work-0", "research", {"batch.kubernetes.io/job-name": "work"}),
        ],
        tls=False,
    )
    Powercap(tmp_path / "sys")
    agent = AgentProcess(
        tmp_path / "state",
        "--procfs",
        str(procfs.root),
        sysfs=tmp_path / "sys",
        env={
            "JOULEWARD_KUBELET_ENABLED": "true",
            "JOULEWARD_KUBELET_URL": kubelet.url,
            "JOULEWARD_KUBELET_TOKEN_FILE": "",
        },
    )
    try:
        job_id = "k8s-research.llama-ft"
        wait_until(lambda: any(j["id"] == job_id for j in agent.get("/v1/jobs")[1]), timeout_s=20, what="the pod's job")
        for path in ("/v1/jobs/k8s%2Dresearch.llama-ft", "/v1/jobs/k8s-research.llama-ft"):
            status, job = agent.get(path)
            assert status == 200 and job["id"] == job_id and job["namespace"] == "research", (path, job)
            assert agent.control("GET", path)[1]["id"] == job_id
        for path in (
            "/v1/jobs/k8s%2Dresearch.llama-ft/report?format=json",
            "/v1/jobs/k8s-research.llama-ft/report?format=json",
        ):
            status, rows = agent.get(path)
            assert status == 200 and rows[0]["run_id"] == job_id, (path, rows)
        assert agent.get("/v1/jobs/k8s-research.nope")[0] == 404
        status, job = agent.get("/v1/jobs/k8s-research.work")
        assert status == 200 and job["id"] == "k8s-research.work"
        status, rows = agent.get("/v1/jobs/k8s-research.work/report?format=json")
        assert status == 200 and rows[0]["run_id"] == "k8s-research.work"
        # A registered job's sub-resources are still their own routes (405 lists their one method).
        conn = UnixHTTPConnection(agent.socket_path)
        conn.request("GET", "/v1/jobs/r-000000000000/finish")
        response = conn.getresponse()
        assert (response.status, response.getheader("allow")) == (405, "POST")
        conn.close()
        assert agent.get("/v1/jobs/r-000000000000/finish")[0] == 404  # no control routes on TCP without a token
        listen = f"127.0.0.1:{agent.port}"
        done = jouleward("report", job_id, "--format", "json", "--listen", listen)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)[0]["run_id"] == job_id
        listed = jouleward("jobs", "--listen", listen)
        assert listed.returncode == 0 and job_id in listed.stdout
    finally:
        agent.stop()
        kubelet.stop()


def test_jobs_and_report_reach_the_agent_over_its_control_socket_when_the_listener_is_elsewhere(tmp_path):
    agent = AgentProcess(tmp_path / "state")
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        _, job = agent.control("POST", "/v1/jobs", {"name": "via-socket", "pids": [sleeper.pid]})
        # This shell's configuration names a port nothing listens on and an empty state directory.
        elsewhere = ("--listen", f"127.0.0.1:{free_port()}", "--state-dir", str(tmp_path / "empty"))
        env = clean_env(JOULEWARD_CONTROL_SOCKET=agent.socket_path)
        listed = jouleward("jobs", *elsewhere, env=env)
        assert listed.returncode == 0, listed.stderr
        assert job["id"] in listed.stdout and "via-socket" in listed.stdout
        done = jouleward("report", job["id"], "--format", "json", *elsewhere, env=env)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)[0]["run_id"] == job["id"]
    finally:
        sleeper.kill()
        sleeper.wait()
        agent.stop()
