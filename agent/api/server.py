"""Runs the sampler and the HTTP servers (TCP reads, Unix-socket control)
until SIGTERM or SIGINT, then flushes the ledger and returns."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import threading
from pathlib import Path

import uvicorn

from agent.api.peercred import PeerCredH11Protocol
from agent.api.read import create_control_app, create_read_app
from agent.config import Config
from agent.pipeline.daemon import Agent

log = logging.getLogger("jouleward")


class ServeError(RuntimeError):
    pass


def _check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ServeError(f"--listen {host}:{port}: cannot bind: {exc.strerror}") from None


def _prepare_socket_path(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() or path.is_symlink():
            path.unlink()
    except OSError as exc:
        raise ServeError(f"--control-socket {path}: {exc.strerror}") from None


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


def serve(config: Config, stop: threading.Event | None = None) -> None:
    host, port = config.listen_host_port
    _check_port_free(host, port)
    control_token = read_control_token(config.control_token_file)
    socket_path = config.control_socket_path
    _prepare_socket_path(socket_path)
    agent = Agent(config)
    agent.start_pod_metadata()
    agent.tick()  # baseline, so the first scrape already has devices
    stop = stop or threading.Event()

    servers = [
        uvicorn.Server(
            uvicorn.Config(
                create_read_app(agent, control_token),
                host=host,
                port=port,
                log_level="warning",
                access_log=False,
                lifespan="off",
            )
        ),
        uvicorn.Server(
            uvicorn.Config(
                create_control_app(agent),
                uds=str(socket_path),
                log_level="warning",
                access_log=False,
                lifespan="off",
                http=PeerCredH11Protocol,
            )
        ),
    ]

    async def run_servers() -> None:
        await asyncio.gather(*(server.serve() for server in servers))

    http_thread = threading.Thread(target=lambda: asyncio.run(run_servers()), name="http", daemon=True)
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
    while not stop.wait(0.5):
        if not http_thread.is_alive():
            log.error("HTTP servers stopped unexpectedly")
            break
    for server in servers:
        server.should_exit = True
    agent.stop()
    sampler.join(timeout=10)
    http_thread.join(timeout=10)
    agent.close()
    try:
        os.unlink(socket_path)
    except OSError:
        pass
