"""Control endpoints: register a job, finish it, report its work units.

Served on the Unix control socket (callers identified by SO_PEERCRED) and, only
when the operator configures a token, on a TCP listener that requires it.
Every decision about who may do what is in ``agent.control``.
"""
from __future__ import annotations

import threading
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse

from agent.control import Caller, ControlError, authorize_job_change, authorize_register, bearer_ok, \
    validate_job_name, validate_labels, validate_work
from agent.peercred_http import peer_of
from agent.workloads.registry import RegistrationError, UnknownJob

MAX_PIDS = 64


class WorkUnits:
    """Work done per job and unit, as reported; only ever grows."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, dict[str, float]] = {}

    def add(self, job_id: str, unit: str, count: float) -> dict[str, float]:
        with self._lock:
            units = self._counts.setdefault(job_id, {})
            units[unit] = units.get(unit, 0.0) + count
            return dict(units)

    def of(self, job_id: str) -> dict[str, float]:
        with self._lock:
            return dict(self._counts.get(job_id, {}))

    def all(self) -> dict[str, dict[str, float]]:
        with self._lock:
            return {job: dict(units) for job, units in self._counts.items()}

    def drop(self, job_id: str) -> None:
        with self._lock:
            self._counts.pop(job_id, None)


def caller_of(request: Request, tcp_token: str | None) -> Caller:
    caller = peer_of(request.state)
    if caller is not None:
        return caller
    if tcp_token and bearer_ok(request.headers.get("authorization"), tcp_token):
        return Caller(uid=None, via="tcp")
    raise ControlError(401, "control requests need the Unix control socket or a valid bearer token")


async def _json_object(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except Exception:
        raise ControlError(400, "body: expected a JSON object") from None
    if not isinstance(body, dict):
        raise ControlError(400, "body: expected a JSON object")
    return body


def _job_answer(agent: Any, work: WorkUnits, job_id: str) -> dict[str, Any]:
    record = agent.ledger.job(job_id)
    registration = agent.registered(job_id)
    ref = record.ref if record is not None else registration.ref
    return {
        "id": ref.id,
        "name": ref.name,
        "kind": ref.kind,
        "labels": dict(registration.labels) if registration else {},
        "energy_j": dict(record.energy_j) if record else {},
        "cpu_s": record.cpu_s if record else 0.0,
        "work_units": work.of(job_id),
        "finished": bool(registration and registration.finished_at is not None),
    }


def control_router(agent: Any, work: WorkUnits, tcp_token: str | None = None) -> APIRouter:
    """``agent`` is ``agent.daemon.Agent`` (register_job, finish_job, registered, ledger)."""
    router = APIRouter()
    procfs = agent.config.procfs

    @router.post("/v1/jobs", status_code=201)
    async def register(request: Request) -> dict[str, Any]:
        caller = caller_of(request, tcp_token)
        body = await _json_object(request)
        name = validate_job_name(body.get("name"))
        labels = validate_labels(body.get("labels"))
        pids = body.get("pids", [caller.pid] if caller.pid else None)
        if not isinstance(pids, list) or not pids or len(pids) > MAX_PIDS:
            raise ControlError(422, f"pids: expected a list of 1..{MAX_PIDS} process ids")
        for pid in pids:
            authorize_register(caller, pid, procfs)
        owner = caller.uid if caller.uid is not None else 0
        try:
            record = agent.register_job(name, pids, labels, owner_uid=owner)
        except RegistrationError as exc:
            raise ControlError(404, str(exc)) from None
        return _job_answer(agent, work, record.ref.id)

    def _owned(caller: Caller, job_id: str) -> None:
        registration = agent.registered(job_id)
        if registration is None:
            raise ControlError(404, f"no registered job {job_id!r}")
        authorize_job_change(caller, registration.owner_uid)

    @router.post("/v1/jobs/{job_id}/finish")
    async def finish(job_id: str, request: Request) -> dict[str, Any]:
        caller = caller_of(request, tcp_token)
        _owned(caller, job_id)
        try:
            agent.finish_job(job_id)
        except UnknownJob:
            raise ControlError(404, f"no registered job {job_id!r}") from None
        return _job_answer(agent, work, job_id)

    @router.post("/v1/jobs/{job_id}/work")
    async def add_work(job_id: str, request: Request) -> dict[str, Any]:
        caller = caller_of(request, tcp_token)
        _owned(caller, job_id)
        body = await _json_object(request)
        unit, count = validate_work(body.get("unit"), body.get("count"))
        return {"id": job_id, "work_units": work.add(job_id, unit, count)}

    return router


def install_error_handler(app: FastAPI) -> None:
    @app.exception_handler(ControlError)
    async def _control_error(_request: Request, exc: ControlError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse({"detail": exc.message}, status_code=exc.status, headers=headers)


def control_app(agent: Any, work: WorkUnits, tcp_token: str | None = None) -> FastAPI:
    app = FastAPI(title="jouleward control", docs_url=None, redoc_url=None, openapi_url=None)
    install_error_handler(app)
    app.include_router(control_router(agent, work, tcp_token))
    return app
