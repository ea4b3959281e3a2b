"""hwmon channels from fixture sysfs trees."""

from __future__ import annotations

import pytest

from agent.config import build
from agent.model import TickContext
from agent.sensors import build_sensors
from agent.sensors.hwmon import HwmonSensor
from tests.support import two_socket_server


def chip(root, index, name, files):
    directory = root / "class" / "hwmon" / f"hwmon{index}"
    directory.mkdir(parents=True)
    (directory / "name").write_text(name + "\n")
    for file_name, value in files.items():
        (directory / file_name).write_text(f"{value}\n")
    return directory


def ctx(seconds):
    return TickContext(seconds, 0.5, 1.0)


def test_power_channel_is_integrated_with_the_trapezoid_rule(tmp_path):
    grace = chip(
        tmp_path,
        0,
        "grace",
        {"power1_input": 100_000_000, "power1_label": "CPU Power Socket 0", "power1_average": 90_000_000},
    )
    sensor = HwmonSensor(tmp_path)
    assert [(c.domain, c.kind) for c in sensor.channels] == [("cpu", "power")]
    assert sensor.sample(ctx(1.0)) == []
    (grace / "power1_input").write_text("200000000\n")
    [reading] = sensor.sample(ctx(2.0))
    assert (reading.domain, reading.source) == ("cpu", "hwmon_power")
    assert reading.energy_j == pytest.approx((100 + 200) / 2 * 2.0)


def test_energy_channel_wins_over_power_for_the_same_label(tmp_path):
    board = chip(
        tmp_path,
        0,
        "ina3221",
        {
            "energy1_input": 5_000_000,
            "power1_input": 1,
            "energy1_label": "VDD_IN",
            "power1_label": "VDD_IN",
            "energy2_input": 0,
            "energy2_label": "DDR",
        },
    )
    sensor = HwmonSensor(tmp_path)
    assert sorted((c.domain, c.kind, c.label) for c in sensor.channels) == [
        ("board", "energy", "VDD_IN"),
        ("dram", "energy", "DDR"),
    ]
    sensor.sample(ctx(1.0))
    (board / "energy1_input").write_text("12500000\n")
    readings = {r.device: r.energy_j for r in sensor.sample(ctx(1.0))}
    assert readings["ina3221-vdd-in"] == pytest.approx(7.5)
    assert readings["ina3221-ddr"] == 0.0


def test_rapl_wins_over_hwmon_for_the_same_domain(tmp_path):
    two_socket_server(tmp_path)
    chip(tmp_path, 0, "k10temp", {"power1_input": 50_000_000, "power1_label": "CPU package"})
    chip(tmp_path, 1, "ina226", {"power1_input": 12_000_000, "power1_label": "board"})
    sensors = build_sensors(build(flags={"sysfs": str(tmp_path)}, environ={}))
    names = [s.name for s in sensors.sensors]
    assert names == ["powercap", "hwmon"]
    hwmon = sensors.sensors[1]
    assert [c.domain for c in hwmon.channels] == ["board"], "the CPU channel duplicates RAPL"
    assert sensors.model is None


def test_unreadable_channel_is_reported_down(tmp_path):
    board = chip(tmp_path, 0, "ina226", {"power1_input": 12_000_000})
    sensor = HwmonSensor(tmp_path)
    sensor.sample(ctx(1.0))
    (board / "power1_input").write_text("garbage\n")
    assert sensor.sample(ctx(1.0)) == []
    [status] = sensor.status()
    assert not status.up and status.reason == "unreadable value"


def test_amd_energy_counts_sockets_not_their_cores(tmp_path):
    files = {
        "energy1_input": 0,
        "energy1_label": "Ecore000",
        "energy2_input": 0,
        "energy2_label": "Ecore001",
        "energy3_input": 0,
        "energy3_label": "Esocket0",
    }
    amd = chip(tmp_path, 0, "amd_energy", files)
    sensor = HwmonSensor(tmp_path)
    assert [(c.label, c.domain) for c in sensor.channels] == [("Esocket0", "cpu")]
    sensor.sample(ctx(1.0))
    (amd / "energy1_input").write_text("40000000\n")
    (amd / "energy3_input").write_text("95000000\n")
    assert [r.energy_j for r in sensor.sample(ctx(1.0))] == [pytest.approx(95.0)]
