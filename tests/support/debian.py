"""A Debian root filesystem built with debootstrap, cached outside the
repository, and the ways the deployment tests run things in it: a booted
systemd under systemd-nspawn, a plain nspawn container, and podman images.

The cache lives in ``$JOULEWARD_TEST_CACHE`` (default
``/var/cache/jouleward-tests``), one directory per recipe, keyed by a hash of
everything that goes into it (suite, packages, the host's extra CA
certificates), so a changed recipe builds a new tree and an unchanged one is
reused. Builds take a file lock, so concurrent runs share one build.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import http.client
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("JOULEWARD_TEST_CACHE", "/var/cache/jouleward-tests"))
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
# What both deployment tests need: systemd to boot, Python with venv for the
# install, curl for the documented checks.
PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3", "python3-venv", "ca-certificates", "curl")
RECIPE_VERSION = 1
EXTRA_CA_DIR = Path("/usr/local/share/ca-certificates")
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"  # Debian's bundle, inside the rootfs too
WHEELS_IN_CONTAINER = "/var/cache/jouleward-wheels"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def unavailable(reason: str) -> None:
    """Skip where the machine cannot run the test; under CI, fail instead."""
    if IN_CI:
        pytest.fail(f"CI machine lacks what this test needs: {reason}")
    pytest.skip(reason)


def require_tools(*tools: str) -> None:
    if os.geteuid() != 0:
        unavailable("needs root (debootstrap, systemd-nspawn, podman storage)")
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        unavailable(f"{', '.join(missing)} not installed (scripts/setup.d/60-deploy.sh)")


def run(argv: list[str], timeout_s: float = 600, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, check=False, **kwargs)
    if check and done.returncode != 0:
        raise AssertionError(f"{argv} exited with {done.returncode}:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    return done


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _extra_cas() -> list[Path]:
    return sorted(EXTRA_CA_DIR.glob("*.crt")) if EXTRA_CA_DIR.is_dir() else []


def rootfs_key() -> str:
    digest = hashlib.sha256(json.dumps([RECIPE_VERSION, SUITE, MIRROR, PACKAGES]).encode())
    for ca in _extra_cas():
        digest.update(ca.name.encode() + b"\0" + ca.read_bytes())
    return digest.hexdigest()[:16]


def debian_rootfs() -> Path:
    """The cached rootfs (built on first use, about a minute and a half).
    Treat it as read-only: containers boot it with a volatile overlay."""
    require_tools("debootstrap")
    key = rootfs_key()
    target = CACHE / f"rootfs-{SUITE}-{key}"
    with file_lock(CACHE / f"rootfs-{key}.lock"):
        if (target / "etc" / "os-release").exists():
            return target
        building = CACHE / f"rootfs-{SUITE}-{key}.building"
        shutil.rmtree(building, ignore_errors=True)
        run(
            ["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, str(building), MIRROR],
            timeout_s=1200,
        )
        # The host's extra CA certificates (a TLS-inspecting proxy's, say), so
        # pip inside reaches the package index the way the host does.
        for ca in _extra_cas():
            shutil.copy2(ca, building / "usr/local/share/ca-certificates" / ca.name)
        run(["chroot", str(building), "update-ca-certificates"])
        run(["chroot", str(building), "apt-get", "clean"])
        shutil.rmtree(building / "var/lib/apt/lists", ignore_errors=True)
        (building / "var/lib/apt/lists/partial").mkdir(parents=True)
        (building / "etc/machine-id").write_text("")  # each boot makes its own
        building.rename(target)
        return target


# --- the host's pip configuration, carried into containers and image builds ---

_PIP_KEYS = ("index-url", "extra-index-url", "find-links", "trusted-host")


@dataclass(frozen=True)
class PipSettings:
    """The host's package index settings: PIP_* variables for pip inside a
    container or build, and the local directories (file:// indexes, wheel
    directories) they name, to be bound read-only at the same paths."""

    env: dict[str, str]
    local_dirs: tuple[Path, ...]


def host_pip_settings() -> PipSettings:
    listed = subprocess.run(
        [
            str(REPO / ".venv/bin/python") if (REPO / ".venv/bin/python").exists() else "python3",
            "-m",
            "pip",
            "config",
            "list",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    values: dict[str, str] = {}
    for line in listed.stdout.splitlines():
        name, _, value = line.partition("=")
        key = name.rsplit(".", 1)[-1]
        if key in _PIP_KEYS:
            values[key] = value.strip().strip("'\"")
    for key in _PIP_KEYS:  # the environment wins, as it does for pip
        from_env = os.environ.get("PIP_" + key.upper().replace("-", "_"))
        if from_env:
            values[key] = from_env
    env = {"PIP_" + key.upper().replace("-", "_"): value for key, value in values.items()}
    env["PIP_CERT"] = CA_BUNDLE
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    local: list[Path] = []
    for key in ("index-url", "extra-index-url", "find-links"):
        for token in values.get(key, "").split():
            path = Path(token.removeprefix("file://")) if token.startswith(("file://", "/")) else None
            if path is None or not path.is_absolute() or not path.is_dir():
                continue
            # A local index's pages link to files beside it (../../files/...).
            local.append(path.parent if key != "find-links" and path.name == "simple" else path)
    return PipSettings(env=env, local_dirs=tuple(dict.fromkeys(local)))


def wheelhouse(rootfs: Path, lock: Path) -> Path:
    """Every wheel of ``lock``, downloaded once (per lock and rootfs) by the
    rootfs's own pip, with the host's index settings, into the cache.
    Containers with a private network install from it with
    ``PIP_NO_INDEX=1 PIP_FIND_LINKS=<it>``: the documented pip commands, run
    as on a host whose index is a local wheel directory."""
    digest = hashlib.sha256(lock.read_bytes() + rootfs.name.encode()).hexdigest()[:16]
    target = CACHE / f"wheels-{digest}"
    with file_lock(CACHE / f"wheels-{digest}.lock"):
        if (target / ".complete").exists():
            return target
        building = CACHE / f"wheels-{digest}.building"
        shutil.rmtree(building, ignore_errors=True)
        building.mkdir(parents=True)
        pip = host_pip_settings()
        args = [
            f"--directory={rootfs}",
            "--volatile=overlay",
            "--as-pid2",
            "--console=pipe",
            f"--bind-ro={lock}:/run/lock.txt",
            f"--bind={building}:/wheels",
            *(f"--bind-ro={path}" for path in pip.local_dirs),
            *(f"--setenv={key}={value}" for key, value in pip.env.items()),
            "/bin/sh",
            "-ec",
            (
                "python3 -m venv /opt/pip-download && /opt/pip-download/bin/pip download "
                "--quiet --require-hashes --no-deps -r /run/lock.txt -d /wheels"
            ),
        ]
        done = run(
            nspawn_command(machine_name("jw-wheels"), args), check=False, timeout_s=900, stdin=subprocess.DEVNULL
        )
        assert done.returncode == 0, f"pip download in the rootfs failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        (building / ".complete").write_text("")
        building.rename(target)
        return target


def wheelhouse_env(path: str) -> dict[str, str]:
    return {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": path, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


# --- HTTP into a container's own network namespace ---

_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000


def connect_in_netns(netns: Path, host: str, port: int, timeout_s: float = 5.0) -> socket.socket:
    """A TCP socket connected from inside the network namespace ``netns``
    (a /proc/PID/ns/net path): a helper thread enters it, connects, and hands
    the socket back, so this process's own namespace is left alone."""
    result: dict[str, object] = {}

    def enter_and_connect() -> None:
        try:
            with open(netns) as ns:
                if _libc.setns(ns.fileno(), CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns")
            result["socket"] = socket.create_connection((host, port), timeout=timeout_s)
        except OSError as exc:
            result["error"] = exc

    # A thread that changed namespace must not run anything else: it ends here.
    worker = threading.Thread(target=enter_and_connect)
    worker.start()
    worker.join()
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    return result["socket"]  # type: ignore[return-value]


class NetnsHTTPConnection(http.client.HTTPConnection):
    def __init__(self, netns: Path, host: str, port: int, timeout: float = 10.0) -> None:
        super().__init__(host, port, timeout=timeout)
        self._netns = netns

    def connect(self) -> None:
        self.sock = connect_in_netns(self._netns, self.host, self.port, self.timeout or 10.0)


# --- containers ---


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def nspawn_command(machine: str, nspawn_args: list[str], setup: str = "") -> list[str]:
    """systemd-nspawn in a mount namespace of its own with a tmpfs at
    /run/systemd/nspawn: nspawn keeps per-machine state there and refuses to
    clean it up where /run is not a tmpfs. ``setup`` (shell) runs in that
    namespace first."""
    script = f'set -e; mount -t tmpfs tmpfs /run/systemd/nspawn; {setup}\nexec systemd-nspawn "$@"'
    Path("/run/systemd/nspawn").mkdir(parents=True, exist_ok=True)
    return [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        script,
        "nspawn",
        "--quiet",
        "--register=no",
        "--keep-unit",
        f"--machine={machine}",
        *nspawn_args,
    ]


@dataclass
class Container:
    """One systemd-nspawn container, started by this process."""

    proc: subprocess.Popen
    log_path: Path
    leader: int = 0

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def wait_for_leader(self, comm: str, timeout_s: float = 60.0) -> int:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"systemd-nspawn exited with {self.proc.returncode}:\n{self.log()}")
            for child in _children(self.proc.pid):
                if _comm(child) == comm or comm == "*":
                    self.leader = child
                    return child
            time.sleep(0.05)
        raise AssertionError(f"no container process {comm!r} after {timeout_s} s:\n{self.log()}")

    @property
    def netns(self) -> Path:
        return Path(f"/proc/{self.leader}/ns/net")

    def http(self, method: str, path: str, port: int, body: object = None) -> tuple[int, object]:
        from tests.support import http_request

        return http_request(NetnsHTTPConnection(self.netns, "127.0.0.1", port), method, path, body)

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM: nspawn shuts a booted system down cleanly, or ends a plain
        container's processes."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_container(
    machine: str, nspawn_args: list[str], log_path: Path, setup: str = "", env: dict[str, str] | None = None
) -> Container:
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            nspawn_command(machine, nspawn_args, setup),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Container(proc, log_path)


def machine_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@dataclass
class Booted:
    """A Debian system booted with systemd as PID 1 in a container. Commands
    run as transient units of that systemd (``systemd-run --pipe``), so they
    live in its cgroups, as its users, under its journal."""

    container: Container
    env: dict[str, str] = field(default_factory=dict)

    def run(
        self,
        argv: list[str],
        user: str | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        check: bool = True,
        timeout_s: float = 600,
    ) -> subprocess.CompletedProcess:
        unit = ["systemd-run", "--quiet", "--wait", "--pipe", "--collect", "--service-type=exec"]
        if user:
            unit.append(f"--uid={user}")
        if cwd:
            unit.append(f"--working-directory={cwd}")
        for key, value in {**self.env, **(env or {})}.items():
            unit.append(f"--setenv={key}={value}")
        return run(self.nsenter(unit + ["--", *argv]), timeout_s=timeout_s, check=check, stdin=subprocess.DEVNULL)

    def sh(self, script: str, **kwargs) -> subprocess.CompletedProcess:
        return self.run(["/bin/sh", "-ec", script], **kwargs)

    def nsenter(self, argv: list[str]) -> list[str]:
        return ["nsenter", "-t", str(self.container.leader), "-m", "-u", "-i", "-n", "-p", "-C", "--", *argv]

    def main_pid(self, unit: str) -> int:
        done = run(self.nsenter(["systemctl", "show", "-P", "MainPID", unit]))
        return int(done.stdout.strip())


def boot(rootfs: Path, log_path: Path, binds: list[str], timeout_s: float = 120.0) -> Booted:
    """Boot ``rootfs`` with a volatile overlay (the cached tree is never
    written), a private network, and ``binds`` (nspawn --bind/--bind-ro
    arguments); returns once the system reports running."""
    container = start_container(
        machine_name("jw-boot"),
        [
            f"--directory={rootfs}",
            "--boot",
            "--volatile=overlay",
            "--private-network",
            "--console=passive",
            *binds,
        ],
        log_path,
    )
    container.wait_for_leader("systemd", timeout_s)
    booted = Booted(container)
    deadline = time.monotonic() + timeout_s
    while True:
        done = run(booted.nsenter(["systemctl", "is-system-running", "--wait"]), check=False, timeout_s=timeout_s)
        state = done.stdout.strip()
        if state in ("running", "degraded"):
            break
        if time.monotonic() > deadline:
            raise AssertionError(f"system did not boot ({state!r}):\n{container.log()}")
        time.sleep(0.2)
    return booted


def repo_copy(destination: Path) -> Path:
    """The repository as a clone would have it: tracked files and untracked
    ones git does not ignore (no .venv, no caches)."""
    listed = run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"])
    for name in filter(None, listed.stdout.split("\0")):
        source = REPO / name
        if not source.is_file():
            continue  # deleted in the work tree but still in the index
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
    return destination


# --- podman, with its storage in the cache ---


def podman(*args: str) -> list[str]:
    storage = CACHE / "podman"
    return ["podman", "--root", str(storage / "root"), "--runroot", str(storage / "runroot"), *args]


def base_image(rootfs: Path) -> str:
    """The rootfs as a podman image, imported once per rootfs."""
    tag = f"localhost/jouleward-test-base:{rootfs.name.rsplit('-', 1)[-1]}"
    with file_lock(CACHE / "podman.lock"):
        if run(podman("image", "exists", tag), check=False).returncode != 0:
            tar = subprocess.Popen(["tar", "-C", str(rootfs), "--numeric-owner", "-c", "."], stdout=subprocess.PIPE)
            imported = subprocess.run(
                podman("import", "-", tag), stdin=tar.stdout, capture_output=True, text=True, timeout=600, check=False
            )
            tar.stdout.close()  # type: ignore[union-attr]
            assert tar.wait() == 0 and imported.returncode == 0, imported.stderr
    return tag


def assert_conserved_in_the_api(get: Callable[[str], tuple[int, object]], domains: tuple[str, ...]) -> None:
    """Over the agent's whole history, finished jobs in the ledger included:
    per domain, node == idle + unattributed + sum of /v1/jobs, exactly. A
    reading counts when /v1/node did not move while /v1/jobs was read; the
    books balance in one of those readings, or conservation is broken."""
    tried = []
    for _ in range(20):
        first: Any = get("/v1/node")[1]
        status, jobs_answer = get("/v1/jobs?limit=10000")
        assert status == 200, jobs_answer
        node: Any = get("/v1/node")[1]
        jobs: Any = jobs_answer
        if first["timestamp"] != node["timestamp"]:
            continue
        books = {}
        for domain in domains:
            measured = sum(d["energy_j"] for d in node["devices"] if d["domain"] == domain)
            parts = (
                node["idle_j"].get(domain, 0.0)
                + node["unattributed_j"].get(domain, 0.0)
                + sum(job["energy_j"].get(domain, 0.0) for job in jobs)
            )
            books[domain] = (measured, parts)
        tried.append(books)
        if all(measured > 0 and abs(parts - measured) <= 1e-9 * measured for measured, parts in books.values()):
            return
        time.sleep(0.1)
    raise AssertionError(f"energy not conserved in the API, (node, idle + unattributed + jobs) by domain: {tried}")
