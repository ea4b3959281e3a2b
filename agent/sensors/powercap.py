"""RAPL energy counters through the Linux powercap sysfs interface.

Zones live under ``<sysfs>/class/powercap`` as ``intel-rapl:N`` (a socket's
package, or psys), ``intel-rapl:N:M`` (its dram, core, uncore sub-zones) and
``intel-rapl-mmio:N`` (the same package again through MMIO). AMD exposes the
same layout. Core and uncore are inside the package, so they are read by
``jouleward doctor`` but never added to a domain; an mmio zone that repeats a
package is dropped; psys covers more than the package and goes to its own
``platform`` domain.
"""

from __future__ import annotations

import errno
import re
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from agent.model import DeviceEnergy, Domain, SensorStatus, TickContext
from agent.sensors.counters import EnergyCounter
from agent.sensors.sysfs import read_attribute

_ZONE_DIR = re.compile(r"^(?P<control>[a-z][a-z-]*):(?P<path>\d+(?::\d+)*)$")
_NESTED_NAMES = {"core", "uncore"}
SENSOR_NAME = "powercap"


@dataclass(frozen=True, slots=True)
class Zone:
    zone_id: str  # directory name, e.g. intel-rapl:0:2
    path: Path
    name: str  # contents of the name file, e.g. package-0, dram, psys
    domain: str  # cpu, dram, platform; "" for zones inside another one
    device: str  # package-0, dram-0, psys-0
    mmio: bool


@dataclass(frozen=True, slots=True)
class ZoneProblem:
    zone_id: str
    reason: str


def _zone_dirs(root: Path) -> dict[str, Path]:
    """Every zone directory, flat (as in /sys/class/powercap) or nested."""
    found: dict[str, Path] = {}
    stack = [root]
    while stack:
        directory = stack.pop()
        try:
            entries = list(directory.iterdir())
        except OSError:
            continue
        for entry in entries:
            if _ZONE_DIR.match(entry.name) and entry.name not in found and entry.is_dir():
                found[entry.name] = entry
                stack.append(entry)
    return found


def _socket_index(zone_id: str) -> str:
    match = _ZONE_DIR.match(zone_id)
    assert match is not None  # _zone_dirs only yields names it matched
    return match.group("path").split(":")[0]


def discover(sysfs: Path) -> tuple[list[Zone], list[ZoneProblem]]:
    """Find the zones to read under ``<sysfs>/class/powercap``."""
    root = sysfs / "class" / "powercap"
    zones: list[Zone] = []
    problems: list[ZoneProblem] = []
    for zone_id, path in sorted(_zone_dirs(root).items()):
        if not (path / "energy_uj").exists():
            continue  # the control-type directory itself, or a zone without a counter
        try:
            name = read_attribute(path / "name")
        except OSError as exc:
            problems.append(ZoneProblem(zone_id, f"cannot read name: {exc.strerror}"))
            continue
        match = _ZONE_DIR.match(zone_id)
        assert match is not None
        control = match.group("control")
        depth = zone_id.count(":")
        socket = _socket_index(zone_id)
        if name in _NESTED_NAMES:
            domain, device = "", f"{name}-{socket}"
        elif name.startswith("dram"):
            domain, device = "dram", f"dram-{socket}"
        elif name.startswith("psys"):
            domain, device = "platform", f"psys-{socket}"
        elif name.startswith("package") or depth == 1:
            domain, device = "cpu", name if name.startswith("package-") else f"package-{socket}"
        else:
            domain, device = "", f"{name}-{socket}"
        zones.append(Zone(zone_id, path, name, domain, device, control.endswith("-mmio")))
    regular_devices = {(z.domain, z.device) for z in zones if not z.mmio}
    kept = [z for z in zones if not (z.mmio and (z.domain, z.device) in regular_devices)]
    return kept, problems


def describe_read_error(exc: OSError | ValueError) -> str:
    """Why a zone's energy_uj could not be read, in the words doctor and the health metrics use."""
    if isinstance(exc, ValueError):
        return "energy_uj is not an integer"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied reading energy_uj (root-only since Linux 5.10)"
    if exc.errno == errno.ENOENT:
        return "zone disappeared"
    return f"read failed: {exc.strerror or exc}"


class PowercapSensor:
    """Reads every counted zone once per tick and returns per-device energy."""

    name = SENSOR_NAME

    def __init__(self, sysfs: Path, max_zone_power_w: float = 1000.0) -> None:
        self._sysfs = sysfs
        self._max_zone_power_w = max_zone_power_w
        self.zones, self._problems = discover(sysfs)
        self._counted = [z for z in self.zones if z.domain]
        self._counters: dict[str, EnergyCounter] = {}
        self._status: dict[str, SensorStatus] = {}
        for zone in self._counted:
            try:
                max_range = int(read_attribute(zone.path / "max_energy_range_uj"))
            except (OSError, ValueError):
                max_range = 0
            self._counters[zone.zone_id] = EnergyCounter(1e6, max_range, max_zone_power_w)
        for problem in self._problems:
            self._status[problem.zone_id] = SensorStatus(SENSOR_NAME, problem.zone_id, False, problem.reason)

    @property
    def available(self) -> bool:
        return bool(self._counted)

    def counter_state(self) -> dict[str, tuple[int, int]]:
        """Last good raw reading and range per zone, for the ledger."""
        return {zid: (c.last, c.max_range) for zid, c in self._counters.items() if c.last is not None}

    def sample(self, ctx: TickContext) -> list[DeviceEnergy]:
        energy_by_device: dict[tuple[str, str], float] = {}
        for zone in self._counted:
            raw = self.read_raw_zone(zone)
            if isinstance(raw, Exception):
                reason = describe_read_error(raw)
                self._status[zone.zone_id] = SensorStatus(SENSOR_NAME, zone.device, False, reason)
                self._counters[zone.zone_id].forget()
                continue
            self._status[zone.zone_id] = SensorStatus(SENSOR_NAME, zone.device, True)
            step = self._counters[zone.zone_id].advance(raw, ctx.interval_s)
            if step is None:
                continue
            if step.reset:
                self._status[zone.zone_id] = SensorStatus(SENSOR_NAME, zone.device, False, "counter reset")
            key = (zone.domain, zone.device)
            energy_by_device[key] = energy_by_device.get(key, 0.0) + step.energy_j
        return [
            DeviceEnergy(cast(Domain, domain), device, "rapl", energy_j, ctx.interval_s)
            for (domain, device), energy_j in sorted(energy_by_device.items())
        ]

    @staticmethod
    def read_raw_zone(zone: Zone) -> int | OSError | ValueError:
        try:
            return int(read_attribute(zone.path / "energy_uj"))
        except (OSError, ValueError) as exc:
            return exc

    def status(self) -> list[SensorStatus]:
        return list(self._status.values())

    def close(self) -> None:
        pass
