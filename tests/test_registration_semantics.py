"""What a registration means, against a real agent over its real control
socket: a process belongs to one job, threads and absent pids are refused,
a caller in another pid namespace is understood, and a registration that
lands while a tick runs is not finished by that tick."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.support import (
    REPO,
    AgentProcess,
    UnixHTTPConnection,
    http_request,
    wait_until,
)


@pytest.fixture
def agent(tmp_path):
    process = AgentProcess(tmp_path / "state", interval_s=0.05)
    yield process
    process.stop()


@pytest.fixture
def spawned():
    procs: list[subprocess.Popen] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_a_registration_during_a_tick_is_not_finished_by_that_tick(agent, spawned):
    """Fresh processes registered the moment they exist, while the agent
    ticks every 50 ms: the tick that scanned before a process existed must
    not finish its job as exited."""
    conn_path = agent.socket_path
    jobs = []
    for index in range(150):
        proc = subprocess.Popen(["sleep", "120"])
        spawned.append(proc)
        status, job = http_request(
            UnixHTTPConnection(conn_path), "POST", "/v1/jobs", {"name": f"fresh-{index}", "pids": [proc.pid]}
        )
        assert status == 201, job
        jobs.append(job["id"])
    agent.wait_ticks(4)
    finished = []
    for job_id in jobs:
        status, job = agent.get(f"/v1/jobs/{job_id}")
        assert status == 200
        if not job["running"]:
            finished.append(job_id)
    assert finished == [], f"{len(finished)} of {len(jobs)} live jobs were finished as exited"
    assert all(proc.poll() is None for proc in spawned)
    # And a job whose process really exits is still finished.
    short = subprocess.Popen(["sleep", "0.3"])
    spawned.append(short)
    _, job = agent.control("POST", "/v1/jobs", {"name": "short", "pids": [short.pid]})
    short.wait()
    wait_until(
        lambda: agent.get(f"/v1/jobs/{job['id']}")[1]["running"] is False, timeout_s=10, what="the exited job to finish"
    )


def test_a_process_belongs_to_one_registered_job(agent, spawned):
    parent = subprocess.Popen(["sh", "-c", "sleep 120 & echo $!; wait"], stdout=subprocess.PIPE, text=True)
    spawned.append(parent)
    child_pid = int(parent.stdout.readline())
    status, first = agent.control("POST", "/v1/jobs", {"name": "first", "pids": [parent.pid]})
    assert status == 201
    status, again = agent.control("POST", "/v1/jobs", {"name": "again", "pids": [parent.pid]})
    assert status == 409
    assert again["detail"] == f"pid {parent.pid} already belongs to registered job {first['id']!r}"
    # A descendant is the job's too, seen by a tick or not.
    status, nested = agent.control("POST", "/v1/jobs", {"name": "nested", "pids": [child_pid]})
    assert status == 409
    # Before a tick adopts the child it is found through its ancestor; after, directly.
    assert nested["detail"] in (
        f"pid {child_pid} already belongs to registered job {first['id']!r} through its ancestor {parent.pid}",
        f"pid {child_pid} already belongs to registered job {first['id']!r}",
    )
    # Nothing was half applied: the first job still has both processes.
    agent.wait_ticks(3)
    assert agent.get(f"/v1/jobs/{first['id']}")[1]["processes"] == 2
    # Once the first job is finished, its processes are free again.
    assert agent.control("POST", f"/v1/jobs/{first['id']}/finish", {})[0] == 200
    status, later = agent.control("POST", "/v1/jobs", {"name": "later", "pids": [child_pid]})
    assert status == 201 and later["name"] == "later"


THREADED = (
    "import threading, time\nt = threading.Thread(target=time.sleep, args=(120,)); t.start()\n"
    "print(t.native_id, flush=True); t.join()"
)


def test_thread_ids_and_missing_pids_are_refused(agent, spawned):
    proc = subprocess.Popen([sys.executable, "-c", THREADED], stdout=subprocess.PIPE, text=True)
    spawned.append(proc)
    tid = int(proc.stdout.readline())
    assert tid != proc.pid and Path(f"/proc/{tid}/stat").exists()  # the kernel answers for a tid too
    status, answer = agent.control("POST", "/v1/jobs", {"name": "thread", "pids": [tid]})
    assert status == 400
    assert answer["detail"] == f"pid {tid}: a thread of process {proc.pid}, not a process; register the process"
    # No pids: not the HTTP client's own short-lived process, but a 422.
    status, answer = agent.control("POST", "/v1/jobs", {"name": "who"})
    assert status == 422 and answer["detail"] == "pids: Field required"
    status, answer = agent.control("POST", "/v1/jobs", {"name": "ok", "pids": [proc.pid]})
    assert status == 201


NAMESPACED_CLIENT = r"""
import json, os, socket, sys
sys.path.insert(0, sys.argv[2])
from agent.client import AgentError, ControlClient
client = ControlClient(sys.argv[1])
out = {"pid_here": os.getpid()}
try:
    out["other"] = client.register("other", [os.getpid() + 1000])
except AgentError as exc:
    out["other"] = {"status": exc.status, "message": exc.message}
out["self"] = client.register("in-namespace", [os.getpid()])
print(json.dumps(out), flush=True)
sys.stdin.readline()  # live until the test says
"""


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="a new pid namespace needs root")
def test_a_caller_in_another_pid_namespace_registers_itself_by_its_own_pid(agent, spawned):
    proc = subprocess.Popen(
        [
            "unshare",
            "--pid",
            "--fork",
            "--mount-proc",
            sys.executable,
            "-c",
            NAMESPACED_CLIENT,
            agent.socket_path,
            str(REPO),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    spawned.append(proc)
    answer = json.loads(proc.stdout.readline())
    assert answer["pid_here"] == 1  # the namespace's first process
    assert answer["other"]["status"] == 400 and "another pid namespace" in answer["other"]["message"]
    job = answer["self"]
    # The job is the client's process (found by its host pid), not host pid 1: it ends when the client does.
    agent.wait_ticks(3)
    status, seen = agent.get(f"/v1/jobs/{job['id']}")
    assert status == 200 and seen["running"] is True and seen["processes"] == 1
    proc.stdin.write("\n")
    proc.stdin.flush()
    proc.wait(10)
    wait_until(
        lambda: agent.get(f"/v1/jobs/{job['id']}")[1]["running"] is False,
        timeout_s=10,
        what="the namespaced client's job to finish when the client exits",
    )


def test_concurrent_registrations_of_one_process_give_one_job(agent, spawned):
    proc = subprocess.Popen(["sleep", "120"])
    spawned.append(proc)
    results: list[int] = []

    def claim(index: int) -> None:
        status, _ = http_request(
            UnixHTTPConnection(agent.socket_path), "POST", "/v1/jobs", {"name": f"claim-{index}", "pids": [proc.pid]}
        )
        results.append(status)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(results) == [201] + [409] * 7
    time.sleep(0.2)
