"""Faults injected while a real agent runs. In every test the agent keeps
serving /metrics, exports nothing negative or NaN, keeps every counter
monotonic across scrapes (``AgentProcess.scrape`` checks all three), and the
fault shows in its health metrics."""

from __future__ import annotations

import os
import random
import resource
import shutil
import signal
import sqlite3
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests.faultkit import (
    CLK_TCK,
    AgentProcess,
    FakeProcfs,
    Powercap,
    boot_ticks,
    conservation_gap_j,
    unprivileged_uid,
    value,
    write_atomic,
)

PACKAGE = "intel-rapl:0"
DRAM = "intel-rapl:0:0"
LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")


def node_j(samples, device: str = "package-0") -> float:
    return value(samples, "jouleward_node_energy_joules_total", device=device)


def errors(samples, device: str = "package-0") -> float:
    return value(samples, "jouleward_sensor_errors_total", sensor="powercap", device=device)


def up(samples, device: str = "package-0") -> float:
    return value(samples, "jouleward_sensor_up", sensor="powercap", device=device)


@pytest.fixture
def agent_on(tmp_path):
    started: list[AgentProcess] = []

    def start(powercap_sockets: int = 1, max_range_uj: int | None = None, **kwargs) -> tuple[AgentProcess, Powercap]:
        sysfs = tmp_path / "sys"
        powercap = Powercap(sysfs, powercap_sockets, **({"max_range_uj": max_range_uj} if max_range_uj else {}))
        agent = AgentProcess(tmp_path, sysfs, **kwargs)
        started.append(agent)
        agent.wait_ready()
        agent.settle()
        return agent, powercap

    yield start
    for agent in started:
        agent.kill()


def test_wraparound_is_counted_once(agent_on):
    agent, rapl = agent_on(max_range_uj=1_000_000_000)  # wraps every 1,000 J
    before = node_j(agent.scrape())
    rapl.set(PACKAGE, 100_000_000)  # +99 J
    agent.settle()
    rapl.set(PACKAGE, 900_000_000)  # +800 J
    agent.settle()
    rapl.set(PACKAGE, 30_000_000)  # wraps: +100 J to the top, +30 J after
    after = agent.settle()
    assert node_j(after) - before == pytest.approx(99 + 800 + 130, abs=1e-6)
    assert up(after) == 1.0  # a wraparound is normal operation, not a fault
    assert conservation_gap_j(after, "cpu") < 1e-6


def test_counter_reset_books_nothing_for_the_jump_and_counts_an_error(agent_on):
    agent, rapl = agent_on()
    before = agent.scrape()
    rapl.set(PACKAGE, 500_000_000)  # +499 J
    agent.settle()
    rapl.set(PACKAGE, 2_000_000)  # driver reloaded: far more than a wrap in one tick could explain
    agent.settle()
    rapl.set(PACKAGE, 12_000_000)  # +10 J after the reset
    after = agent.settle()
    assert node_j(after) - node_j(before) == pytest.approx(499 + 10, abs=1e-6)
    assert errors(after) - errors(before) >= 1
    assert up(after) == 1.0
    assert conservation_gap_j(after, "cpu") < 1e-6


def test_zone_that_vanishes_and_comes_back(agent_on, tmp_path):
    agent, rapl = agent_on()
    before = agent.scrape()
    zone = rapl.root / PACKAGE
    gone = rapl.root / ".gone"
    zone.rename(gone)
    rapl.advance(DRAM, 5)
    during = agent.settle()
    assert up(during) == 0.0
    assert errors(during) > errors(before)
    assert node_j(during) == pytest.approx(node_j(before), abs=1e-9)
    assert node_j(during, "dram-0") - node_j(before, "dram-0") == pytest.approx(5, abs=1e-6)
    with agent.control() as control:
        reasons = [s["reason"] for s in control.get("/v1/node").json()["sensors"] if s["device"] == "package-0"]
    assert reasons == ["zone disappeared"]
    # While it was away its counter moved on; nobody knows by how much for sure.
    write_atomic(gone / "energy_uj", f"{rapl.raw[PACKAGE] + 300_000_000}\n")
    rapl.raw[PACKAGE] += 300_000_000
    gone.rename(zone)
    agent.settle()
    rapl.advance(PACKAGE, 7)
    after = agent.settle()
    assert up(after) == 1.0
    assert node_j(after) - node_j(before) == pytest.approx(7, abs=1e-6)  # nothing invented for the gap
    assert conservation_gap_j(after, "cpu") < 1e-6


def test_permission_flip(tmp_path):
    """Root reads any file whatever its mode, so as root the agent runs as
    ``nobody`` for this test; otherwise it runs as the test's own user."""
    user = unprivileged_uid()
    if user == -1:
        pytest.skip("this Python installation cannot be run by the unprivileged user nobody")
    workdir = Path(tempfile.mkdtemp(prefix="jouleward-perm-"))
    try:
        os.chmod(workdir, 0o755)
        if user is not None:
            os.chown(workdir, user, user)
        rapl = Powercap(workdir / "sys")
        agent = AgentProcess(workdir, workdir / "sys", user=user)
        try:
            agent.wait_ready()
            before = agent.settle()
            assert up(before) == 1.0
            os.chmod(rapl.path(PACKAGE), 0)
            rapl.raw[PACKAGE] += 50_000_000
            with open(rapl.path(PACKAGE), "w") as handle:  # the owner may still write
                handle.write(f"{rapl.raw[PACKAGE]}\n")
            during = agent.settle()
            assert up(during) == 0.0
            assert errors(during) > errors(before)
            reasons = [
                s["reason"] for s in agent.control().get("/v1/node").json()["sensors"] if s["device"] == "package-0"
            ]
            assert any("permission denied" in reason for reason in reasons), reasons
            os.chmod(rapl.path(PACKAGE), 0o644)
            agent.settle()
            rapl.advance(PACKAGE, 3)
            after = agent.settle()
            assert up(after) == 1.0
            assert node_j(after) - node_j(before) == pytest.approx(3, abs=1e-6)
        finally:
            agent.kill()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def fake_host(tmp_path):
    procfs = FakeProcfs(tmp_path / "proc")
    procfs.advance_node(100, 100)
    agents: list[AgentProcess] = []

    def start() -> tuple[AgentProcess, Powercap, FakeProcfs]:
        rapl = Powercap(tmp_path / "sys")
        agent = AgentProcess(tmp_path, tmp_path / "sys", procfs=procfs.root)
        agents.append(agent)
        agent.wait_ready()
        agent.settle()
        return agent, rapl, procfs

    yield start
    for agent in agents:
        agent.kill()


def cpu_s(samples, job_id: str) -> float:
    return value(samples, "jouleward_job_cpu_seconds_total", job_id=job_id)


def test_process_gone_between_listing_and_reading(fake_host):
    agent, rapl, procfs = fake_host()
    procfs.add(100, boot_ticks() - 1000, 10)
    procfs.add(101, boot_ticks() - 1000, 10)
    agent.settle()
    # 102: listed but its stat is gone; 103: cut short mid-line; 104: empty.
    (procfs.root / "102").mkdir()
    (procfs.root / "103").mkdir()
    (procfs.root / "103" / "stat").write_text("103 (half")
    (procfs.root / "104").mkdir()
    (procfs.root / "104" / "stat").write_text("")
    rapl.advance(PACKAGE, 5)
    procfs.advance_node(50, 50)
    samples = agent.settle()
    assert value(samples, "jouleward_processes") == 2
    assert "tick failed" not in agent.log
    assert conservation_gap_j(samples, "cpu") < 1e-6


def test_pid_reuse_starts_a_new_process(fake_host):
    agent, rapl, procfs = fake_host()
    first_start = boot_ticks() - 5000
    procfs.add(4242, first_start, 0, env={"JOULEWARD_JOB": "alpha"})
    agent.settle()
    for step in range(1, 3):
        procfs.set_cpu(4242, first_start, 50 * step)
        procfs.advance_node(100, 100)
        rapl.advance(PACKAGE, 10)
        agent.settle()
    alpha = agent.scrape()
    assert cpu_s(alpha, "env-alpha") == pytest.approx(100 / CLK_TCK)
    # The pid is reused by a process that started later, with less CPU time
    # than the old one had: no negative delta, no inherited job.
    procfs.remove(4242)
    procfs.add(4242, boot_ticks() + 100, 30, env={"JOULEWARD_JOB": "beta"})
    procfs.advance_node(100, 100)
    rapl.advance(PACKAGE, 10)
    after = agent.settle()
    assert cpu_s(after, "env-alpha") == pytest.approx(100 / CLK_TCK)
    assert value(after, "jouleward_job_finished", job_id="env-alpha") == 1.0
    assert cpu_s(after, "env-beta") == pytest.approx(30 / CLK_TCK)
    assert conservation_gap_j(after, "cpu") < 1e-6


def test_registered_process_replaced_by_a_reused_pid(fake_host):
    agent, rapl, procfs = fake_host()
    start = boot_ticks() - 5000
    procfs.add(4343, start, 0)
    with agent.control() as control:
        job = control.post("/v1/jobs", json={"name": "train", "pids": [4343]}).json()
    agent.settle()
    procfs.remove(4343)
    procfs.add(4343, boot_ticks() + 100, 40)
    after = agent.settle()
    assert value(after, "jouleward_job_finished", job_id=job["id"]) == 1.0
    assert value(after, "jouleward_job_processes", job_id=job["id"]) == 0.0
    with agent.control() as control:
        assert control.get(f"/v1/jobs/{job['id']}").json()["running"] is False


def ledger_totals(state_dir: Path) -> dict[str, float]:
    db = sqlite3.connect(f"file:{state_dir / 'ledger.sqlite3'}?mode=ro", uri=True)
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        return {device: energy for device, energy in db.execute("SELECT device, energy_j FROM node_energy")}
    finally:
        db.close()


def test_sigterm_flushes_and_exits_zero(agent_on):
    agent, rapl = agent_on(flush_interval_s=3600)  # only the final flush can have written this
    rapl.advance(PACKAGE, 42)
    last = agent.settle()
    assert agent.terminate() == 0
    assert "Traceback" not in agent.log
    assert ledger_totals(agent.state_dir)["package-0"] == pytest.approx(node_j(last), abs=1e-6)


class SteadyLoad(threading.Thread):
    """Advances the package counter by a fixed step every few milliseconds."""

    def __init__(self, rapl: Powercap, step_j: float = 0.5, period_s: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.rapl, self.step_j, self.period_s = rapl, step_j, period_s
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(self.period_s):
            self.rapl.advance(PACKAGE, self.step_j)


def _kill_repeatedly(tmp_path: Path, rounds: int) -> None:
    rng = random.Random(1234)
    sysfs = tmp_path / "sys"
    rapl = Powercap(sysfs)
    initial_raw = rapl.raw[PACKAGE]
    first = AgentProcess(tmp_path, sysfs, flush_interval_s=0.3)
    first.wait_ready()
    first.settle()
    load = SteadyLoad(rapl)
    load.start()
    previous = 0.0
    try:
        for _ in range(rounds):
            agent = first or AgentProcess(tmp_path, sysfs, flush_interval_s=0.3)
            first = None
            agent.wait_ready()
            time.sleep(rng.uniform(0.0, 1.5))
            agent.process.send_signal(signal.SIGKILL)
            agent.kill()
            totals = ledger_totals(agent.state_dir)  # opens, passes the integrity check
            assert totals.get("package-0", 0.0) >= previous - 1e-9
            previous = totals.get("package-0", 0.0)
    finally:
        load.halt.set()
        load.join()
    last = AgentProcess(tmp_path, sysfs, flush_interval_s=0.3)
    last.wait_ready()
    samples = last.settle()
    assert last.terminate() == 0
    used_j = (rapl.raw[PACKAGE] - initial_raw) / 1e6
    booked_j = ledger_totals(last.state_dir)["package-0"]
    # Counters left in the ledger let a restart recover what the killed agent
    # had not flushed; allow one flush interval per kill on top, never more
    # than the counter actually moved.
    one_flush_j = 0.3 * load.step_j / load.period_s
    assert booked_j <= used_j + 1e-6
    assert booked_j >= used_j - rounds * one_flush_j
    assert node_j(samples) <= booked_j + 1e-6


def test_sigkill_at_random_moments(tmp_path):
    _kill_repeatedly(tmp_path, rounds=5)


@pytest.mark.slow
def test_sigkill_at_random_moments_many_times(tmp_path):
    _kill_repeatedly(tmp_path, rounds=40)


def test_state_directory_full(agent_on):
    """A file-size limit of one byte on the running agent makes every write
    to the ledger fail as on a full disk (EFBIG rather than ENOSPC; mounting a
    tiny tmpfs needs privileges the test suite does not assume). While nothing
    can be written, exported energy waits at the last durable value (a crash
    then cannot take it backwards); once writes succeed, all of it appears."""
    agent, rapl = agent_on(flush_interval_s=0.3)
    before = agent.scrape()
    assert value(before, "jouleward_ledger_errors_total") == 0
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.prlimit(agent.process.pid, resource.RLIMIT_FSIZE, (1, hard))
    try:
        for _ in range(3):
            rapl.advance(PACKAGE, 10)
            during = agent.settle(5)
        assert value(during, "jouleward_ledger_errors_total") > 0
        assert node_j(during) == pytest.approx(node_j(before), abs=1e-6)  # nothing exported that is not durable
        assert value(during, "jouleward_ticks_total") > value(before, "jouleward_ticks_total")  # health moves on
    finally:
        resource.prlimit(agent.process.pid, resource.RLIMIT_FSIZE, (soft, hard))
    stale = value(agent.scrape(), "jouleward_ledger_flush_timestamp_seconds")
    deadline = time.monotonic() + 30
    while value(agent.scrape(), "jouleward_ledger_flush_timestamp_seconds") <= stale:
        assert time.monotonic() < deadline, "flushes did not resume"
        time.sleep(0.1)
    last = agent.scrape()
    assert node_j(last) - node_j(before) == pytest.approx(30, abs=1e-6)  # memory kept counting: nothing lost
    assert agent.terminate() == 0
    assert ledger_totals(agent.state_dir)["package-0"] == pytest.approx(node_j(last), abs=1e-6)


def test_read_only_state_directory_is_a_clear_start_error(tmp_path):
    user = unprivileged_uid()
    if user == -1:
        pytest.skip("this Python installation cannot be run by the unprivileged user nobody")
    workdir = Path(tempfile.mkdtemp(prefix="jouleward-ro-"))
    try:
        os.chmod(workdir, 0o755)
        (workdir / "state").mkdir(mode=0o555)
        Powercap(workdir / "sys")
        if user is not None:
            os.chown(workdir, user, user)
        agent = AgentProcess(workdir, workdir / "sys", user=user)
        assert agent.process.wait(timeout=60) == 2
        log = agent.log
        assert "Traceback" not in log
        assert "state" in log and "jouleward: error:" in log
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.skipif(not LIBFAKETIME.exists(), reason="libfaketime is not installed (apt-get install faketime)")
def test_wall_clock_jumps_both_ways(agent_on, tmp_path):
    """Only the wall clock jumps (libfaketime, monotonic clock untouched):
    power is energy over monotonic time, so it stays right."""
    offset = tmp_path / "faketime"
    offset.write_text("+0\n")
    agent, rapl = agent_on(
        flush_interval_s=0.5,
        env={
            "LD_PRELOAD": str(LIBFAKETIME),
            "FAKETIME_TIMESTAMP_FILE": str(offset),
            "FAKETIME_NO_CACHE": "1",
            "FAKETIME_DONT_FAKE_MONOTONIC": "1",
            "FAKETIME_DONT_RESET": "1",
        },
    )
    load = SteadyLoad(rapl, step_j=0.5, period_s=0.02)  # about 25 W, less if the machine is busy
    load.start()
    try:
        for jump in ("+3600", "-7200", "+0"):
            before = agent.settle()
            offset.write_text(jump + "\n")
            # Ticks are paced on the monotonic clock: a wall clock two hours
            # back would stall a wall-paced loop, one hour on would burst it.
            started = time.monotonic()
            after = agent.settle(10)
            elapsed = time.monotonic() - started
            assert elapsed < 30, (jump, elapsed)
            # Power is energy over monotonic time; over wall time it would be
            # about 0 after +1 h and negative (clamped to 0) after -2 h.
            power = value(after, "jouleward_node_power_watts", device="package-0")
            assert 1 < power < 1000, (jump, power)
            assert node_j(after) > node_j(before)
            # The jump did reach the agent: its flush time stamps follow the fake wall clock.
            flushed = value(after, "jouleward_ledger_flush_timestamp_seconds")
            assert flushed - time.time() == pytest.approx(float(jump), abs=60), jump
    finally:
        load.halt.set()
        load.join()
    assert agent.terminate() == 0
