"""Register a model job with the local agent from inside a training script.

    from agent.client import Job

    with Job("llama-ft", labels={"team": "nlp"}) as job:
        for batch in loader:
            ...
            job.add_work("tokens", batch_tokens)
    print(job.summary.energy_j)

    @Job.decorate("eval")
    def evaluate(): ...

The current process and every child it starts later (data-loader workers)
belong to the job until it finishes. With no agent listening, the job is
measured in-process with the agent's own sensors and arithmetic.
"""

from __future__ import annotations

import functools
import http.client
import json
import os
import socket
import stat
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

from agent.config import DEFAULT_CONTROL_SOCKETS

DEFAULT_CONTROL_SOCKET = DEFAULT_CONTROL_SOCKETS[0]
SOCKET_ENV = "JOULEWARD_CONTROL_SOCKET"
STATE_DIR_ENV = "JOULEWARD_STATE_DIR"
JOB_ID_ENV = "JOULEWARD_JOB_ID"

F = TypeVar("F", bound=Callable[..., Any])


class AgentError(RuntimeError):
    """The agent answered with an error; ``status`` is the HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"agent answered {status}: {message}")
        self.status = status
        self.message = message


class AgentUnavailable(ConnectionError):
    """No agent listens on the control socket."""


def first_socket(candidates: Iterable[Path]) -> Path:
    """The first candidate that is a socket now, else the first candidate."""
    candidates = list(candidates)
    for path in candidates:
        try:
            if stat.S_ISSOCK(os.stat(path).st_mode):
                return path
        except OSError:
            continue
    return candidates[0]


def control_socket_path(path: str | os.PathLike[str] | None = None) -> Path:
    """``path``; else ``JOULEWARD_CONTROL_SOCKET``; else the first socket of
    ``$JOULEWARD_STATE_DIR/control.sock`` and the shipped deployments'
    places (``/run/jouleward/control.sock``, ``/var/lib/jouleward/control.sock``)."""
    if path is not None:
        return Path(path)
    # The client runs in the user's process, so its environment is the
    # user's configuration to read.
    if os.environ.get(SOCKET_ENV):
        return Path(os.environ[SOCKET_ENV])
    state_dir = os.environ.get(STATE_DIR_ENV)
    own = [Path(state_dir) / "control.sock"] if state_dir else []
    return first_socket([*own, *DEFAULT_CONTROL_SOCKETS])


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout_s: float) -> None:
        super().__init__("localhost", timeout=timeout_s)
        self._path = str(path)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class ControlClient:
    """JSON over HTTP over the agent's Unix control socket."""

    def __init__(self, path: str | os.PathLike[str] | None = None, timeout_s: float = 10.0) -> None:
        self.path = control_socket_path(path)
        self.timeout_s = timeout_s

    def request(self, method: str, url: str, body: Mapping[str, Any] | None = None) -> Any:
        conn = _UnixConnection(self.path, self.timeout_s)
        try:
            payload = json.dumps(body).encode() if body is not None else None
            headers = {"Content-Type": "application/json"} if payload is not None else {}
            try:
                conn.request(method, url, body=payload, headers=headers)
                response = conn.getresponse()
                raw = response.read()
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                raise AgentUnavailable(f"no agent at {self.path}: {exc.strerror}") from None
            except PermissionError as exc:
                raise AgentUnavailable(f"cannot connect to {self.path}: {exc.strerror}") from None
            except (OSError, http.client.HTTPException) as exc:  # the agent went away mid-request
                raise AgentUnavailable(f"the agent at {self.path} did not answer: {exc!r}") from None
            try:
                data = json.loads(raw) if raw else None
            except ValueError:
                data = raw.decode("utf-8", "replace")
            if response.status >= 400:
                detail = data.get("detail", data) if isinstance(data, dict) else data
                raise AgentError(response.status, str(detail))
            return data
        finally:
            conn.close()

    def register(self, name: str, pids: list[int], labels: Mapping[str, str] | None = None) -> dict[str, Any]:
        return self.request("POST", "/v1/jobs", {"name": name, "pids": pids, "labels": dict(labels or {})})

    def finish(self, job_id: str) -> dict[str, Any]:
        return self.request("POST", f"/v1/jobs/{quote(job_id, safe='')}/finish", {})

    def add_work(self, job_id: str, unit: str, count: float) -> dict[str, Any]:
        return self.request("POST", f"/v1/jobs/{quote(job_id, safe='')}/work", {"unit": unit, "count": count})

    def job(self, job_id: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/jobs/{quote(job_id, safe='')}")


@dataclass(frozen=True)
class JobSummary:
    name: str
    job_id: str
    mode: str  # agent, standalone
    duration_s: float
    energy_j: dict[str, float] = field(default_factory=dict)  # by domain
    work_units: dict[str, float] = field(default_factory=dict)  # by unit
    sources: dict[str, str] = field(default_factory=dict)  # domain -> how it was measured
    emissions_g: float | None = None  # gCO2eq, PUE included; None when the agent did not say

    @property
    def total_energy_j(self) -> float:
        return sum(self.energy_j.values())

    @property
    def average_power_w(self) -> float:
        return self.total_energy_j / self.duration_s if self.duration_s > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "job_id": self.job_id,
            "mode": self.mode,
            "duration_s": round(self.duration_s, 6),
            "energy_j": {k: round(v, 6) for k, v in sorted(self.energy_j.items())},
            "total_energy_j": round(self.total_energy_j, 6),
            "average_power_w": round(self.average_power_w, 6),
            "work_units": dict(sorted(self.work_units.items())),
            "sources": dict(sorted(self.sources.items())),
            "emissions_g": None if self.emissions_g is None else round(self.emissions_g, 9),
        }


class Job:
    """A model job around a block of code: a context manager or a decorator.

    ``standalone``: None tries the agent and measures in-process if none
    answers; True always measures in-process; False requires the agent.
    """

    def __init__(
        self,
        name: str,
        labels: Mapping[str, str] | None = None,
        socket_path: str | os.PathLike[str] | None = None,
        standalone: bool | None = None,
        interval_s: float = 1.0,
        pids: list[int] | None = None,
    ) -> None:
        self.name = name
        self.labels = dict(labels or {})
        self.client = ControlClient(socket_path)
        self.standalone = standalone
        self.interval_s = interval_s
        self.pids = pids
        self.job_id = ""
        self.mode = ""
        self.summary: JobSummary | None = None
        self._meter: Any = None
        self._started = 0.0
        self._work: dict[str, float] = {}

    def prime(self) -> None:
        """Standalone only: start measuring before the processes to measure exist."""
        if self._meter is None:
            from agent.pipeline.standalone import StandaloneMeter  # sensors load only when needed

            self._meter = StandaloneMeter(interval_s=self.interval_s, name=self.name)
        self._meter.prime()

    def start(self, pids: list[int] | None = None) -> Job:
        pids = pids or self.pids or [os.getpid()]
        self._started = time.monotonic()
        if self.standalone is not True and self._meter is None:
            try:
                answer = self.client.register(self.name, pids, self.labels)
                self.job_id, self.mode = str(answer["id"]), "agent"
                return self
            except AgentUnavailable:
                if self.standalone is False:
                    raise
        self.prime()
        self._meter.start(pids)
        self.job_id, self.mode = self._meter.job_id, "standalone"
        return self

    def add_work(self, unit: str, count: float) -> None:
        """Report units of work done (``samples``, ``tokens``, ``requests``, ...)."""
        if self.mode == "agent":
            self.client.add_work(self.job_id, unit, count)
        else:
            from agent.api.access import validate_work

            unit, count = validate_work(unit, count)
        self._work[unit] = self._work.get(unit, 0.0) + float(count)

    def finish(self) -> JobSummary:
        if self.summary is not None:
            return self.summary
        duration = time.monotonic() - self._started
        if self.mode == "agent":
            answer = self.client.finish(self.job_id)
            self.summary = summary_from_agent(self.name, self.job_id, duration, answer, self._work)
        else:
            totals = self._meter.stop()
            self.summary = JobSummary(
                self.name,
                self.job_id,
                "standalone",
                duration,
                totals.energy_j,
                dict(self._work),
                totals.sources,
                totals.emissions_g,
            )
        return self.summary

    def abandon(self) -> None:
        """Give up before the job ran: finish a registration, drop a meter."""
        if self.mode == "agent":
            self.finish()
        elif self._meter is not None:
            self._meter.stop()
            self._meter = None

    def __enter__(self) -> Job:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.finish()

    @classmethod
    def decorate(cls, name: str | None = None, **kwargs: Any) -> Callable[[F], F]:
        def wrap(func: F) -> F:
            @functools.wraps(func)
            def run(*args: Any, **kw: Any) -> Any:
                with cls(name or func.__qualname__, **kwargs):
                    return func(*args, **kw)

            return run  # type: ignore[return-value]

        return wrap


job = Job.decorate


def summary_from_agent(
    name: str, job_id: str, duration_s: float, answer: Any, reported: Mapping[str, float]
) -> JobSummary:
    """Read the agent's finish answer: ``energy_j`` by domain and ``work_units``."""
    answer = answer if isinstance(answer, Mapping) else {}
    energy = answer.get("energy_j") if isinstance(answer.get("energy_j"), Mapping) else {}
    work = answer.get("work_units") if isinstance(answer.get("work_units"), Mapping) else dict(reported)
    sources = answer.get("sources") if isinstance(answer.get("sources"), Mapping) else {}
    return JobSummary(
        name=name,
        job_id=job_id,
        mode="agent",
        duration_s=duration_s,
        energy_j={str(k): float(v) for k, v in energy.items()},
        work_units={str(k): float(v) for k, v in work.items()},
        sources={str(k): str(v) for k, v in sources.items()},
        emissions_g=float(answer["emissions_g"]) if isinstance(answer.get("emissions_g"), (int, float)) else None,
    )


def report_work(unit: str, count: float, socket_path: str | os.PathLike[str] | None = None) -> bool:
    """From a command run under ``jouleward wrap``: add work to its job.

    Returns False (and does nothing) outside a wrapped job or without an agent.
    """
    job_id = os.environ.get(JOB_ID_ENV)
    if not job_id:
        return False
    try:
        ControlClient(socket_path).add_work(job_id, unit, count)
    except AgentUnavailable:
        return False
    return True
