"""Read-only client of a running agent's HTTP API (the TCP listener), for the CLI."""

from __future__ import annotations

import json
import os
import stat
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from agent.config import parse_listen


class AgentNotRunning(ConnectionError):
    """Nothing answers at the agent's listen address."""


class AgentAnswer(RuntimeError):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"agent answered {status}: {detail}")
        self.status = status
        self.detail = detail


class AgentReader:
    """Reads from the TCP listener at ``listen``; when nothing answers there,
    from the first of ``control_sockets`` that exists (the control socket
    serves the same reads), so a listener bound to another address or port
    than this shell's configuration says still finds the agent."""

    def __init__(self, listen: str, timeout_s: float = 5.0, control_sockets: Iterable[Path] = ()) -> None:
        host, port = parse_listen(listen)
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"  # a wildcard listener is reached on loopback
        self.base = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
        self.timeout_s = timeout_s
        self.control_sockets = tuple(control_sockets)

    def get_text(self, path: str, **query: str) -> str:
        try:
            return self._get_tcp(path, **query)
        except AgentNotRunning as exc:
            socket_path = next((p for p in self.control_sockets if _is_socket(p)), None)
            if socket_path is None:
                raise
            return self._get_unix(socket_path, path, str(exc), **query)

    def _get_unix(self, socket_path: Path, path: str, tcp_failure: str, **query: str) -> str:
        from agent.client import AgentError, AgentUnavailable, ControlClient

        url = path + (f"?{urllib.parse.urlencode(query)}" if query else "")
        try:
            answer = ControlClient(socket_path, self.timeout_s).request("GET", url)
        except AgentUnavailable as exc:
            raise AgentNotRunning(f"{tcp_failure}; {exc}") from None
        except AgentError as exc:
            raise AgentAnswer(exc.status, exc.message) from None
        return answer if isinstance(answer, str) else json.dumps(answer)

    def _get_tcp(self, path: str, **query: str) -> str:
        url = self.base + path + (f"?{urllib.parse.urlencode(query)}" if query else "")
        try:
            with urllib.request.urlopen(url, timeout=self.timeout_s) as response:
                return response.read().decode("utf-8")
        except urllib.error.HTTPError as exc:
            try:
                detail = json.loads(exc.read()).get("detail", exc.reason)
            except (ValueError, AttributeError):
                detail = exc.reason
            raise AgentAnswer(exc.code, str(detail)) from None
        except (urllib.error.URLError, OSError) as exc:
            raise AgentNotRunning(f"no agent answers at {self.base}: {getattr(exc, 'reason', exc)}") from None

    def get_json(self, path: str, **query: str) -> Any:
        text = self.get_text(path, **query)
        try:
            return json.loads(text)
        except ValueError:
            raise AgentAnswer(200, f"{path} did not answer JSON") from None

    def node(self) -> dict[str, Any]:
        return self.get_json("/v1/node")

    def jobs(self, limit: int = 1000) -> list[dict[str, Any]]:
        return self.get_json("/v1/jobs", limit=str(limit))

    def job(self, job_id: str) -> dict[str, Any]:
        return self.get_json(f"/v1/jobs/{urllib.parse.quote(job_id, safe='')}")

    def report(self, job_id: str, fmt: str) -> str:
        return self.get_text(f"/v1/jobs/{urllib.parse.quote(job_id, safe='')}/report", format=fmt)


def _is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False
