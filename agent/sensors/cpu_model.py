"""A CPU and DRAM power model for hosts with no energy counters.

CPU power is linear in utilisation between an idle and a maximum power:
``P = idle + (max - idle) * utilisation``. The maximum defaults to the CPU's
TDP from codecarbon's ``hardware/cpu_power.csv`` times the socket count, the
idle to ``cpu_idle_fraction`` of it; operators who know their nodes set both.
DRAM power is a constant per GiB installed, all of it static. Readings carry
``source="model"``: they are estimates, not measurements.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from agent.carbon.tables import CarbonTableError, data_file
from agent.model import DeviceEnergy, SensorStatus, TickContext

SENSOR_NAME = "cpu_model"
DEFAULT_TDP_W = 85.0  # codecarbon's own fallback when the CPU is not in its table
_NOISE = re.compile(r"\((r|tm)\)|\bcpu\b|\bprocessor\b|@.*$|\d+-core|\bwith\b.*$", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class CpuIdentity:
    model_name: str
    sockets: int
    logical_cpus: int


@dataclass(frozen=True, slots=True)
class CpuPowerModel:
    idle_w: float
    max_w: float
    tdp_source: str  # "config", "table: <row>", "default"

    def power_w(self, utilization_ratio: float) -> float:
        utilization = min(max(utilization_ratio, 0.0), 1.0)
        return self.idle_w + (self.max_w - self.idle_w) * utilization


def read_cpu_identity(procfs: Path) -> CpuIdentity:
    model, sockets, logical = "", set(), 0
    try:
        text = (procfs / "cpuinfo").read_text(errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "processor":
            logical += 1
        elif key in ("model name", "Model Name") and not model:
            model = value.strip()
        elif key == "physical id":
            sockets.add(value.strip())
    return CpuIdentity(model, max(len(sockets), 1), max(logical, 1))


def _normalise(name: str) -> str:
    return " ".join(_NOISE.sub(" ", name.lower()).split())


@lru_cache(maxsize=1)
def _tdp_table() -> tuple[tuple[str, str, float], ...]:
    rows = []
    with open(data_file("hardware", "cpu_power.csv"), newline="", encoding="utf-8-sig") as handle:
        for row in csv.DictReader(handle):
            try:
                rows.append((row["Name"], _normalise(row["Name"]), float(row["TDP"])))
            except (KeyError, ValueError):
                continue
    return tuple(rows)


def lookup_tdp(model_name: str) -> tuple[float, str] | None:
    """TDP of the closest row in codecarbon's table: an exact match of the
    normalised name, else the longest row whose every word is in the name."""
    wanted = _normalise(model_name)
    if not wanted:
        return None
    try:
        table = _tdp_table()
    except (CarbonTableError, OSError):
        return None
    words = set(wanted.split())
    best: tuple[int, str, float] | None = None
    for name, normalised, tdp in table:
        if normalised == wanted:
            return tdp, name
        row_words = normalised.split()
        if len(row_words) >= 2 and set(row_words) <= words:
            if best is None or len(normalised) > best[0]:
                best = (len(normalised), name, tdp)
    return (best[2], best[1]) if best else None


def build_cpu_model(
    identity: CpuIdentity,
    tdp_w: float | None,
    idle_w: float | None,
    max_w: float | None,
    idle_fraction: float,
) -> CpuPowerModel:
    if tdp_w is not None:
        tdp, source = tdp_w, "config"
    else:
        found = lookup_tdp(identity.model_name)
        if found:
            tdp, source = found[0] * identity.sockets, f"table: {found[1]} x{identity.sockets}"
        else:
            tdp, source = DEFAULT_TDP_W * identity.sockets, "default"
    maximum = max_w if max_w is not None else tdp
    idle = idle_w if idle_w is not None else min(idle_fraction * tdp, maximum)
    return CpuPowerModel(idle_w=idle, max_w=max(maximum, idle), tdp_source=source)


def read_mem_total_gib(procfs: Path) -> float:
    try:
        for line in (procfs / "meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / (1024 * 1024)
    except (OSError, ValueError, IndexError):
        pass
    return 0.0


class ModelSensor:
    """Estimates CPU (and DRAM) energy from the node's CPU utilisation."""

    name = SENSOR_NAME

    def __init__(self, cpu: CpuPowerModel, dram_w: float | None) -> None:
        self.cpu = cpu
        self.dram_w = dram_w

    def sample(self, ctx: TickContext) -> list[DeviceEnergy]:
        out = [
            DeviceEnergy(
                "cpu",
                "cpu",
                "model",
                self.cpu.power_w(ctx.cpu_utilization_ratio) * ctx.interval_s,
                ctx.interval_s,
                idle_power_w=self.cpu.idle_w,
            )
        ]
        if self.dram_w is not None:
            out.append(
                DeviceEnergy(
                    "dram", "dram", "model", self.dram_w * ctx.interval_s, ctx.interval_s, idle_power_w=self.dram_w
                )
            )
        return out

    def status(self) -> list[SensorStatus]:
        return [SensorStatus(SENSOR_NAME, "cpu", True, f"estimated; TDP from {self.cpu.tdp_source}")]

    def close(self) -> None:
        pass
