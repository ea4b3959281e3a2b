"""Power and energy channels under ``<sysfs>/class/hwmon``.

Arm servers (Grace), boards with INA power monitors and some AMD platforms
report CPU or board power here. Energy channels (``energyN_input``, µJ) are
counters; power channels (``powerN_input`` or ``powerN_average``, µW) are
integrated over the tick with the trapezoid rule. Channels that describe a
domain RAPL already measures are skipped by the caller.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from agent.model import DeviceEnergy, Domain, EnergySource, SensorStatus, TickContext
from agent.sensors.counters import EnergyCounter
from agent.sensors.sysfs import read_attribute

SENSOR_NAME = "hwmon"
_CHANNEL = re.compile(r"^(?P<kind>power|energy)(?P<index>\d+)_(?P<attr>input|average)$")
_CPU_WORDS = ("cpu", "package", "socket", "grace", "soc", "core")
_DRAM_WORDS = ("dram", "mem", "ddr")
_GPU_WORDS = ("gpu",)


@dataclass(frozen=True, slots=True)
class Channel:
    chip: str  # hwmon chip name, e.g. "grace", "ina3221"
    path: Path  # the *_input / *_average file
    kind: str  # power or energy
    label: str
    domain: str  # cpu, dram, board
    device: str


def classify(chip: str, label: str) -> str:
    text = f"{chip} {label}".lower()
    if any(word in text for word in _GPU_WORDS):
        return "gpu"
    if any(word in text for word in _DRAM_WORDS):
        return "dram"
    if any(word in text for word in _CPU_WORDS):
        return "cpu"
    return "board"


def discover(sysfs: Path) -> list[Channel]:
    root = sysfs / "class" / "hwmon"
    try:
        chips = sorted(root.iterdir())
    except OSError:
        return []
    channels: list[Channel] = []
    for chip_dir in chips:
        try:
            chip = read_attribute(chip_dir / "name")
        except OSError:
            continue
        by_label: dict[str, Channel] = {}
        for entry in sorted(chip_dir.iterdir()):
            match = _CHANNEL.match(entry.name)
            if not match:
                continue
            kind, index = match.group("kind"), match.group("index")
            try:
                label = read_attribute(chip_dir / f"{kind}{index}_label")
            except OSError:
                label = f"{kind}{index}"
            domain = classify(chip, label)
            if domain == "gpu":
                continue  # GPUs are read through NVML
            device = re.sub(r"[^a-z0-9]+", "-", f"{chip}-{label}".lower()).strip("-")
            channel = Channel(chip, entry, kind, label, domain, device)
            existing = by_label.get(label)
            # One figure per labelled channel: an energy counter beats a power
            # reading, and an instantaneous power beats an average.
            if (
                existing is None
                or (existing.kind == "power" and kind == "energy")
                or (existing.kind == kind == "power" and match.group("attr") == "input")
            ):
                by_label[label] = channel
        channels.extend(_without_nested(list(by_label.values())))
    return channels


def _without_nested(channels: list[Channel]) -> list[Channel]:
    """Per-core channels are inside a socket channel of the same chip (AMD's
    amd_energy reports Ecore000.. beside Esocket0): keep only the sockets."""

    def is_socket(label: str) -> bool:
        return any(word in label.lower() for word in ("socket", "package"))

    if not any(is_socket(c.label) for c in channels):
        return channels
    return [c for c in channels if is_socket(c.label) or "core" not in c.label.lower()]


class HwmonSensor:
    name = SENSOR_NAME

    def __init__(self, sysfs: Path, skip_domains: frozenset[str] = frozenset()) -> None:
        self.channels = [c for c in discover(sysfs) if c.domain not in skip_domains]
        self._counters = {c.path: EnergyCounter() for c in self.channels if c.kind == "energy"}
        self._last_power_w: dict[Path, float] = {}
        self._status: dict[Path, SensorStatus] = {}

    @property
    def available(self) -> bool:
        return bool(self.channels)

    def sample(self, ctx: TickContext) -> list[DeviceEnergy]:
        out: list[DeviceEnergy] = []
        for channel in self.channels:
            try:
                raw = int(read_attribute(channel.path))
            except (OSError, ValueError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "unreadable value"
                self._status[channel.path] = SensorStatus(SENSOR_NAME, channel.device, False, reason)
                if channel.path in self._counters:
                    self._counters[channel.path].forget()
                self._last_power_w.pop(channel.path, None)
                continue
            self._status[channel.path] = SensorStatus(SENSOR_NAME, channel.device, True)
            if channel.kind == "energy":
                step = self._counters[channel.path].advance(raw)
                first = step is None
                energy_j = step.energy_j if step is not None else 0.0
                source: EnergySource = "hwmon"
            else:
                power_w = raw / 1e6
                previous = self._last_power_w.get(channel.path)
                self._last_power_w[channel.path] = power_w
                first = previous is None
                energy_j = 0.0 if previous is None else (previous + power_w) / 2 * ctx.interval_s
                source = "hwmon_power"
            if not first:
                out.append(
                    DeviceEnergy(
                        cast(Domain, channel.domain), channel.device, source, max(energy_j, 0.0), ctx.interval_s
                    )
                )
        return out

    def status(self) -> list[SensorStatus]:
        return list(self._status.values())

    def close(self) -> None:
        pass
