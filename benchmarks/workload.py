"""Real processes and fixture trees for the benchmarks and the fault tests.

Idle processes are ``sleep`` children started with ``posix_spawn`` (no
Python interpreter per process) and killed by pid. Each sleeps for a bounded
time, so a benchmark killed halfway leaves nothing behind for long.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

SLEEP = shutil.which("sleep") or "/bin/sleep"


class Sleepers:
    """``count`` idle processes, children of this process."""

    def __init__(self, count: int, lifetime_s: int = 1800) -> None:
        self.pids: list[int] = []
        try:
            for _ in range(count):
                self.pids.append(os.posix_spawn(SLEEP, [SLEEP, str(lifetime_s)], os.environ))
        except BaseException:
            self.stop()
            raise

    def grow(self, count: int, lifetime_s: int = 1800) -> None:
        for _ in range(count):
            self.pids.append(os.posix_spawn(SLEEP, [SLEEP, str(lifetime_s)], os.environ))

    def stop(self) -> None:
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in self.pids:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        self.pids = []

    def __enter__(self) -> Sleepers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def churn(count: int, batch: int = 200) -> None:
    """Start and reap ``count`` short-lived processes, ``batch`` at a time."""
    true = shutil.which("true") or "/bin/true"
    done = 0
    while done < count:
        pids = [os.posix_spawn(true, [true], os.environ) for _ in range(min(batch, count - done))]
        for pid in pids:
            os.waitpid(pid, 0)
        done += len(pids)


def write_powercap(
    sysfs: Path, packages: int = 2, energy_uj: int = 0, max_range_uj: int = 262143328850
) -> dict[str, Path]:
    """A RAPL powercap tree: a package and a dram zone per socket.

    Returns the ``energy_uj`` file of each zone by zone id.
    """
    root = sysfs / "class" / "powercap"
    root.mkdir(parents=True, exist_ok=True)
    counters: dict[str, Path] = {}
    for socket in range(packages):
        for zone_id, name in ((f"intel-rapl:{socket}", f"package-{socket}"), (f"intel-rapl:{socket}:0", "dram")):
            zone = root / zone_id
            zone.mkdir(exist_ok=True)
            (zone / "name").write_text(name + "\n")
            (zone / "max_energy_range_uj").write_text(f"{max_range_uj}\n")
            (zone / "energy_uj").write_text(f"{energy_uj}\n")
            counters[zone_id] = zone / "energy_uj"
    return counters
