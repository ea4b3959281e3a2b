"""Kubelet and control-token settings, and the TCP control listener that
exists only with a token: real agent processes over loopback."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import ConfigError, build
from agent.workloads.kubelet import DEFAULT_TOKEN_FILE
from agent.workloads.mljob import DEFAULT_JOB_LABELS
from tests.support import REPO, AgentProcess, free_port

TOKEN = "tcp-control-token-0123456789"


def write_toml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_node_name_from_the_downward_api_else_the_host_name(tmp_path):
    import socket

    assert build(environ={}).node == socket.gethostname()
    assert build(environ={"NODE_NAME": "gpu-node-7"}).node == "gpu-node-7"
    assert build(environ={"NODE_NAME": "  "}).node == socket.gethostname()
    # The agent's own variable wins over the DaemonSet's, the environment over the file.
    assert build(environ={"NODE_NAME": "a", "JOULEWARD_NODE_NAME": "b"}).node == "b"
    (tmp_path / "agent.toml").write_text('node_name = "from-file"\n')
    assert build(tmp_path / "agent.toml", environ={}).node == "from-file"
    assert build(tmp_path / "agent.toml", environ={"NODE_NAME": "from-env"}).node == "from-env"


def test_kubelet_settings_from_toml_and_environment(tmp_path):
    toml = write_toml(
        tmp_path / "agent.toml",
        """
[agent]
kubelet_enabled = true
kubelet_url = "https://127.0.0.1:10250/pods"
kubelet_ca_file = "/etc/kubelet-ca.crt"
kubelet_poll_s = 15
pod_job_labels = ["example.com/run", "training.kubeflow.org/job-name"]
control_token_file = "/etc/jouleward/token"
""",
    )
    config = build(toml, environ={"JOULEWARD_KUBELET_TIMEOUT_S": "2.5", "JOULEWARD_KUBELET_TOKEN_FILE": "/t"})
    assert config.kubelet_enabled is True
    assert (config.kubelet_poll_s, config.kubelet_timeout_s) == (15.0, 2.5)
    assert config.kubelet_ca_file == Path("/etc/kubelet-ca.crt")
    assert config.kubelet_token_file == Path("/t")
    assert config.pod_job_labels == ("example.com/run", "training.kubeflow.org/job-name")
    assert config.control_token_file == Path("/etc/jouleward/token")
    defaults = build(environ={})
    assert (defaults.kubelet_enabled, defaults.pod_job_labels, defaults.kubelet_token_file) == (
        None,
        DEFAULT_JOB_LABELS,
        DEFAULT_TOKEN_FILE,
    )
    # Automatic: off outside a pod, on once a kubelet URL is given, and an explicit false wins.
    assert defaults.kubelet_active is DEFAULT_TOKEN_FILE.is_file()
    assert build(environ={"JOULEWARD_KUBELET_URL": "http://127.0.0.1:1/pods"}).kubelet_active is True
    assert (
        build(
            environ={"JOULEWARD_KUBELET_URL": "http://127.0.0.1:1/pods", "JOULEWARD_KUBELET_ENABLED": "false"}
        ).kubelet_active
        is False
    )
    assert defaults.control_token_file is None
    assert build(write_toml(tmp_path / "b.toml", 'kubelet_token_file = ""\n'), environ={}).kubelet_token_file is None


@pytest.mark.parametrize(
    "toml, message",
    [
        ('kubelet_enabled = "maybe"', "kubelet_enabled: expected true or false"),
        ('kubelet_url = "ftp://127.0.0.1/pods"', "kubelet_url: expected an http:// or https:// URL"),
        ("kubelet_poll_s = 0.5", "kubelet_poll_s: 0.5 is outside 1.0..3600.0"),
        ("kubelet_timeout_s = -1", "kubelet_timeout_s: -1.0 is outside"),
        (
            'pod_job_labels = ["ok/name", "has space"]',
            "pod_job_labels: entry 2, 'has space', is not a Kubernetes label key",
        ),
        ('pod_job_labels = "training.kubeflow.org/job-name"', "pod_job_labels: expected a list"),
        (
            'kubelet_insecure_skip_verify = true\nkubelet_ca_file = "/ca.crt"',
            "kubelet_ca_file and kubelet_insecure_skip",
        ),
        ("control_token_file = 7", "control_token_file: expected a path"),
    ],
)
def test_bad_settings_name_the_key(tmp_path, toml, message):
    with pytest.raises(ConfigError, match=None) as caught:
        build(write_toml(tmp_path / "bad.toml", toml + "\n"), environ={})
    assert message in str(caught.value)


def test_cli_reports_a_bad_setting_and_exits_2(tmp_path):
    toml = write_toml(tmp_path / "bad.toml", 'kubelet_url = "not a url"\n')
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "agent.cli",
            "run",
            "--config",
            str(toml),
            "--state-dir",
            str(tmp_path / "state"),
            "--listen",
            f"127.0.0.1:{free_port()}",
        ],
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "kubelet_url: expected an http:// or https:// URL, got 'not a url'" in result.stderr
    assert "Traceback" not in result.stderr


def tcp(agent: AgentProcess, method: str, path: str, body=None, token: str | None = None) -> tuple[int, object]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=10)
    try:
        conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
        response = conn.getresponse()
        data = response.read()
    finally:
        conn.close()
    return response.status, json.loads(data) if data.startswith(b"{") else data.decode()


def test_no_token_configured_means_no_control_on_tcp(tmp_path, agents, processes):
    agent = AgentProcess(tmp_path / "state", sysfs=tmp_path / "nosys")
    agents.append(agent)
    sleeper = subprocess.Popen(["sleep", "60"])
    processes.append(sleeper)
    body = {"name": "over-tcp", "pids": [sleeper.pid]}
    assert tcp(agent, "POST", "/v1/jobs", body, token=TOKEN)[0] == 405
    assert tcp(agent, "POST", "/v1/jobs/r-000000000000/finish", token=TOKEN)[0] == 404
    assert tcp(agent, "POST", "/v1/jobs/r-000000000000/work", {"unit": "tokens", "count": 1}, token=TOKEN)[0] == 404
    status, listed = tcp(agent, "GET", "/v1/jobs")
    assert status == 200 and "over-tcp" not in json.dumps(listed)


def test_token_configured_enables_control_on_tcp_with_the_token_only(tmp_path, agents, processes):
    token_file = tmp_path / "control-token"
    token_file.write_text(TOKEN + "\n")
    config = write_toml(tmp_path / "agent.toml", f'control_token_file = "{token_file}"\n')
    agent = AgentProcess(tmp_path / "state", sysfs=tmp_path / "nosys", config=config)
    agents.append(agent)
    sleeper = subprocess.Popen(["sleep", "60"])
    processes.append(sleeper)
    body = {"name": "over-tcp", "pids": [sleeper.pid], "labels": {"team": "infra"}}

    status, answer = tcp(agent, "POST", "/v1/jobs", body)
    assert (status, answer["detail"]) == (401, "control requests need the Unix control socket or a valid bearer token")
    assert tcp(agent, "POST", "/v1/jobs", body, token="wrong-token-0123456789")[0] == 401
    assert tcp(agent, "POST", "/v1/jobs", body, token=TOKEN[:-1])[0] == 401
    # Every caller must name the pids (a TCP caller has no peer process anyway).
    assert tcp(agent, "POST", "/v1/jobs", {"name": "no-pids"}, token=TOKEN) == (422, {"detail": "pids: Field required"})

    status, job = tcp(agent, "POST", "/v1/jobs", body, token=TOKEN)
    assert status == 201, job
    assert (job["name"], job["labels"], job["running"]) == ("over-tcp", {"team": "infra"}, True)
    assert tcp(agent, "POST", f"/v1/jobs/{job['id']}/work", {"unit": "samples", "count": 64})[0] == 401
    status, worked = tcp(agent, "POST", f"/v1/jobs/{job['id']}/work", {"unit": "samples", "count": 64}, token=TOKEN)
    assert (status, worked["work_units"]) == (200, {"samples": 64.0})
    status, done = tcp(agent, "POST", f"/v1/jobs/{job['id']}/finish", token=TOKEN)
    assert (status, done["running"]) == (200, False)
    # Reads stay open without the token.
    assert tcp(agent, "GET", f"/v1/jobs/{job['id']}")[0] == 200
    assert tcp(agent, "GET", "/metrics")[0] == 200


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "cannot read"),
        ("short", "the token must be at least 16 characters"),
    ],
)
def test_unusable_token_file_stops_the_agent_with_a_message(tmp_path, content, message):
    token_file = tmp_path / "control-token"
    if content is not None:
        token_file.write_text(content)
    config = write_toml(tmp_path / "agent.toml", f'control_token_file = "{token_file}"\n')
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "agent.cli",
            "run",
            "--config",
            str(config),
            "--state-dir",
            str(tmp_path / "state"),
            "--listen",
            f"127.0.0.1:{free_port()}",
            "--sysfs",
            str(tmp_path / "nosys"),
        ],
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert f"control_token_file {token_file}: {message}" in result.stderr
    assert "Traceback" not in result.stderr
