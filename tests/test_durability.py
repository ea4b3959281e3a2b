"""What the ledger promises across crashes: a real agent killed with SIGKILL
at random moments, on fixture RAPL and procfs trees that keep moving, never
exports a counter below what was scraped before the kill, loses no
acknowledged registration or work report, and keeps idle + unattributed +
jobs == measured with the overflow aggregate counted once."""

from __future__ import annotations

import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from agent.model import DomainAttribution
from tests.faultkit import (
    ROOT,
    AgentProcess,
    FakeProcfs,
    Powercap,
    Samples,
    boot_ticks,
    is_counter_sample,
    value,
)
from tests.support import free_port

PACKAGE = "intel-rapl:0"
# Counters of the agent's own process (the standard process collector) and of
# serving engines' scrapes count since the agent started, by definition.
PROCESS_LIFETIME = ("process_", "jouleward_work_source_", "jouleward_job_served_work_units")


def durable_counters(samples: Samples) -> Samples:
    return {
        key: v for key, v in samples.items() if is_counter_sample(key[0]) and not key[0].startswith(PROCESS_LIFETIME)
    }


def went_backwards(before: Samples, after: Samples) -> dict:
    after_counters = durable_counters(after)
    return {
        key: (old, after_counters[key])
        for key, old in durable_counters(before).items()
        if key in after_counters and after_counters[key] < old  # exactly: a reload must not lose a bit
    }


class MovingHost(threading.Thread):
    """Every few milliseconds: the package counter and the node's busy time
    advance, and each live fixture process gets its share of CPU time."""

    def __init__(self, rapl: Powercap, procfs: FakeProcfs) -> None:
        super().__init__(daemon=True)
        self.rapl, self.procfs = rapl, procfs
        self.lock = threading.Lock()
        self.cpu: dict[int, tuple[int, int]] = {}  # pid -> (start ticks, cpu ticks)
        self.halt = threading.Event()

    def spawn(self, pid: int, env: dict[str, str] | None = None) -> None:
        with self.lock:
            start = boot_ticks() - 10
            self.procfs.add(pid, start, 0, env=env)
            self.cpu[pid] = (start, 0)

    def exit(self, pid: int) -> None:
        with self.lock:
            self.cpu.pop(pid)
            self.procfs.remove(pid)

    def run(self) -> None:
        while not self.halt.wait(0.02):
            with self.lock:
                self.rapl.advance(PACKAGE, 0.5)
                for pid, (start, ticks) in self.cpu.items():
                    self.cpu[pid] = (start, ticks + 1)
                    self.procfs.set_cpu(pid, start, ticks + 1)
                self.procfs.advance_node(len(self.cpu) + 1, 1)


def start_agent(workdir: Path, procfs: FakeProcfs, flush_interval_s: float = 5.0) -> AgentProcess:
    agent = AgentProcess(
        workdir,
        workdir / "sys",
        procfs=procfs.root,
        interval_s=0.2,
        flush_interval_s=flush_interval_s,
        env={"JOULEWARD_MAX_EXPORTED_JOBS": "2", "JOULEWARD_FINISHED_JOB_RETENTION_S": "0.5"},
    )
    agent.wait_ready()
    agent.wait_ticks(1)  # the first tick after a start only takes the counters' baselines
    return agent


class Conservation:
    """idle + unattributed + jobs == measured, where "jobs" are the exported
    series plus the last value of each job series that has left the
    exposition (a finished job past its retention; its energy stays the
    node's). A job that comes back takes its old series up again, so it is
    counted once: in a series, or as retired, never both."""

    def __init__(self) -> None:
        self.present: dict[str, float] = {}
        self.retired: dict[str, float] = {}

    def check(self, samples: Samples) -> None:
        jobs = {
            dict(labels)["job_id"]: v
            for (name, labels), v in samples.items()
            if name == "jouleward_job_energy_joules_total" and ("domain", "cpu") in labels
        }
        for job_id, last in self.present.items():
            if job_id not in jobs:
                self.retired[job_id] = last
        for job_id in jobs:
            self.retired.pop(job_id, None)
        self.present = jobs
        node = value(samples, "jouleward_node_energy_joules_total", domain="cpu")
        idle = value(samples, "jouleward_idle_energy_joules_total", domain="cpu")
        unattributed = value(samples, "jouleward_unattributed_energy_joules_total", domain="cpu")
        charged = sum(jobs.values()) + sum(self.retired.values())
        assert idle + unattributed + charged == pytest.approx(node, abs=1e-6), (jobs, self.retired, node)


def scrape(agent: AgentProcess, conservation: Conservation) -> Samples:
    samples = agent.scrape()  # nothing negative or NaN; monotonic against this agent's previous scrape
    conservation.check(samples)
    return samples


def _kill_and_restart(tmp_path: Path, rounds: int) -> None:
    rng = random.Random(20261203)
    procfs = FakeProcfs(tmp_path / "proc")
    rapl = Powercap(tmp_path / "sys")
    host = MovingHost(rapl, procfs)
    for index, name in enumerate("abcd"):
        host.spawn(1000 + index, env={"JOULEWARD_JOB": f"job-{name}"})
    host.start()
    acknowledged: dict[str, float] = {}  # registered job id -> work units acknowledged
    conservation = Conservation()
    last: Samples = {}
    next_pid = 2000
    try:
        for round_index in range(rounds):
            # Churn between incarnations: a job ends, later one with the same id comes back; new ones appear.
            if round_index == 2:
                host.exit(1000)
            if round_index == 4:
                host.spawn(1100, env={"JOULEWARD_JOB": "job-a"})
            if round_index % 2:
                host.spawn(1200 + round_index, env={"JOULEWARD_JOB": f"job-new-{round_index}"})
            agent = start_agent(tmp_path, procfs)
            first = scrape(agent, conservation)
            assert not went_backwards(last, first), f"round {round_index}: {went_backwards(last, first)}"
            for job_id, units in acknowledged.items():
                body = httpx.get(f"{agent.url}/v1/jobs/{job_id}", timeout=10).json()
                assert body["work_units"].get("samples", 0.0) >= units - 1e-9, (job_id, body)
            with agent.control() as control:
                host.spawn(next_pid)
                answer = control.post("/v1/jobs", json={"name": f"reg-{round_index}", "pids": [next_pid]})
                assert answer.status_code == 201, answer.text
                job_id = answer.json()["id"]
                acknowledged[job_id] = 0.0
                next_pid += 1
                # The kill lands anywhere: between ticks, inside one, inside the first flush interval.
                deadline = time.monotonic() + rng.uniform(0.0, 1.5)
                while time.monotonic() < deadline:
                    reported = control.post(f"/v1/jobs/{job_id}/work", json={"unit": "samples", "count": 3})
                    assert reported.status_code == 200, reported.text
                    acknowledged[job_id] += 3
                    last = scrape(agent, conservation)
            agent.process.send_signal(signal.SIGKILL)
            agent.kill()
        final = start_agent(tmp_path, procfs)
        ending = scrape(final, conservation)
        assert not went_backwards(last, ending)
        final.wait_ticks(5)
        ending = scrape(final, conservation)
        assert final.terminate() == 0
    finally:
        host.halt.set()
        host.join()
    # The overflow aggregate really held jobs (the cap is 2), and the returning job-a was not summed twice.
    assert value(ending, "jouleward_job_energy_joules_total", job_id="_other", domain="cpu") > 0


def test_no_counter_goes_backwards_across_sigkills(tmp_path):
    _kill_and_restart(tmp_path, rounds=6)


@pytest.mark.slow
def test_no_counter_goes_backwards_across_many_sigkills(tmp_path):
    _kill_and_restart(tmp_path, rounds=40)


def test_registered_job_whose_root_exited_comes_back_with_its_descendants(tmp_path):
    """The registered root starts a child and exits; after a restart the job
    is still running, found through the child it had adopted."""
    procfs = FakeProcfs(tmp_path / "proc")
    Powercap(tmp_path / "sys")
    start = boot_ticks() - 100
    procfs.add(3000, start, 5, comm="launcher")
    agent = start_agent(tmp_path, procfs, flush_interval_s=3600)
    with agent.control() as control:
        answer = control.post("/v1/jobs", json={"name": "trainer", "pids": [3000]})
        assert answer.status_code == 201, answer.text
        job_id = answer.json()["id"]
    procfs.add(3001, start + 5, 50, comm="worker", ppid=3000)
    agent.wait_ticks(3)  # the child joins its parent's job
    procfs.remove(3000)
    procfs.set_cpu(3001, start + 5, 60, comm="worker", ppid=1)  # re-parented to init
    agent.wait_ticks(3)
    assert httpx.get(f"{agent.url}/v1/jobs/{job_id}", timeout=10).json()["running"] is True
    agent.process.send_signal(signal.SIGKILL)
    agent.kill()

    again = start_agent(tmp_path, procfs, flush_interval_s=3600)
    again.wait_ticks(2)
    body = httpx.get(f"{again.url}/v1/jobs/{job_id}", timeout=10).json()
    assert body["running"] is True, body
    procfs.set_cpu(3001, start + 5, 160, comm="worker", ppid=1)  # one more second of CPU, the job's
    again.wait_ticks(3)
    after = httpx.get(f"{again.url}/v1/jobs/{job_id}", timeout=10).json()
    assert after["cpu_s"] >= body["cpu_s"] + 1.0 - 1e-9, (body, after)
    procfs.remove(3001)
    again.wait_ticks(3)
    assert httpx.get(f"{again.url}/v1/jobs/{job_id}", timeout=10).json()["running"] is False
    assert again.terminate() == 0


def test_locked_ledger_answers_503_at_once_and_registers_nothing(tmp_path):
    """Another process holds the ledger's write lock: registering answers 503
    with a message well inside a second, nothing is half registered, ticks go
    on, exported energy waits at the durable value, and all of it appears once
    the lock is gone."""
    procfs = FakeProcfs(tmp_path / "proc")
    rapl = Powercap(tmp_path / "sys")
    procfs.add(4000, boot_ticks() - 100, 5)
    agent = start_agent(tmp_path, procfs)
    before = agent.settle()
    holder = sqlite3.connect(agent.state_dir / "ledger.sqlite3", isolation_level=None, timeout=5)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        rapl.advance(PACKAGE, 25)
        with agent.control() as control:
            started = time.monotonic()
            answer = control.post("/v1/jobs", json={"name": "blocked", "pids": [4000]})
            took = time.monotonic() - started
        assert answer.status_code == 503, answer.text
        assert "ledger" in answer.json()["detail"] and answer.headers["retry-after"] == "1"
        assert took < 1.5, took
        during = agent.settle(3)
        assert value(during, "jouleward_ticks_total") >= value(before, "jouleward_ticks_total") + 3
        assert value(during, "jouleward_ledger_errors_total") > 0
        node_before = value(before, "jouleward_node_energy_joules_total", device="package-0")
        assert value(during, "jouleward_node_energy_joules_total", device="package-0") == pytest.approx(node_before)
        jobs = httpx.get(f"{agent.url}/v1/jobs", timeout=10).json()
        assert not [j for j in jobs if j["name"] == "blocked"], jobs
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    with agent.control() as control:  # the same pid registers cleanly now: nothing was left claimed
        answer = control.post("/v1/jobs", json={"name": "blocked", "pids": [4000]})
        assert answer.status_code == 201, answer.text
    after = agent.settle(3)
    grown = value(after, "jouleward_node_energy_joules_total", device="package-0") - node_before
    assert grown == pytest.approx(25, abs=1e-6)
    assert agent.terminate() == 0


def _run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )


@pytest.mark.parametrize(
    "damage",
    ["garbage", "foreign", "newer"],
)
def test_unreadable_ledger_is_one_clear_message_in_every_command(tmp_path, damage):
    state = tmp_path / "state"
    state.mkdir()
    path = state / "ledger.sqlite3"
    if damage == "garbage":
        path.write_bytes(b"this is not a database\n" * 100)
    else:
        db = sqlite3.connect(path)
        if damage == "foreign":
            db.execute("CREATE TABLE photos (id INTEGER PRIMARY KEY, blob BLOB)")
        else:
            db.execute("CREATE TABLE jobs (id TEXT)")
            db.execute("PRAGMA user_version = 99")
        db.commit()
        db.close()
    listen = "127.0.0.1:9"  # nothing answers there: the commands read the ledger
    for command in (
        [
            "run",
            "--state-dir",
            str(state),
            "--listen",
            f"127.0.0.1:{free_port()}",
            "--control-socket",
            str(tmp_path / "c.sock"),
        ],
        ["jobs", "--state-dir", str(state), "--listen", listen, "--control-socket", str(tmp_path / "none.sock")],
        ["report", "r-0", "--state-dir", str(state), "--listen", listen, "--control-socket", str(tmp_path / "n.sock")],
    ):
        done = _run_cli(*command)
        assert done.returncode == 2, (command, done.stdout, done.stderr)
        assert "Traceback" not in done.stderr
        assert str(path) in done.stderr, done.stderr
        expected = {"garbage": "not an SQLite file", "foreign": "not a jouleward ledger's", "newer": "newer jouleward"}
        assert expected[damage] in done.stderr, done.stderr
        if command[0] == "run":
            assert "--fresh-ledger" in done.stderr
    assert path.read_bytes()[:16] != b"SQLite format 3\x00" or damage != "garbage"  # left as it was


def test_fresh_ledger_keeps_the_old_file_and_starts_new(tmp_path):
    procfs = FakeProcfs(tmp_path / "proc")
    Powercap(tmp_path / "sys")
    state = tmp_path / "state"
    state.mkdir()
    (state / "ledger.sqlite3").write_bytes(b"damaged" * 1000)
    agent = AgentProcess(tmp_path, tmp_path / "sys", procfs=procfs.root, extra_args=("--fresh-ledger",))
    agent.wait_ready()
    agent.settle()
    assert agent.terminate() == 0
    kept = [p for p in state.iterdir() if p.name.startswith("ledger.sqlite3.replaced-")]
    assert len(kept) == 1 and kept[0].read_bytes() == b"damaged" * 1000
    db = sqlite3.connect(state / "ledger.sqlite3")
    assert db.execute("PRAGMA user_version").fetchone()[0] == 2
    db.close()


def test_first_release_ledger_is_migrated_and_its_totals_continue(tmp_path):
    """A ledger as the first releases wrote it (no user_version): opened,
    migrated in place, and every total carries on from where it was."""
    from agent.ledger import schema

    procfs = FakeProcfs(tmp_path / "proc")
    Powercap(tmp_path / "sys")
    state = tmp_path / "state"
    state.mkdir()
    db = sqlite3.connect(state / "ledger.sqlite3")
    db.executescript(schema._SCHEMA_V1)
    db.execute("INSERT INTO node_energy VALUES ('cpu', 'package-0', 'rapl', 1234.5)")
    db.execute("INSERT INTO domain_totals VALUES ('cpu', 1000.0, 34.5)")
    db.execute(
        "INSERT INTO jobs VALUES ('env-old', 'old', 'env', '', '{}', ?, ?, NULL, 12.0, NULL)",
        (time.time() - 60, time.time() - 30),
    )
    db.execute("INSERT INTO job_energy VALUES ('env-old', 'cpu', 200.0)")
    db.commit()
    db.close()
    agent = AgentProcess(tmp_path, tmp_path / "sys", procfs=procfs.root)
    agent.wait_ready()
    samples = agent.settle()
    assert value(samples, "jouleward_node_energy_joules_total", device="package-0") >= 1234.5
    assert value(samples, "jouleward_idle_energy_joules_total", domain="cpu") >= 1000.0
    assert agent.terminate() == 0
    db = sqlite3.connect(state / "ledger.sqlite3")
    assert db.execute("PRAGMA user_version").fetchone()[0] == 2
    assert db.execute("SELECT energy_j FROM job_energy WHERE job_id = 'env-old'").fetchone()[0] == 200.0
    db.close()
    done = _run_cli("jobs", "--state-dir", str(state), "--listen", "127.0.0.1:9", "--control-socket", "/nonexistent")
    assert done.returncode == 0, done.stderr
    assert "env-old" in done.stdout


def test_a_failed_tick_books_its_energy_to_the_node(tmp_path, monkeypatch):
    """An exception after the sensors were read (here a resolver that fails
    once) must not lose the interval: the node and unattributed get it."""
    from agent.config import Config
    from agent.pipeline.daemon import Agent

    procfs = FakeProcfs(tmp_path / "proc")
    rapl = Powercap(tmp_path / "sys")
    procfs.add(5000, boot_ticks() - 100, 5, env={"JOULEWARD_JOB": "steady"})
    config = Config(procfs=procfs.root, sysfs=tmp_path / "sys", state_dir=tmp_path / "state", cpu_idle_fraction=0.0)
    agent = Agent(config)
    try:
        agent.tick()
        rapl.advance(PACKAGE, 10)
        procfs.advance_node(10, 10)
        agent.tick()
        booked = agent.snapshot
        real = agent.resolver.resolve

        def broken(processes):
            raise RuntimeError("a bug in the resolver")

        monkeypatch.setattr(agent.resolver, "resolve", broken)
        rapl.advance(PACKAGE, 7)
        with pytest.raises(RuntimeError):
            agent.tick()
        monkeypatch.setattr(agent.resolver, "resolve", real)
        rapl.advance(PACKAGE, 3)
        procfs.advance_node(0, 10)  # idle: with cpu_idle_fraction 0 and no load, nothing divides by zero
        after = agent.tick()

        def node(snapshot):
            return sum(d.energy_j for d in snapshot.devices if d.device == "package-0")

        assert node(after) - node(booked) == pytest.approx(10, abs=1e-6)
        gap = after.unattributed_j["cpu"] - booked.unattributed_j["cpu"]
        assert gap >= 7 - 1e-6
        total = after.idle_j["cpu"] + after.unattributed_j["cpu"] + sum(j.energy_j.get("cpu", 0.0) for j in after.jobs)
        assert total == pytest.approx(node(after), abs=1e-6)
    finally:
        agent.close()


def _ledger_with_finished_jobs(state: Path, count: int, finished_at: float):
    from agent.ledger.totals import Ledger
    from agent.model import JobRef

    ledger = Ledger(state)
    db = sqlite3.connect(state / "ledger.sqlite3")
    db.executemany(
        "INSERT INTO jobs VALUES (?, ?, 'env', '', '{}', ?, ?, ?, 1.5, NULL)",
        [(f"env-old-{i}", f"old-{i}", finished_at - 10, finished_at + i * 1e-3, finished_at) for i in range(count)],
    )
    db.executemany("INSERT INTO job_energy VALUES (?, 'cpu', ?)", [(f"env-old-{i}", float(i)) for i in range(count)])
    db.executemany("INSERT INTO job_work VALUES (?, 'samples', 7)", [(f"env-old-{i}",) for i in range(count)])
    db.commit()
    db.close()
    ledger.ensure_job(JobRef("env-live", "live", "env"), time.time())
    assert ledger.commit()
    return ledger


def test_listing_jobs_is_three_statements_outside_the_ledger_lock(tmp_path):
    """`GET /v1/jobs` reads finished jobs in three statements whatever their
    number, on a connection of its own: the tick's connection sees none of it."""
    ledger = _ledger_with_finished_jobs(tmp_path / "state", 2000, time.time() - 3600)
    try:
        reader_statements: list[str] = []
        writer_statements: list[str] = []
        ledger._reading().set_trace_callback(reader_statements.append)
        ledger._db.set_trace_callback(writer_statements.append)
        jobs = ledger.all_jobs(limit=1500)
        assert len(jobs) == 1500 and jobs[0].ref.id == "env-live"
        old = {j.ref.id: j for j in jobs}
        assert old["env-old-1999"].energy_j == {"cpu": 1999.0} and old["env-old-1999"].totals.work_units == {
            "samples": 7.0
        }
        assert len(reader_statements) == 3 and writer_statements == []  # rows, energy, work: not per job
        assert ledger.job("env-old-5").energy_j == {"cpu": 5.0}
        from agent.ledger.totals import JOB_ROWS, LIST_JOBS

        plan = " ".join(r[3] for r in ledger._reading().execute("EXPLAIN QUERY PLAN " + JOB_ROWS + LIST_JOBS, (10,)))
        assert "jobs_by_last_seen" in plan, plan
    finally:
        ledger.close()


def test_finished_jobs_leave_the_file_after_their_retention(tmp_path):
    from agent.ledger.totals import Ledger

    state = tmp_path / "state"
    _ledger_with_finished_jobs(state, 30, time.time() - 10 * 86400).close()
    ledger = Ledger(state, prune_finished_after_s=86400)
    try:
        assert ledger.job("env-old-3") is not None
        assert ledger.prune(time.time()) == 30
        assert ledger.job("env-old-3") is None
        assert [j.ref.id for j in ledger.all_jobs()] == ["env-live"]  # a running job is never pruned
        db = sqlite3.connect(state / "ledger.sqlite3")
        assert db.execute("SELECT count(*) FROM job_energy WHERE job_id LIKE 'env-old-%'").fetchone()[0] == 0
        db.close()
    finally:
        ledger.close()


def test_totals_reload_bit_for_bit(tmp_path):
    """What a restart loads is exactly what was written: a counter that came
    back even one unit in the last place lower would read as a reset."""
    from agent.ledger.totals import JobActivity, Ledger
    from agent.model import JobRef

    rng = random.Random(7)
    ledger = Ledger(tmp_path)
    grown = {}
    for index in range(50):
        ref = JobRef(f"env-{index}", f"j{index}", "env")
        ledger.ensure_job(ref, time.time())
        grown[ref.id] = {"cpu": rng.random() * 10 ** rng.randint(-6, 9), "dram": rng.random() / 3}
    ledger.book_tick(
        time.time(),
        [],
        [DomainAttribution(d, 0.0, 0.0, 0.0, {j: e[d] for j, e in grown.items()}) for d in ("cpu", "dram")],
        {job_id: JobActivity(ledger.jobs[job_id].ref, rng.random(), 1) for job_id in grown},
        1.0,
    )
    ledger.book_emissions({job_id: energy["cpu"] / 7 for job_id, energy in grown.items()}, 1.0 / 3)
    assert ledger.commit()
    before = {job_id: view.totals for job_id, view in ledger.jobs.items()}
    ledger.close()
    again = Ledger(tmp_path)
    try:
        assert {job_id: view.totals for job_id, view in again.jobs.items()} == before
        assert {view.ref.id: view.totals for view in again.all_jobs()} == before
    finally:
        again.close()


def test_jobs_only_seen_have_their_last_seen_written_in_one_statement(tmp_path):
    """A job seen again with nothing else changed costs the full commit one
    shared statement, not its whole row, and its last_seen survives a reload."""
    from agent.ledger.totals import JobActivity, Ledger
    from agent.model import JobRef

    ledger = Ledger(tmp_path)
    refs = [JobRef(f"env-{i}", f"j{i}", "env") for i in range(40)]
    for ref in refs:
        ledger.ensure_job(ref, 1000.0)
    assert ledger.commit(full=True)
    ledger.book_tick(2000.5, [], [], {ref.id: JobActivity(ref, 0.0, 1) for ref in refs}, 1.0)
    statements: list[str] = []
    ledger._db.set_trace_callback(statements.append)
    assert ledger.commit(full=False)
    assert not [s for s in statements if "jobs" in s and "last_seen" in s]  # waits for the full commit
    statements.clear()
    assert ledger.commit(full=True)
    touching_jobs = [s for s in statements if s.startswith(("UPDATE jobs", "INSERT INTO jobs"))]
    assert len(touching_jobs) == 40 and all(s.startswith("UPDATE jobs SET last_seen") for s in touching_jobs)
    assert not [s for s in statements if "job_energy" in s]
    ledger.close()
    again = Ledger(tmp_path)
    try:
        assert {view.last_seen for view in again.all_jobs()} == {2000.5}
    finally:
        again.close()
