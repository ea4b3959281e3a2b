"""Test support: fixture hardware trees, real agent processes, real clients.

Everything here drives real parts: a powercap tree on disk that the test
advances, the agent started as a real process with its real CLI, HTTP over
loopback and over the real Unix control socket.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(
    predicate,
    timeout_s: float = 20.0,
    interval_s: float = 0.05,
    what: str = "condition",
    ignore: tuple[type[BaseException], ...] = (),
):
    """Poll ``predicate`` until it returns something truthy; errors of the
    ``ignore`` types count as "not yet" (a server still starting)."""
    deadline = time.monotonic() + timeout_s
    last: object = None
    while True:
        try:
            value = predicate()
            if value:
                return value
            last = value
        except ignore as exc:
            last = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what} (last: {last!r})")
        time.sleep(interval_s)


@dataclass
class PowercapZone:
    path: Path
    max_range_uj: int
    energy_uj: int = 0

    def set(self, energy_uj: int) -> None:
        self.energy_uj = energy_uj % self.max_range_uj
        tmp = self.path / "energy_uj.tmp"
        tmp.write_text(f"{self.energy_uj}\n")
        os.replace(tmp, self.path / "energy_uj")

    def add_j(self, joules: float) -> None:
        self.set(self.energy_uj + int(round(joules * 1e6)))


@dataclass
class FakePowercap:
    """A powercap sysfs tree under ``root/class/powercap``, laid out as the
    kernel does (flat symlinks to nested zone directories)."""

    root: Path
    zones: dict[str, PowercapZone] = field(default_factory=dict)

    def add_zone(
        self, zone_id: str, name: str, max_range_uj: int = 262_143_328_850, energy_uj: int = 0
    ) -> PowercapZone:
        base = self.root / "class" / "powercap"
        parent_id = zone_id.rsplit(":", 1)[0] if zone_id.count(":") > 1 else None
        directory = (base / parent_id / zone_id) if parent_id else base / zone_id
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "name").write_text(name + "\n")
        (directory / "max_energy_range_uj").write_text(f"{max_range_uj}\n")
        (directory / "enabled").write_text("1\n")
        if parent_id:
            link = base / zone_id
            if not link.exists():
                link.symlink_to(directory)
        zone = PowercapZone(directory, max_range_uj)
        zone.set(energy_uj)
        self.zones[zone_id] = zone
        return zone


def two_socket_server(root: Path) -> FakePowercap:
    """Two packages with dram, core and uncore sub-zones, psys, and the mmio
    duplicate of package 0 that recent kernels expose."""
    tree = FakePowercap(root)
    (root / "class" / "powercap" / "intel-rapl").mkdir(parents=True, exist_ok=True)
    (root / "class" / "powercap" / "intel-rapl" / "enabled").write_text("1\n")
    for socket_index in (0, 1):
        tree.add_zone(f"intel-rapl:{socket_index}", f"package-{socket_index}")
        tree.add_zone(f"intel-rapl:{socket_index}:0", "core")
        tree.add_zone(f"intel-rapl:{socket_index}:1", "uncore")
        tree.add_zone(f"intel-rapl:{socket_index}:2", "dram", max_range_uj=65_712_999_613)
    tree.add_zone("intel-rapl:2", "psys")
    tree.add_zone("intel-rapl-mmio:0", "package-0")
    return tree


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, socket_path: str, timeout: float = 10.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self._socket_path = socket_path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        if len(os.fsencode(self._socket_path)) < 100:
            self.sock.connect(self._socket_path)
            return
        # Past sun_path's 108 bytes: connect through a short symlink (connect follows it).
        short = Path(tempfile.mkdtemp(prefix="jw-")) / "s"
        try:
            short.symlink_to(self._socket_path)
            self.sock.connect(str(short))
        finally:
            short.unlink(missing_ok=True)
            short.parent.rmdir()


def http_request(conn: http.client.HTTPConnection, method: str, path: str, body=None) -> tuple[int, object]:
    headers = {}
    payload = None
    if body is not None:
        payload = body if isinstance(body, (bytes, str)) else json.dumps(body)
        headers["Content-Type"] = "application/json"
    try:
        conn.request(method, path, body=payload, headers=headers)
        response = conn.getresponse()
        data = response.read()
    finally:
        conn.close()
    ctype = response.getheader("content-type", "")
    return response.status, json.loads(data) if "json" in ctype else data.decode()


_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    samples = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        assert match, f"unparseable exposition line: {line!r}"
        labels = dict(_LABEL.findall(match.group(2) or ""))
        samples.append((match.group(1), labels, float(match.group(3))))
    return samples


def metric_values(samples, name: str, **match: str) -> list[tuple[dict[str, str], float]]:
    return [
        (labels, value)
        for n, labels, value in samples
        if n == name and all(labels.get(k) == v for k, v in match.items())
    ]


def metric_sum(samples, name: str, **match: str) -> float:
    return sum(value for _, value in metric_values(samples, name, **match))


class AgentProcess:
    """``jouleward run`` as a real process on a free loopback port."""

    def __init__(
        self,
        state_dir: Path,
        *extra: str,
        sysfs: Path | None = None,
        interval_s: float = 0.2,
        env: dict[str, str] | None = None,
        config: Path | None = None,
    ) -> None:
        self.state_dir = state_dir
        self.port = free_port()
        self.socket_path = str(state_dir / "control.sock")
        args = [
            sys.executable,
            "-m",
            "agent.cli",
            "run",
            "--listen",
            f"127.0.0.1:{self.port}",
            "--state-dir",
            str(state_dir),
            "--interval",
            str(interval_s),
            "--log-level",
            "warning",
        ]
        if sysfs is not None:
            args += ["--sysfs", str(sysfs)]
        if config is not None:
            args += ["--config", str(config)]
        args += list(extra)
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("JOULEWARD_")}
        full_env.update(env or {})
        full_env["PYTHONPATH"] = str(REPO)
        self.log_path = state_dir.parent / f"agent-{self.port}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(args, cwd=REPO, env=full_env, stdout=self._log, stderr=subprocess.STDOUT)
        try:
            wait_until(self._ready, timeout_s=30, what="agent readiness")
        except AssertionError:
            self.stop()
            raise AssertionError(f"agent did not become ready: {self.log()}") from None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"agent exited with {self.proc.returncode}: {self.log()}")
        try:
            status, _ = self.get("/readyz")
        except OSError:
            return False
        return status == 200

    def get(self, path: str) -> tuple[int, object]:
        return http_request(http.client.HTTPConnection("127.0.0.1", self.port, timeout=10), "GET", path)

    def control(self, method: str, path: str, body=None) -> tuple[int, object]:
        return http_request(UnixHTTPConnection(self.socket_path), method, path, body)

    def metrics_text(self) -> str:
        status, text = self.get("/metrics")
        assert status == 200
        return text

    def metrics(self):
        return parse_metrics(self.metrics_text())

    def ticks(self) -> int:
        return int(metric_sum(self.metrics(), "jouleward_ticks_total"))

    def wait_ticks(self, count: int = 2, timeout_s: float = 20.0) -> None:
        target = self.ticks() + count
        wait_until(lambda: self.ticks() >= target, timeout_s, what=f"{count} more ticks")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


BURNER = r"""
import sys, time
# Use `share` of one CPU, self-correcting: after each 100 ms period the process
# has used share * elapsed wall time of CPU, so two burners keep their CPU-time
# ratio even on a busy machine (a late period is made up in the next one).
share = float(sys.argv[1])
started_wall, started_cpu = time.monotonic(), time.process_time()
while True:
    target = started_cpu + share * (time.monotonic() - started_wall + 0.1)
    while time.process_time() < target:
        pass
    time.sleep(max(0.0, 0.1 - (time.monotonic() - started_wall) % 0.1))
"""


def start_burner(share: float, env: dict[str, str] | None = None) -> subprocess.Popen:
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.Popen([sys.executable, "-c", BURNER, str(share)], env=full_env)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
