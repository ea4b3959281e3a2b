"""NVIDIA GPUs through NVML: energy per GPU, plus what attribution needs.

Energy comes from the GPU's total-energy counter (Volta and newer). Where the
driver does not support it, a background thread samples power faster than
the tick and integrates it (trapezoids). Only NVML read calls are made: the
agent never changes a GPU setting.
"""

from __future__ import annotations

import math
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Final

import pynvml

from agent.model import DeviceEnergy, GpuDeviceView, GpuProcess, MigInstanceView, SensorStatus, TickContext
from agent.sensors.counters import EnergyCounter

SOURCE_ENERGY: Final = "nvml_energy"
SOURCE_POWER: Final = "nvml_power"
# NVML adds per-process samples every ~1/6 s. A tick that finds none newer
# than the last it saw, within this long of it, came too soon after the
# previous one: the previous weights still describe the GPU.
SAMPLE_HOLD_US = 1_000_000
# Older bindings name the version-mismatch error differently or not at all.
_MISMATCH = tuple(
    cls for cls in (getattr(pynvml, "NVMLLibraryMismatchError", None), pynvml.NVMLError_FunctionNotFound) if cls
)


class NvmlUnavailable(RuntimeError):
    """NVML could not be loaded or initialised; the message says why."""


def _reason(exc: BaseException) -> str:
    try:
        return str(exc) or type(exc).__name__
    except Exception:  # the bindings format some errors through the library itself
        return type(exc).__name__


def select_visible(spec: str | None, devices: list[tuple[int, str]]) -> list[int]:
    """NVML indices the agent may see, given a CUDA_VISIBLE_DEVICES-style list.

    ``devices`` holds (NVML index, UUID) pairs. Entries are NVML indices (PCI
    bus order) or UUIDs or unique UUID prefixes; as in CUDA, the first entry
    that names no device ends the list. None means every device.
    """
    if spec is None:
        return [index for index, _ in devices]
    chosen: list[int] = []
    for entry in (e.strip() for e in spec.split(",")):
        if entry.lstrip("-").isdigit():
            matches = [index for index, _ in devices if index == int(entry)]
        else:
            matches = [index for index, uuid in devices if entry and uuid.startswith(entry)]
        if len(matches) != 1:
            break
        if matches[0] not in chosen:
            chosen.append(matches[0])
    return chosen


@dataclass
class _PowerIntegral:
    """Trapezoidal integral of sampled power since the last tick."""

    last_t: float | None = None
    last_w: float = 0.0
    energy_j: float = 0.0
    start_t: float | None = None

    def add(self, t: float, power_w: float) -> None:
        if self.last_t is not None and t > self.last_t:
            self.energy_j += (power_w + self.last_w) / 2 * (t - self.last_t)
        if self.last_t is None or t > self.last_t:
            self.last_t, self.last_w = t, power_w
        if self.start_t is None:
            self.start_t = t

    def take(self) -> tuple[float, float]:
        """Energy and seconds since the previous take; restart from now."""
        energy_j, start = self.energy_j, self.start_t
        self.energy_j, self.start_t = 0.0, self.last_t
        return energy_j, (self.last_t - start) if start is not None and self.last_t is not None else 0.0


@dataclass
class _Gpu:
    index: int
    handle: object
    uuid: str = ""
    name: str = ""
    pci_bus_id: str = ""  # "00000000:17:00.0", as nvidia-smi and dcgm-exporter write it
    mode: str | None = None  # SOURCE_ENERGY or SOURCE_POWER once known
    counter: EnergyCounter = field(default_factory=lambda: EnergyCounter(units_per_j=1000.0))  # mJ
    last_energy_t: float = 0.0
    integral: _PowerIntegral = field(default_factory=_PowerIntegral)
    last_seen_us: int = 0  # newest per-process utilisation sample consumed
    last_sm: dict[int, float] = field(default_factory=dict)
    up: bool = True
    reason: str = ""

    @property
    def label(self) -> str:
        return f"gpu-{self.index}"


def _pci_bus_id(handle: object) -> str:
    """The PCI address, or "" where the driver does not say."""
    info = _optional(lambda: pynvml.nvmlDeviceGetPciInfo(handle))
    return _text(info.busId) if info is not None else ""


class NvmlSensor:
    """Energy of each visible NVIDIA GPU, and a view of its processes."""

    name = "nvml"

    def __init__(
        self,
        visible_devices: str | None = None,
        power_sample_interval_s: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        instance_activity: Callable[[], Mapping[tuple[str, int], float]] | None = None,
    ) -> None:
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            raise NvmlUnavailable(f"NVML did not initialise: {_reason(exc)}") from None
        self._clock = clock
        self._wall_clock = wall_clock
        self._instance_activity = instance_activity
        self._interval_s = power_sample_interval_s
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._views: dict[str, GpuDeviceView] = {}
        try:
            self.driver_version = _text(pynvml.nvmlSystemGetDriverVersion())
            self._gpus = self._discover(visible_devices)
        except pynvml.NVMLError as exc:
            self._shutdown()
            raise NvmlUnavailable(f"NVML cannot list GPUs: {_reason(exc)}") from None

    def _discover(self, visible_devices: str | None) -> list[_Gpu]:
        found: list[_Gpu] = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            try:
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                gpu = _Gpu(index=index, handle=handle)
                gpu.uuid = _text(pynvml.nvmlDeviceGetUUID(handle))
                gpu.name = _text(pynvml.nvmlDeviceGetName(handle))
                gpu.pci_bus_id = _pci_bus_id(handle)
            except pynvml.NVMLError as exc:
                gpu = _Gpu(index=index, handle=None, up=False, reason=_reason(exc))
            found.append(gpu)
        keep = set(select_visible(visible_devices, [(g.index, g.uuid) for g in found]))
        return [g for g in found if g.index in keep]

    # -- sampling -----------------------------------------------------------

    def sample(self, ctx: TickContext) -> list[DeviceEnergy]:
        out: list[DeviceEnergy] = []
        views: dict[str, GpuDeviceView] = {}
        for gpu in self._gpus:
            try:
                if gpu.handle is None:
                    gpu.handle = pynvml.nvmlDeviceGetHandleByIndex(gpu.index)
                    gpu.uuid = _text(pynvml.nvmlDeviceGetUUID(gpu.handle))
                    gpu.name = _text(pynvml.nvmlDeviceGetName(gpu.handle))
                    gpu.pci_bus_id = _pci_bus_id(gpu.handle)
                energy = self._energy(gpu)
                view = views[gpu.label] = self._view(gpu)
            except pynvml.NVMLError as exc:
                self._down(gpu, _reason(exc))
                continue
            if energy is not None:
                out.append(replace(energy, utilization_ratio=view.utilization_ratio))
        self._views = views
        return out

    def _down(self, gpu: _Gpu, reason: str) -> None:
        with self._lock:
            gpu.up, gpu.reason = False, reason
            # Energy across an outage is not counted: after a driver reload
            # the counter and the samples start again from nothing.
            gpu.counter.forget()
            gpu.integral = _PowerIntegral()

    def _energy(self, gpu: _Gpu) -> DeviceEnergy | None:
        if gpu.mode is None:
            try:
                pynvml.nvmlDeviceGetTotalEnergyConsumption(gpu.handle)
                gpu.mode = SOURCE_ENERGY
            except pynvml.NVMLError_NotSupported:
                gpu.mode = SOURCE_POWER
                self._start_sampler()
        if gpu.mode == SOURCE_ENERGY:
            now_mj = pynvml.nvmlDeviceGetTotalEnergyConsumption(gpu.handle)
            now = self._clock()
            with self._lock:
                previous_t = gpu.last_energy_t
                # A counter lower than before was reset (driver reload): it
                # counts only what it shows since the reset.
                step = gpu.counter.advance(now_mj)
                gpu.last_energy_t = now
                gpu.up, gpu.reason = True, ""
            if step is None:
                return None
            return DeviceEnergy("gpu", gpu.label, SOURCE_ENERGY, step.energy_j, now - previous_t)
        with self._lock:
            fresh = gpu.integral.start_t is None
            self._add_power(gpu)
            energy_j, interval_s = gpu.integral.take()
            gpu.up, gpu.reason = True, ""
        if fresh or interval_s <= 0:
            return None
        return DeviceEnergy("gpu", gpu.label, SOURCE_POWER, energy_j, interval_s)

    def _add_power(self, gpu: _Gpu) -> None:
        """Read power and fold it into the integral; caller holds the lock so
        readings enter in time order."""
        power_w = pynvml.nvmlDeviceGetPowerUsage(gpu.handle) / 1000.0
        gpu.integral.add(self._clock(), power_w)

    def _start_sampler(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._sample_power, name="nvml-power", daemon=True)
            self._thread.start()

    def _sample_power(self) -> None:
        while not self._stop.wait(self._interval_s):
            for gpu in self._gpus:
                if gpu.mode != SOURCE_POWER or not gpu.up or gpu.integral.start_t is None:
                    continue
                with self._lock:
                    try:
                        self._add_power(gpu)
                    except pynvml.NVMLError:
                        pass  # the next tick reads it too, and reports the failure

    def _view(self, gpu: _Gpu) -> GpuDeviceView:
        handle = gpu.handle
        utilization = _optional(lambda: pynvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0)
        memory = _optional(lambda: pynvml.nvmlDeviceGetMemoryInfo(handle))
        limit_mw = _optional(lambda: pynvml.nvmlDeviceGetEnforcedPowerLimit(handle))
        mig = _optional(lambda: pynvml.nvmlDeviceGetMigMode(handle)[0])
        processes, note = self._processes(gpu)
        if note:
            gpu.reason = note
        mig_on = mig == pynvml.NVML_DEVICE_MIG_ENABLE
        return GpuDeviceView(
            index=gpu.index,
            device=gpu.label,
            uuid=gpu.uuid,
            name=gpu.name,
            pci_bus_id=gpu.pci_bus_id,
            utilization_ratio=utilization,
            memory_used_bytes=memory.used if memory is not None else None,
            memory_total_bytes=memory.total if memory is not None else None,
            power_limit_w=limit_mw / 1000.0 if limit_mw is not None else None,
            mig_enabled=mig_on,
            processes=processes if processes is not None else (),
            processes_known=processes is not None,
            mig_instances=self._with_activity(gpu.uuid, _mig_instances(handle)) if mig_on else (),
        )

    def _processes(self, gpu: _Gpu) -> tuple[tuple[GpuProcess, ...] | None, str]:
        try:
            try:
                listed = pynvml.nvmlDeviceGetComputeRunningProcesses(gpu.handle)
            except _MISMATCH:
                # The driver is older than the bindings: ask for the older layout.
                listed = pynvml.nvmlDeviceGetComputeRunningProcesses_v2(gpu.handle)
        except pynvml.NVMLError_GpuIsLost:
            raise
        except (pynvml.NVMLError, *_MISMATCH) as exc:
            return None, f"process list unavailable: {_reason(exc)}"
        sm = self._process_sm(gpu)
        note = "" if sm is not None else "per-process utilisation unavailable"
        processes = []
        for info in listed:
            instance = getattr(info, "gpuInstanceId", None)
            processes.append(
                GpuProcess(
                    pid=int(info.pid),
                    used_memory_bytes=int(info.usedGpuMemory or 0),
                    sm_utilization_pct=None if sm is None else sm.get(int(info.pid), 0.0),
                    gpu_instance_id=instance if instance is not None and instance != 0xFFFFFFFF else None,
                )
            )
        return tuple(processes), note

    def _with_activity(self, uuid: str, instances: tuple[MigInstanceView, ...]) -> tuple[MigInstanceView, ...]:
        """Fill in dcgm-exporter's activity where NVML reports none for an instance."""
        if self._instance_activity is None or all(i.utilization_ratio is not None for i in instances):
            return instances
        activity = self._instance_activity()
        return tuple(
            replace(i, utilization_ratio=activity[(uuid, i.gpu_instance_id)], activity_source="dcgm")
            if i.utilization_ratio is None and (uuid, i.gpu_instance_id) in activity
            else i
            for i in instances
        )

    def _process_sm(self, gpu: _Gpu) -> dict[int, float] | None:
        """Mean SM utilisation per pid over the samples since the last tick;
        None where the driver keeps no per-process samples."""
        try:
            samples = pynvml.nvmlDeviceGetProcessUtilization(gpu.handle, gpu.last_seen_us)
        except pynvml.NVMLError_NotFound:
            if gpu.last_sm and self._wall_clock() * 1e6 - gpu.last_seen_us < SAMPLE_HOLD_US:
                return dict(gpu.last_sm)
            return {}  # no new samples for a while: nothing ran on the GPU
        except pynvml.NVMLError_GpuIsLost:
            raise
        except pynvml.NVMLError:
            return None
        per_pid: dict[int, list[float]] = defaultdict(list)
        for s in samples:
            if s.smUtil <= 100:  # drivers mark missing values with large sentinels
                per_pid[int(s.pid)].append(float(s.smUtil))
            gpu.last_seen_us = max(gpu.last_seen_us, int(s.timeStamp))
        gpu.last_sm = {pid: sum(v) / len(v) for pid, v in per_pid.items()}
        return dict(gpu.last_sm)

    # -- reporting ----------------------------------------------------------

    def views(self) -> dict[str, GpuDeviceView]:
        """Per GPU label, what the last tick saw (GPUs down are absent)."""
        return dict(self._views)

    def status(self) -> list[SensorStatus]:
        with self._lock:
            return [SensorStatus(self.name, g.label, g.up, g.reason) for g in self._gpus]

    def diagnose(self) -> list[tuple[bool, str]]:
        """(usable, detail) per GPU, for ``jouleward doctor``."""
        found: list[tuple[bool, str]] = []
        for gpu in self._gpus:
            if gpu.handle is None:
                found.append((False, f"{gpu.label}: {gpu.reason}"))
                continue
            try:
                pynvml.nvmlDeviceGetTotalEnergyConsumption(gpu.handle)
                source = "energy counter (source nvml_energy)"
            except pynvml.NVMLError_NotSupported:
                source = f"no energy counter: power sampled every {self._interval_s:g} s (source nvml_power)"
            except pynvml.NVMLError as exc:
                found.append((False, f"{gpu.label} {gpu.name} {gpu.uuid}: {_reason(exc)}"))
                continue
            try:
                mig = _optional(lambda: pynvml.nvmlDeviceGetMigMode(gpu.handle)[0])  # noqa: B023 (called at once)
                per_process = self._process_sm(gpu) is not None
            except pynvml.NVMLError as exc:
                found.append((False, f"{gpu.label} {gpu.name} {gpu.uuid}: {_reason(exc)}"))
                continue
            split = "per-process SM utilisation" if per_process else "no per-process utilisation: split by memory"
            found.append((True, f"{gpu.label} {gpu.name} {gpu.uuid}: {source}, MIG {'on' if mig else 'off'}, {split}"))
        return found

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._shutdown()

    @staticmethod
    def _shutdown() -> None:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass


def _mig_instances(handle: object) -> tuple[MigInstanceView, ...]:
    """The GPU's MIG devices: UUID, instance ids, slices and, where the driver
    reports it, the instance's utilisation. An unreadable one is left out."""
    count = _optional(lambda: pynvml.nvmlDeviceGetMaxMigDeviceCount(handle)) or 0
    found: list[MigInstanceView] = []
    for index in range(int(count)):
        try:
            mig = pynvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, index)
        except pynvml.NVMLError_NotFound:
            continue  # slots without a MIG device
        except pynvml.NVMLError_GpuIsLost:
            raise
        except pynvml.NVMLError:
            continue
        try:
            uuid = _text(pynvml.nvmlDeviceGetUUID(mig))
            gi = int(pynvml.nvmlDeviceGetGpuInstanceId(mig))
            ci = int(pynvml.nvmlDeviceGetComputeInstanceId(mig))
        except pynvml.NVMLError_GpuIsLost:
            raise
        except pynvml.NVMLError:
            continue
        attributes = _optional(lambda: pynvml.nvmlDeviceGetAttributes_v2(mig))  # noqa: B023 (called at once)
        utilization = _optional(lambda: pynvml.nvmlDeviceGetUtilizationRates(mig).gpu / 100.0)  # noqa: B023
        slices = int(attributes.gpuInstanceSliceCount) if attributes is not None else 0
        found.append(
            MigInstanceView(uuid, gi, ci, max(slices, 1), utilization, "nvml" if utilization is not None else None)
        )
    return tuple(found)


def _text(value: str | bytes) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _optional(read: Callable[[], object]):
    """A secondary reading: None where unsupported; a lost GPU still raises."""
    try:
        value = read()
    except pynvml.NVMLError_GpuIsLost:
        raise
    except pynvml.NVMLError:
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def diagnose(visible_devices: str | None = None, power_sample_interval_s: float = 0.1) -> list[tuple[bool, str]]:
    """(usable, detail) lines saying what NVML offers here, or why it cannot be used."""
    try:
        sensor = NvmlSensor(visible_devices, power_sample_interval_s)
    except NvmlUnavailable as exc:
        return [(False, str(exc))]
    try:
        lines = sensor.diagnose()
        return [(True, f"NVML driver {sensor.driver_version}, {len(lines)} GPU(s) visible")] + lines
    finally:
        sensor.close()
