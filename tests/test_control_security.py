"""The control API on a real Unix socket, a real agent behind it, and a real
second uid (``nobody``) in a forked child."""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from agent.client import AgentError, ControlClient
from tests.support import UnixHTTPConnection, http_request, wait_until

NOBODY = 65534
ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="switching to a second uid needs root")


@pytest.fixture
def control_socket():
    """A real agent (`jouleward run`) with its control socket."""
    # World-traversable directory: the second uid must reach the socket.
    base = Path(tempfile.mkdtemp(prefix="jw-ctl-"))
    base.chmod(0o755)
    socket_path = base / "control.sock"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    agent = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agent.cli",
            "run",
            "--state-dir",
            str(base / "state"),
            "--control-socket",
            str(socket_path),
            "--listen",
            f"127.0.0.1:{port}",
            "--interval",
            "0.2",
            "--log-level",
            "warning",
        ],
        cwd=ROOT,
    )

    def answering() -> bool:
        # The socket file appears before the server accepts on it: wait for an answer.
        assert agent.poll() is None, "agent exited"
        return socket_path.exists() and http_request(UnixHTTPConnection(str(socket_path)), "GET", "/healthz")[0] == 200

    wait_until(answering, timeout_s=30, what="the control socket to answer", ignore=(OSError,))
    yield socket_path
    agent.send_signal(signal.SIGTERM)
    agent.wait(15)
    subprocess.run(["rm", "-rf", str(base)], check=False)


def as_uid(uid, action):
    """Run ``action()`` in a forked child with real and effective uid ``uid``; return its result."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            result = action()
        except AgentError as exc:
            result = {"status": exc.status, "message": exc.message}
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            result = {"crash": repr(exc)}
        os.write(write_fd, json.dumps(result).encode())
        os._exit(0)
    os.close(write_fd)
    chunks = []
    while chunk := os.read(read_fd, 65536):
        chunks.append(chunk)
    os.close(read_fd)
    os.waitpid(pid, 0)
    return json.loads(b"".join(chunks))


def spawn_as(uid):
    return subprocess.Popen(["sleep", "60"], user=uid, group=uid, extra_groups=[])


def test_second_uid_cannot_register_or_finish_the_first_uids_processes(control_socket):
    client = ControlClient(control_socket)
    root_sleep = subprocess.Popen(["sleep", "60"])
    nobody_sleep = spawn_as(NOBODY)
    try:
        root_job = client.register("root-train", [root_sleep.pid], {"team": "a"})
        assert root_job["kind"] == "registered" and root_job["name"] == "root-train"

        # nobody may not register root's process ...
        denied = as_uid(NOBODY, lambda: ControlClient(control_socket).register("steal", [root_sleep.pid]))
        assert denied["status"] == 403 and f"pid {root_sleep.pid}" in denied["message"]
        # ... nor finish, nor add work to, root's job.
        denied = as_uid(NOBODY, lambda: ControlClient(control_socket).finish(root_job["id"]))
        assert denied["status"] == 403
        denied = as_uid(NOBODY, lambda: ControlClient(control_socket).add_work(root_job["id"], "tokens", 5))
        assert denied["status"] == 403

        # nobody may register its own process, report work and finish its own job.
        def own_job():
            c = ControlClient(control_socket)
            job = c.register("nobody-eval", [nobody_sleep.pid])
            work = c.add_work(job["id"], "samples", 128)
            done = c.finish(job["id"])
            return {"job": job, "work": work, "done": done}

        mine = as_uid(NOBODY, own_job)
        assert mine["job"]["name"] == "nobody-eval"
        assert mine["work"]["work_units"] == {"samples": 128.0}
        assert mine["done"]["running"] is False

        # Root may do anything: register nobody's process, finish root's job.
        assert client.register("ops", [nobody_sleep.pid])["name"] == "ops"
        assert client.add_work(root_job["id"], "tokens", 1000)["work_units"] == {"tokens": 1000.0}
        assert client.add_work(root_job["id"], "tokens", 234)["work_units"] == {"tokens": 1234.0}
        assert client.finish(root_job["id"])["running"] is False
    finally:
        for proc in (root_sleep, nobody_sleep):
            proc.kill()
            proc.wait()


@pytest.mark.parametrize(
    "body, status, fragment",
    [
        ({"name": "", "pids": [1]}, 422, "name: must not be empty"),
        ({"name": "x" * 129, "pids": [1]}, 422, "longer than 128"),
        ({"name": "a\x1b[2Jb", "pids": [1]}, 422, "control characters"),
        ({"name": "ok", "pids": [1], "labels": {"bad-key": "v"}}, 422, "key 'bad-key'"),
        ({"name": "ok", "pids": [1], "labels": {"k": "v" * 257}}, 422, "longer than 256"),
        ({"name": "ok", "pids": [1], "labels": {"k": "a\nb"}}, 422, "control characters"),
        ({"name": "ok", "pids": []}, 422, "pids"),
        ({"name": "ok", "pids": [2**22 + 12345]}, 404, "no such process"),
        ({"name": "ok", "pids": ["1"]}, 422, "valid integer"),
    ],
)
def test_invalid_registrations_get_a_clear_4xx(control_socket, body, status, fragment):
    with pytest.raises(AgentError) as caught:
        ControlClient(control_socket).request("POST", "/v1/jobs", body)
    assert caught.value.status == status
    assert fragment in caught.value.message


def test_invalid_work_reports_and_unknown_jobs(control_socket):
    client = ControlClient(control_socket)
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        job = client.register("w", [sleeper.pid])
        for unit, count in (("Tokens", 1), ("tokens", -1), ("tokens", "many"), ("tokens", float("inf"))):
            with pytest.raises(AgentError) as caught:
                client.request(
                    "POST",
                    f"/v1/jobs/{job['id']}/work",
                    {"unit": unit, "count": count} if count != float("inf") else None,
                )
            assert caught.value.status in (400, 422)
        with pytest.raises(AgentError) as caught:
            client.finish("r-000000000000")
        assert caught.value.status == 404
    finally:
        sleeper.kill()
        sleeper.wait()
