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


def cgroup_root(unified_mount: Path) -> Path:
    """The directory an agent's ``<sysfs>/fs/cgroup`` stands for, given the cgroup2 mount."""
    return unified_mount.parent if unified_mount.name == "unified" else unified_mount


def cgroup2_mount() -> Path | None:
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[2] == "cgroup2":
            return Path(fields[1])
    return None


class PodCgroups:
    """``processes`` idle processes spread over ``pods`` kubepods-shaped cgroup v2
    directories (a pod cgroup with one container cgroup each), made under
    the real cgroup2 mount and removed at the end. Raises OSError where
    this machine does not let us make cgroups or move processes into them."""

    def __init__(self, pods: int, processes: int, lifetime_s: int = 1800) -> None:
        mount = cgroup2_mount()
        if mount is None:
            raise OSError("no cgroup2 mount")
        self.mount = mount
        self.base = mount / f"jouleward-bench-{os.getpid()}"
        self.made: list[Path] = []
        self.sleepers = Sleepers(0)
        try:
            self._make(self.base)
            for i in range(pods):
                uid = f"00000000-0000-4000-8000-{i:012d}"
                pod = self.base / "kubepods" / "burstable" / f"pod{uid}"
                container = pod / (f"{i:02x}" * 32)
                self._make(container)
                count = processes // pods + (1 if i < processes % pods else 0)
                first = len(self.sleepers.pids)
                self.sleepers.grow(count, lifetime_s)
                for pid in self.sleepers.pids[first:]:
                    (container / "cgroup.procs").write_text(str(pid))
        except BaseException:
            self.stop()
            raise

    def _make(self, directory: Path) -> None:
        missing = []
        while not directory.exists():
            missing.append(directory)
            directory = directory.parent
        for path in reversed(missing):
            path.mkdir()
            self.made.append(path)

    @property
    def pids(self) -> list[int]:
        return self.sleepers.pids

    def stop(self) -> None:
        self.sleepers.stop()
        for directory in reversed(self.made):
            try:
                directory.rmdir()
            except OSError:
                pass
        self.made = []

    def __enter__(self) -> PodCgroups:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
