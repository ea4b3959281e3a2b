"""Hardware readers. ``build_sensors`` picks the best source per domain:
RAPL through powercap, then hwmon, then the utilisation model."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from agent.config import Config
from agent.sensors.base import Sensor
from agent.sensors.cpu_model import ModelSensor, build_cpu_model, read_cpu_identity, read_mem_total_gib
from agent.sensors.dcgm import DcgmActivitySensor
from agent.sensors.hwmon import HwmonSensor
from agent.sensors.nvml import NvmlSensor, NvmlUnavailable
from agent.sensors.powercap import PowercapSensor


@dataclass
class SensorSet:
    sensors: list[Sensor]
    powercap: PowercapSensor | None
    model: ModelSensor | None
    nvml: NvmlSensor | None = None


def build_sensors(config: Config) -> SensorSet:
    sensors: list[Sensor] = []
    powercap = PowercapSensor(config.sysfs, config.max_zone_power_w)
    measured: set[str] = set()
    if powercap.available:
        sensors.append(powercap)
        measured |= {zone.domain for zone in powercap.zones if zone.domain}
    hwmon = HwmonSensor(config.sysfs, skip_domains=frozenset(measured))
    if hwmon.available:
        sensors.append(hwmon)
        measured |= {channel.domain for channel in hwmon.channels}
    model = None
    if "cpu" not in measured:
        cpu = build_cpu_model(
            read_cpu_identity(config.procfs),
            config.cpu_tdp_w,
            config.cpu_idle_w,
            config.cpu_max_w,
            config.cpu_idle_fraction,
        )
        dram_w = None
        if "dram" not in measured:
            dram_w = config.dram_model_w_per_gib * read_mem_total_gib(config.procfs)
        model = ModelSensor(cpu, dram_w)
        sensors.append(model)
    nvml = None
    if config.gpu_enabled:
        dcgm = None
        if config.dcgm_exporter_url:
            dcgm = DcgmActivitySensor(config.dcgm_exporter_url, config.dcgm_exporter_poll_s)
        try:
            nvml = NvmlSensor(
                config.gpu_visible_devices,
                config.gpu_power_sample_interval_s,
                instance_activity=dcgm.activity if dcgm is not None else None,
            )
            sensors.append(nvml)
            if dcgm is not None:
                sensors.append(dcgm)
        except NvmlUnavailable as exc:
            logging.getLogger("jouleward").info("no GPU sensor: %s", exc)
    return SensorSet(sensors, powercap if powercap.available else None, model, nvml)
