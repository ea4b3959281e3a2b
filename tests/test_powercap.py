"""RAPL through fixture powercap trees: discovery, aggregation, wraparound."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from agent.model import TickContext
from agent.sensors.counters import counter_delta, recoverable_downtime_energy_j
from agent.sensors.powercap import PowercapSensor, discover
from tests.support import FakePowercap, two_socket_server

CTX = TickContext(interval_s=1.0, cpu_utilization_ratio=0.5, cpu_busy_s=1.0)


def by_device(readings):
    return {(r.domain, r.device): r.energy_j for r in readings}


def test_discovery_counts_packages_and_dram_once(tmp_path):
    two_socket_server(tmp_path)
    zones, problems = discover(tmp_path)
    counted = sorted((z.domain, z.device) for z in zones if z.domain)
    assert counted == [
        ("cpu", "package-0"),
        ("cpu", "package-1"),
        ("dram", "dram-0"),
        ("dram", "dram-1"),
        ("platform", "psys-2"),
    ]
    assert not problems
    # core and uncore are found (for doctor) but never counted
    assert sorted(z.device for z in zones if not z.domain) == ["core-0", "core-1", "uncore-0", "uncore-1"]
    assert not any(z.mmio for z in zones), "the mmio duplicate of package-0 must be dropped"


def test_energy_per_device_matches_fixture_truth(tmp_path):
    tree = two_socket_server(tmp_path)
    sensor = PowercapSensor(tmp_path)
    assert sensor.sample(CTX) == []  # baseline only
    tree.zones["intel-rapl:0"].add_j(50.0)
    tree.zones["intel-rapl:1"].add_j(30.0)
    tree.zones["intel-rapl:0:0"].add_j(40.0)  # core: inside package-0, must not add
    tree.zones["intel-rapl:0:2"].add_j(7.5)
    tree.zones["intel-rapl-mmio:0"].add_j(50.0)  # duplicate: must not add
    tree.zones["intel-rapl:2"].add_j(120.0)
    energy = by_device(sensor.sample(CTX))
    assert energy == {
        ("cpu", "package-0"): pytest.approx(50.0),
        ("cpu", "package-1"): pytest.approx(30.0),
        ("dram", "dram-0"): pytest.approx(7.5),
        ("dram", "dram-1"): 0.0,
        ("platform", "psys-2"): pytest.approx(120.0),
    }


def test_wraparound_keeps_node_energy_equal_to_truth(tmp_path):
    tree = FakePowercap(tmp_path)
    max_range = 10_000_000  # 10 J range: wraps every few steps
    zone = tree.add_zone("intel-rapl:0", "package-0", max_range_uj=max_range, energy_uj=9_000_000)
    sensor = PowercapSensor(tmp_path)
    sensor.sample(CTX)
    truth = 0.0
    measured = 0.0
    for step_j in [0.5, 3.25, 4.0, 2.5, 6.0, 9.9, 0.1, 7.77]:
        zone.add_j(step_j)
        truth += step_j
        measured += sum(r.energy_j for r in sensor.sample(CTX))
    assert zone.energy_uj < 9_000_000  # it really wrapped
    assert measured == pytest.approx(truth, rel=1e-9)


def test_counter_reset_is_not_read_as_wraparound(tmp_path):
    tree = FakePowercap(tmp_path)
    zone = tree.add_zone("intel-rapl:0", "package-0", max_range_uj=262_143_328_850, energy_uj=200_000_000_000)
    sensor = PowercapSensor(tmp_path, max_zone_power_w=500.0)
    sensor.sample(CTX)
    zone.set(1_000_000)  # driver reload: back near zero
    energy = sum(r.energy_j for r in sensor.sample(CTX))
    assert energy == 0.0, "a reset must not invent ~62 kJ of wraparound"
    zone.add_j(4.0)
    assert sum(r.energy_j for r in sensor.sample(CTX)) == pytest.approx(4.0)


def test_unreadable_zone_is_reported_not_fatal(tmp_path):
    tree = two_socket_server(tmp_path)
    broken = tree.zones["intel-rapl:1"].path / "energy_uj"
    broken.unlink()
    broken.mkdir()  # reading it fails with EISDIR, like any unreadable file
    sensor = PowercapSensor(tmp_path)
    sensor.sample(CTX)
    tree.zones["intel-rapl:0"].add_j(10.0)
    energy = by_device(sensor.sample(CTX))
    assert energy[("cpu", "package-0")] == pytest.approx(10.0)
    assert ("cpu", "package-1") not in energy
    down = [s for s in sensor.status() if not s.up]
    assert [s.device for s in down] == ["package-1"]
    assert "read failed" in down[0].reason


PERMISSION_PROBE = """
import os, sys
sys.path.insert(0, sys.argv[2])
from pathlib import Path
from agent.model import TickContext
from agent.sensors.powercap import PowercapSensor
os.setgid(65534); os.setuid(65534)  # import first: the interpreter may live where nobody cannot read
sensor = PowercapSensor(Path(sys.argv[1]))
sensor.sample(TickContext(1.0, 0.0, 0.0))
for status in sensor.status():
    print(status.device, status.up, status.reason)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to another uid")
def test_root_only_counter_is_reported_as_permission_problem():
    # pytest's tmp_path is private to root; the unprivileged reader needs a path it can walk.
    tmp_path = Path(tempfile.mkdtemp(prefix="jouleward-powercap-"))
    os.chmod(tmp_path, 0o755)
    tree = two_socket_server(tmp_path)
    for zone in tree.zones.values():
        os.chmod(zone.path / "energy_uj", 0o400)  # as since Linux 5.10
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, "-c", PERMISSION_PROBE, str(tmp_path), repo], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    shutil.rmtree(tmp_path)
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 5
    assert all("False permission denied reading energy_uj (root-only since Linux 5.10)" in line for line in lines)


def test_counter_arithmetic():
    assert counter_delta(100, 250, 1000) == 150
    assert counter_delta(900, 50, 1000) == 150
    assert counter_delta(900, 50, 0) == 50  # no range known: a reset
    # downtime recovery only when no wrap can have hidden energy
    assert recoverable_downtime_energy_j(1_000_000, 61_000_000, 262_143_328_850, 60.0, 1000.0) == pytest.approx(60.0)
    assert recoverable_downtime_energy_j(1_000_000, 61_000_000, 100_000_000, 600.0, 1000.0) == 0.0
    assert recoverable_downtime_energy_j(61_000_000, 1_000_000, 262_143_328_850, 60.0, 1000.0) == 0.0
