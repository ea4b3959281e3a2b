"""A powercap tree whose energy counters advance at fixed power, written the
way the kernel presents them, from a background thread."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path


class ConstantPowerRapl:
    """``package-0`` at ``package_w`` and its ``dram`` sub-zone at ``dram_w``."""

    def __init__(self, sysfs: Path, package_w: float = 40.0, dram_w: float = 6.0) -> None:
        self.package = sysfs / "class/powercap/intel-rapl:0"
        self.dram = self.package / "intel-rapl:0:0"
        self.watts = ((self.package, package_w), (self.dram, dram_w))
        for zone, name in ((self.package, "package-0"), (self.dram, "dram")):
            zone.mkdir(parents=True)
            (zone / "name").write_text(name + "\n")
            (zone / "max_energy_range_uj").write_text("262143328850\n")
            (zone / "energy_uj").write_text("1000000\n")
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> ConstantPowerRapl:
        self.thread.start()
        return self

    def close(self) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join(timeout=5)

    def _run(self) -> None:
        start = time.monotonic()
        while not self.stop.wait(0.05):
            elapsed = time.monotonic() - start
            for zone, watts in self.watts:
                tmp = zone / "energy_uj.tmp"
                tmp.write_text(f"{1000000 + int(watts * elapsed * 1e6)}\n")
                os.replace(tmp, zone / "energy_uj")


class NodeProcfs:
    """A procfs that shows one node's processes only: the host's /proc files
    (stat, meminfo, sys, ...) linked in, and only the pids added to it, so
    two agents on one host each see their own node's pods."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True)
        for name in os.listdir("/proc"):
            if not name.isdigit():
                (root / name).symlink_to(f"/proc/{name}")

    def add(self, pid: int) -> None:
        (self.root / str(pid)).symlink_to(f"/proc/{pid}")
