"""What the NVML sensor reports about each GPU over one tick, beyond energy.

Read by GPU attribution and the exporters. Units live in field names.
"""
from __future__ import annotations

from dataclasses import dataclass

SPLIT_SM = "sm"  # by share of summed per-process SM utilisation
SPLIT_MEMORY = "memory"  # by share of GPU memory held: no usable utilisation
SPLIT_EQUAL = "equal"  # equally: neither utilisation nor memory known


@dataclass(frozen=True, slots=True)
class GpuProcess:
    """One process holding a GPU context during the tick (host pid)."""

    pid: int
    used_memory_bytes: int
    # Mean SM utilisation of the process over the tick's samples, 0..100;
    # None where the driver gives no per-process utilisation (MIG, old drivers).
    sm_utilization_pct: float | None = None
    gpu_instance_id: int | None = None  # MIG GPU instance, where MIG is on


@dataclass(frozen=True, slots=True)
class GpuDeviceView:
    """Identity, state and processes of one GPU for the last tick."""

    index: int
    device: str  # gpu-<index>: the label energy is reported under
    uuid: str
    name: str
    utilization_ratio: float | None
    memory_used_bytes: int | None
    memory_total_bytes: int | None
    power_limit_w: float | None
    mig_enabled: bool
    processes: tuple[GpuProcess, ...] = ()
    # False where the process list could not be read (so nobody is known to
    # hold the GPU, and its energy cannot be split).
    processes_known: bool = True
    pci_bus_id: str = ""  # "00000000:17:00.0"; "" where the driver does not say

    @property
    def split_method(self) -> str:
        return split_method(self.processes)


def split_method(processes: tuple[GpuProcess, ...] | list[GpuProcess]) -> str:
    """Which rule splits a GPU's active energy among these processes."""
    if any((p.sm_utilization_pct or 0.0) > 0 for p in processes):
        return SPLIT_SM
    if any(p.used_memory_bytes > 0 for p in processes):
        return SPLIT_MEMORY
    return SPLIT_EQUAL
