"""Hostile callers of a real agent: oversized, slow, lying and unauthenticated
requests over the real control socket and the real TCP listener, and the
agent's own lifecycle (one per state directory, exit status when a part
dies, liveness when the sampler stalls)."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.faultkit import Powercap
from tests.support import REPO, AgentProcess, free_port, wait_until

TOKEN = "s3cret-token-0123456789"


def connect_unix(path: str | Path, timeout_s: float = 10.0) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    sock.connect(str(path))
    return sock


def connect_tcp(port: int, timeout_s: float = 10.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout_s)


def read_response(sock: socket.socket) -> tuple[int, dict, dict[str, str]]:
    """Status, JSON body and headers of one HTTP/1.1 response."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed inside the body"
        body += chunk
    return status, json.loads(body[:length]) if length else {}, headers


def request(
    sock: socket.socket, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> tuple[int, dict, dict[str, str]]:
    head = {
        "Host": "localhost",
        "Content-Length": str(len(body)),
        "Content-Type": "application/json",
        **(headers or {}),
    }
    sock.sendall(
        f"{method} {path} HTTP/1.1\r\n".encode()
        + "".join(f"{k}: {v}\r\n" for k, v in head.items()).encode()
        + b"\r\n"
        + body
    )
    try:
        return read_response(sock)
    finally:
        sock.close()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.fixture
def agent(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    process = AgentProcess(
        tmp_path / "state", env={"JOULEWARD_CONTROL_TOKEN_FILE": str(token_file), "JOULEWARD_REQUEST_TIMEOUT_S": "1.5"}
    )
    yield process
    process.stop()


@pytest.fixture
def sleeper():
    proc = subprocess.Popen(["sleep", "120"])
    yield proc
    proc.kill()
    proc.wait()


# -- bodies ----------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["unix", "tcp"])
def test_a_declared_300_mb_body_is_refused_413_before_it_is_read(agent, where):
    sock = connect_unix(agent.socket_path, 5) if where == "unix" else connect_tcp(agent.port, 5)
    headers = {"Authorization": f"Bearer {TOKEN}"} if where == "tcp" else {}
    head = {
        "Host": "localhost",
        "Content-Length": str(300 * 1024 * 1024),
        "Content-Type": "application/json",
        **headers,
    }
    started = time.monotonic()
    sock.sendall(
        b"POST /v1/jobs HTTP/1.1\r\n"
        + "".join(f"{k}: {v}\r\n" for k, v in head.items()).encode()
        + b"\r\n"
        + b'{"name": "'
    )
    status, body, response_headers = read_response(sock)
    sock.close()
    assert status == 413, body
    assert time.monotonic() - started < 2.0  # answered at once: nothing of the 300 MB was awaited
    assert "16384 bytes" in body["detail"] and "max_request_body_bytes" in body["detail"]
    assert response_headers.get("connection") == "close"


def test_a_streamed_body_is_cut_off_at_the_cap_and_memory_stays_flat(agent):
    before = rss_kib(agent.proc.pid)
    sock = connect_unix(agent.socket_path, 10)
    sock.sendall(
        b"POST /v1/jobs HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Type: application/json\r\n\r\n"
    )
    chunk = b"x" * 65536
    sent = 0
    try:
        while sent < 64 * 1024 * 1024:  # stream up to 64 MiB; the agent must stop reading long before
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sent += len(chunk)
    except (BrokenPipeError, ConnectionResetError):
        pass
    status, body, _ = read_response(sock)
    sock.close()
    assert status == 413 and "over the limit of 16384 bytes" in body["detail"]
    assert sent < 16 * 1024 * 1024, f"the agent read {sent} bytes before refusing"
    assert rss_kib(agent.proc.pid) - before < 20 * 1024
    assert agent.control("GET", "/healthz")[0] == 200


def test_the_body_cap_is_configurable(tmp_path, sleeper):
    body = json.dumps(
        {"name": "big-labels", "pids": [sleeper.pid], "labels": {f"k{i}": "v" * 200 for i in range(20)}}
    ).encode()
    assert 4096 < len(body) < 16384
    small = AgentProcess(tmp_path / "state", env={"JOULEWARD_MAX_REQUEST_BODY_BYTES": "4096"})
    try:
        status, answer, _ = request(connect_unix(small.socket_path), "POST", "/v1/jobs", body)
        assert status == 413 and "4096 bytes" in answer["detail"]
    finally:
        small.stop()
    default = AgentProcess(tmp_path / "state2")
    try:
        status, answer, _ = request(connect_unix(default.socket_path), "POST", "/v1/jobs", body)
        assert status == 201 and len(answer["labels"]) == 20
    finally:
        default.stop()


def test_bodies_that_are_not_json_get_400_with_a_message(agent, sleeper):
    for raw in (b"hello", b'{"name": "x", "pids": [1]', b"\xff\xfe{}"):
        status, answer, _ = request(connect_unix(agent.socket_path), "POST", "/v1/jobs", raw)
        assert status == 400, (raw, answer)
        assert answer["detail"].startswith("body: not valid JSON")
    # JSON is JSON whatever the Content-Type says (curl -d sends a form type).
    status, answer, _ = request(
        connect_unix(agent.socket_path),
        "POST",
        "/v1/jobs",
        json.dumps({"name": "curl", "pids": [sleeper.pid]}).encode(),
        {"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert status == 201 and answer["name"] == "curl"


def test_an_unauthenticated_tcp_caller_gets_401_before_its_body_is_looked_at(agent, sleeper):
    invalid = json.dumps({"name": "", "pids": ["one"], "labels": {"bad-key": 1}}).encode()
    for body in (invalid, b"not json at all"):
        status, answer, headers = request(connect_tcp(agent.port), "POST", "/v1/jobs", body)
        assert status == 401, answer
        assert "bearer token" in answer["detail"] and "pids" not in answer["detail"]
        assert headers.get("www-authenticate") == "Bearer"
    status, answer, _ = request(
        connect_tcp(agent.port), "POST", "/v1/jobs", invalid, {"Authorization": "Bearer wrong-token-000000000"}
    )
    assert status == 401 and "name" not in answer["detail"]
    # With the token, the same body gets its validation message.
    auth = {"Authorization": f"Bearer {TOKEN}"}
    status, answer, _ = request(connect_tcp(agent.port), "POST", "/v1/jobs", invalid, auth)
    assert status == 422 and "name" in answer["detail"]
    status, answer, _ = request(
        connect_tcp(agent.port), "POST", "/v1/jobs", json.dumps({"name": "tcp", "pids": [sleeper.pid]}).encode(), auth
    )
    assert status == 201
    # Reads stay open.
    assert agent.get("/healthz")[0] == 200


def test_slow_and_lying_requests_do_not_hold_other_requests(agent):
    # A body that never comes: Content-Length says 100, 10 bytes arrive.
    lying = connect_unix(agent.socket_path, 10)
    lying.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b'{"name": "')
    # A head that trickles in, a few bytes a second.
    trickle = connect_tcp(agent.port, 10)
    trickle.sendall(b"GET /healthz HTT")
    slow_body = connect_tcp(agent.port, 10)
    slow_body.sendall(
        f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 50\r\n\r\n".encode()
    )
    started = time.monotonic()

    stop = threading.Event()

    def keep_trickling() -> None:
        while not stop.wait(0.4):
            try:
                trickle.send(b"P")
            except OSError:
                return

    threading.Thread(target=keep_trickling, daemon=True).start()
    try:
        # Meanwhile everyone else is served at once, on both listeners.
        for _ in range(5):
            t0 = time.monotonic()
            assert agent.get("/healthz")[0] == 200
            assert agent.control("GET", "/healthz")[0] == 200
            assert time.monotonic() - t0 < 1.0
        status, answer, _ = read_response(lying)
        assert status == 408 and "request_timeout_s" in answer["detail"]
        assert 1.2 < time.monotonic() - started < 5.0
        status, answer, _ = read_response(slow_body)
        assert status == 408
        # The trickling head is cut off: the connection is closed without an answer.
        trickle.settimeout(6.0)
        data = b""
        while chunk := trickle.recv(4096):
            data += chunk
        assert data == b"" or b"408" in data or b"400" in data
        assert time.monotonic() - started < 6.0
    finally:
        stop.set()
        for sock in (lying, trickle, slow_body):
            sock.close()


# -- one agent per state directory, and the control socket is never stolen ---------------
def run_agent(*args: str, timeout_s: float = 30.0) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOULEWARD_")}
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", "run", "--log-level", "warning", *args],
        check=False,
        cwd=REPO,
        env={**env, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def test_a_second_agent_on_the_same_state_directory_exits_2_and_leaves_the_first_alone(agent):
    inode = os.stat(agent.socket_path).st_ino
    second = run_agent("--state-dir", str(agent.state_dir), "--listen", f"127.0.0.1:{free_port()}")
    assert second.returncode == 2, second.stderr
    assert str(agent.state_dir) in second.stderr and "in use by another agent" in second.stderr
    assert f"pid {agent.proc.pid}" in second.stderr
    assert "Traceback" not in second.stderr
    assert os.stat(agent.socket_path).st_ino == inode
    assert agent.control("GET", "/healthz")[0] == 200
    # Another state directory, but the first agent's socket: refused too, socket untouched.
    third = run_agent(
        "--state-dir",
        str(agent.state_dir.parent / "other"),
        "--control-socket",
        agent.socket_path,
        "--listen",
        f"127.0.0.1:{free_port()}",
    )
    assert third.returncode == 2 and "another process is listening" in third.stderr, third.stderr
    assert os.stat(agent.socket_path).st_ino == inode
    assert agent.control("GET", "/healthz")[0] == 200


def test_a_control_socket_path_that_is_not_a_socket_is_refused_not_deleted(tmp_path):
    precious = tmp_path / "notes.txt"
    precious.write_text("do not delete\n")
    done = run_agent(
        "--state-dir",
        str(tmp_path / "state"),
        "--control-socket",
        str(precious),
        "--listen",
        f"127.0.0.1:{free_port()}",
    )
    assert done.returncode == 2
    assert "is not a socket" in done.stderr and str(precious) in done.stderr
    assert precious.read_text() == "do not delete\n"


def test_a_stale_socket_of_a_dead_agent_is_replaced(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(state / "control.sock"))
    stale.close()  # bound, never listening: what a killed agent leaves
    assert stat.S_ISSOCK(os.lstat(state / "control.sock").st_mode)
    fresh = AgentProcess(state)
    try:
        assert fresh.control("GET", "/healthz")[0] == 200
    finally:
        fresh.stop()


# -- liveness --------------------------------------------------------------------------
def test_the_agent_exits_non_zero_when_its_control_socket_is_lost(tmp_path):
    process = AgentProcess(tmp_path / "state")
    try:
        os.unlink(process.socket_path)  # a clean-up job, or an operator's rm
        process.proc.wait(15)
        assert process.proc.returncode == 1
        assert "control socket" in process.log() and "removed or replaced" in process.log()
    finally:
        process.stop()


def test_healthz_fails_while_the_sampler_is_stalled(tmp_path):
    sysfs = tmp_path / "sys"
    powercap = Powercap(sysfs)
    process = AgentProcess(tmp_path / "state", sysfs=sysfs, env={"JOULEWARD_SAMPLER_STALL_S": "2"})
    fifo = powercap.path("intel-rapl:0")
    try:
        assert process.get("/healthz")[0] == 200
        # A sysfs read that hangs (a sick device driver): the next tick blocks on it.
        fifo.unlink()
        os.mkfifo(fifo)
        wait_until(lambda: process.get("/healthz")[0] == 503, timeout_s=15, what="/healthz to fail")
        _status, body = process.get("/healthz")
        assert "sampler stalled" in body["detail"] and "sampler_stall_s 2 s" in body["detail"]
        assert process.control("GET", "/healthz")[0] == 503
        # The read completes: the sampler recovers, and so does liveness.
        with open(fifo, "w") as writer:
            writer.write("2000000\n")
        fifo.unlink()
        powercap.set("intel-rapl:0", 3_000_000)
        wait_until(lambda: process.get("/healthz")[0] == 200, timeout_s=15, what="/healthz to recover")
    finally:
        if fifo.exists() and stat.S_ISFIFO(os.lstat(fifo).st_mode):  # unblock a reader, so the agent can stop
            with open(fifo, "w") as writer:
                writer.write("2000000\n")
        process.stop()
