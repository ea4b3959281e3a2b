"""Real cgroup directories for a test: processes started inside them before
they exec, so an agent never sees them anywhere else; removed at the end."""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import pytest

from agent.workloads.procfs import ProcessFacts
from tests.support import wait_until


def cgroup_mounts() -> list[tuple[Path, str]]:
    """(mount point, kind) for the cgroup2 mount and the v1 pids hierarchy, in that order."""
    found = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[2] == "cgroup2":
            found.insert(0, (Path(fields[1]), "v2"))
        elif len(fields) >= 4 and fields[2] == "cgroup" and "pids" in fields[3].split(","):
            found.append((Path(fields[1]), "v1"))
    return found


class Cgroups:
    """Cgroup directories made for one test, removed (processes moved out first) at the end."""

    def __init__(self) -> None:
        self.mount: Path | None = None
        self.base_name = f"jouleward-test-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        reasons = []
        for mount, kind in cgroup_mounts():
            probe = mount / self.base_name
            try:
                probe.mkdir()
            except OSError as exc:
                reasons.append(f"{mount}: mkdir: {exc.strerror}")
                continue
            sleeper = subprocess.Popen(["sleep", "30"])
            try:
                (probe / "cgroup.procs").write_text(str(sleeper.pid))
                path = f"/{self.base_name}"
                chosen = ProcessFacts(f"/proc/{sleeper.pid}").cgroup
                if chosen != path:
                    reasons.append(f"{mount}: the agent would read {chosen!r}, not {path!r}")
                    continue
                self.mount = mount
                break
            except OSError as exc:
                reasons.append(f"{mount}: writing cgroup.procs: {exc.strerror}")
            finally:
                self._move_to_root(mount, sleeper.pid)
                sleeper.kill()
                sleeper.wait()
                if self.mount is None:
                    probe.rmdir()
        if self.mount is None:
            pytest.skip("cannot place processes in new cgroups here: " + ("; ".join(reasons) or "no cgroup mount"))
        self.made: list[Path] = [self.mount / self.base_name]
        self.procs: list[subprocess.Popen] = []

    @staticmethod
    def _move_to_root(mount: Path, pid: int) -> None:
        try:
            (mount / "cgroup.procs").write_text(str(pid))
        except OSError:
            pass

    def path(self, relative: str) -> str:
        """The path /proc/<pid>/cgroup will show for ``relative``."""
        return f"/{self.base_name}/{relative}"

    def make(self, relative: str) -> Path:
        directory = self.mount / self.base_name
        for part in relative.split("/"):
            directory = directory / part
            if not directory.exists():
                directory.mkdir()
                self.made.append(directory)
        return directory

    def spawn(self, relative: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start a process already inside the cgroup (it joins before exec), so
        the agent never sees it anywhere else."""
        procs_file = str(self.make(relative) / "cgroup.procs")
        # The shell moves itself into the cgroup, then execs the command in place.
        proc = subprocess.Popen(
            ["sh", "-c", 'echo $$ > "$0" && exec "$@"', procs_file, *args], env={**os.environ, **(env or {})}
        )
        self.procs.append(proc)
        wait_until(
            lambda: Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")[0] == args[0].encode(),
            timeout_s=10,
            what="the command to start in its cgroup",
        )
        assert ProcessFacts(f"/proc/{proc.pid}").cgroup == self.path(relative)
        return proc

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                self._move_to_root(self.mount, proc.pid)
                proc.kill()
            proc.wait()
        for directory in reversed(self.made):
            try:
                directory.rmdir()
            except OSError:
                pass
        leftovers = [str(d) for d in self.made if d.exists()]
        assert not leftovers, f"cgroup directories left behind: {leftovers}"


def pod_dir(uid: str) -> str:
    return f"kubepods/burstable/pod{uid}/{uuid.uuid4().hex * 2}"
