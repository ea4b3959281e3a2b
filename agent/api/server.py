"""Runs the sampler and the HTTP servers (TCP reads, Unix-socket control)
until SIGTERM or SIGINT, then flushes the ledger and returns."""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import signal
import socket
import stat
import threading
import time
from pathlib import Path

from agent.api.http_server import MAX_HEAD_BYTES, HTTPServer, ListenerLimits
from agent.api.peercred import unix_peer_state
from agent.api.read import create_control_app, create_read_app
from agent.config import Config
from agent.ledger.schema import move_aside
from agent.pipeline.daemon import Agent

log = logging.getLogger("jouleward")


class ServeError(RuntimeError):
    """The agent cannot start as configured (exit status 2)."""


class ServeFailed(RuntimeError):
    """The agent started but a part of it died (exit status 1, so that a
    service manager's ``Restart=on-failure`` restarts it)."""


LOCK_FILE = "agent.lock"


def lock_state_dir(state_dir: Path) -> int:
    """Hold an exclusive lock on the state directory for the agent's life:
    one agent per ledger. Returns the lock file's descriptor."""
    path = state_dir / LOCK_FILE
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise ServeError(f"--state-dir {state_dir}: cannot create {LOCK_FILE}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        os.close(fd)
        raise ServeError(
            f"--state-dir {state_dir} is in use by another agent"
            f"{f' (pid {holder})' if holder.isdigit() else ''}; one agent per state directory"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _bind_tcp(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ServeError(f"--listen {host}:{port}: cannot bind: {exc.strerror}") from None
    return sock


def _bind_control_socket(path: Path) -> tuple[socket.socket, int]:
    """Bind the control socket; return it and its inode. A stale socket is
    replaced; a live one (another agent's) or anything that is not a socket
    is refused, never deleted."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        existing = os.lstat(path)
    except FileNotFoundError:
        existing = None
    except OSError as exc:
        raise ServeError(f"--control-socket {path}: {exc.strerror}") from None
    if existing is not None:
        if not stat.S_ISSOCK(existing.st_mode):
            raise ServeError(f"--control-socket {path}: exists and is not a socket; refusing to replace it")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(1.0)
            try:
                probe.connect(str(path))
            except OSError:
                pass  # nobody listens: left over from an agent that died
            else:
                raise ServeError(f"--control-socket {path}: another process is listening on it")
        try:
            os.unlink(path)
        except OSError as exc:
            raise ServeError(f"--control-socket {path}: cannot remove the stale socket: {exc.strerror}") from None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        # World-connectable: SO_PEERCRED, not file permissions, decides what a caller may do.
        os.chmod(path, 0o666)
        inode = os.stat(path).st_ino
    except OSError as exc:
        sock.close()
        raise ServeError(f"--control-socket {path}: cannot bind: {exc.strerror}") from None
    return sock, inode


def _socket_still_ours(path: Path, inode: int) -> bool:
    try:
        return os.lstat(path).st_ino == inode
    except OSError:
        return False


def read_control_token(path: Path | None) -> str | None:
    """The TCP control token, read once at start; None when not configured."""
    if path is None:
        return None
    try:
        token = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ServeError(f"control_token_file {path}: cannot read: {getattr(exc, 'strerror', None) or exc}") from None
    if len(token) < 16 or any(c.isspace() for c in token):
        raise ServeError(f"control_token_file {path}: the token must be at least 16 characters, without spaces")
    return token


def serve(config: Config, stop: threading.Event | None = None, fresh_ledger: bool = False) -> None:
    """Run until ``stop`` (or SIGTERM/SIGINT). Raises ServeError before
    starting, ServeFailed when an HTTP server or the control socket is lost.
    ``fresh_ledger`` moves an existing ledger aside (kept, renamed) and starts a new one."""
    lock_fd = lock_state_dir(config.state_dir)
    try:
        if fresh_ledger:
            kept = move_aside(config.state_dir, time.strftime("replaced-%Y%m%dT%H%M%SZ", time.gmtime()))
            if kept is not None:
                log.warning("started a new ledger; the old one is kept as %s", kept)
        _serve_locked(config, stop)
    finally:
        os.close(lock_fd)


def _serve_locked(config: Config, stop: threading.Event | None) -> None:
    host, port = config.listen_host_port
    control_token = read_control_token(config.control_token_file)
    tcp_sock = _bind_tcp(host, port)
    socket_path = config.control_socket_path
    try:
        unix_sock, socket_inode = _bind_control_socket(socket_path)
    except ServeError:
        tcp_sock.close()
        raise
    try:
        agent = Agent(config)
    except BaseException:
        tcp_sock.close()
        unix_sock.close()
        if _socket_still_ours(socket_path, socket_inode):
            os.unlink(socket_path)
        raise
    agent.start_pod_metadata()
    agent.tick()  # baseline, so the first scrape already has devices
    stop = stop or threading.Event()

    # The head deadline also ends idle keep-alive connections.
    limits = ListenerLimits(head_timeout_s=config.request_timeout_s, max_head_bytes=MAX_HEAD_BYTES)
    servers = [
        (HTTPServer(create_read_app(agent, control_token), tcp_sock, limits), f"the HTTP listener on {host}:{port}"),
        (
            HTTPServer(create_control_app(agent), unix_sock, limits, connection_state=unix_peer_state),
            f"the control socket server on {socket_path}",
        ),
    ]
    ended: list[str] = []  # what stopped first, and why

    async def run_servers() -> None:
        tasks = {asyncio.create_task(server.serve()): what for server, what in servers}
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            error = task.exception()
            ended.append(f"{tasks[task]} stopped" + (f": {error!r}" if error else ""))
        for server, _what in servers:
            server.stop()
        await asyncio.gather(*pending, return_exceptions=True)

    def http_main() -> None:
        try:
            asyncio.run(run_servers())
        except BaseException as exc:  # noqa: BLE001 - the main thread decides the exit status
            ended.append(f"the HTTP servers failed: {exc!r}")

    http_thread = threading.Thread(target=http_main, name="http", daemon=True)
    sampler = threading.Thread(target=agent.run, name="sampler", daemon=True)

    def request_stop(signum: int, _frame: object) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)
    sampler.start()
    http_thread.start()
    log.info(
        "jouleward listening on %s:%d, control socket %s, sensors: %s",
        host,
        port,
        socket_path,
        ", ".join(sensor.name for sensor in agent.sensor_set.sensors),
    )
    failure = ""
    while not stop.wait(0.5):
        if ended or not http_thread.is_alive():
            failure = ended[0] if ended else "the HTTP servers stopped"
        elif not _socket_still_ours(socket_path, socket_inode):
            # Removed or replaced (a clean-up job, another agent): callers can no longer reach us.
            failure = f"the control socket {socket_path} was removed or replaced"
        if failure:
            log.error("%s; stopping", failure)
            break
    for server, _what in servers:
        server.stop()
    agent.stop()
    sampler.join(timeout=10)
    http_thread.join(timeout=10)
    agent.close()
    if _socket_still_ours(socket_path, socket_inode):
        try:
            os.unlink(socket_path)
        except OSError:
            pass
    if failure:
        raise ServeFailed(failure)
