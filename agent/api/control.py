"""Control endpoints: register a job, finish it, report its work units.

Served on the Unix control socket (callers identified by SO_PEERCRED) and, only
when the operator configures a token, on a TCP listener that requires it.
Every decision about who may do what is in ``agent.api.access``.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse

from agent.api.access import (
    Caller,
    ControlError,
    authorize_job_change,
    authorize_register,
    bearer_ok,
    pids_as_seen_here,
)
from agent.api.models import ErrorOut, JobOut, JobRegistration, WorkReport, job_out
from agent.api.peercred import peer_of
from agent.ledger.schema import LedgerBusy
from agent.workloads.registry import AlreadyRegistered, RegistrationError, UnknownJob

ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorOut} for code in (400, 401, 403, 404, 409, 422, 503)}


def caller_of(request: Request, tcp_token: str | None) -> Caller:
    caller = peer_of(request.state)
    if caller is not None:
        return caller
    if tcp_token and bearer_ok(request.headers.get("authorization"), tcp_token):
        return Caller(uid=None, via="tcp")
    raise ControlError(401, "control requests need the Unix control socket or a valid bearer token")


def control_router(agent: Any, tcp_token: str | None = None) -> APIRouter:
    """``agent`` is ``agent.pipeline.daemon.Agent`` (register_job, finish_job, add_work, registered, ledger)."""
    router = APIRouter()
    procfs = agent.config.procfs

    @router.post("/v1/jobs", status_code=201, response_model=JobOut, responses=ERRORS)
    def register(body: JobRegistration, request: Request) -> JobOut:
        caller = caller_of(request, tcp_token)
        pids = pids_as_seen_here(caller, list(dict.fromkeys(body.pids)), scanned=procfs)
        for pid in pids:
            authorize_register(caller, pid, procfs)
        owner = caller.uid if caller.uid is not None else 0
        try:
            record = agent.register_job(body.name, pids, body.labels, owner_uid=owner)
        except AlreadyRegistered as exc:
            raise ControlError(409, str(exc)) from None
        except RegistrationError as exc:
            raise ControlError(404, str(exc)) from None
        return job_out(record)

    def _owned(caller: Caller, job_id: str) -> None:
        registration = agent.registered(job_id)
        if registration is None:
            raise ControlError(404, f"no registered job {job_id!r}")
        authorize_job_change(caller, registration.owner_uid)

    @router.post("/v1/jobs/{job_id}/finish", response_model=JobOut, responses=ERRORS)
    def finish(job_id: str, request: Request) -> JobOut:
        job_id = job_id.replace("\x00", "/")  # an encoded slash (agent.api.EncodedSlashes)
        _owned(caller_of(request, tcp_token), job_id)
        try:
            return job_out(agent.finish_job(job_id))
        except UnknownJob:
            raise ControlError(404, f"no registered job {job_id!r}") from None

    @router.post("/v1/jobs/{job_id}/work", response_model=JobOut, responses=ERRORS)
    def add_work(job_id: str, body: WorkReport, request: Request) -> JobOut:
        job_id = job_id.replace("\x00", "/")  # an encoded slash (agent.api.EncodedSlashes)
        _owned(caller_of(request, tcp_token), job_id)
        try:
            return job_out(agent.add_work(job_id, body.unit, body.count))
        except UnknownJob:
            raise ControlError(404, f"job {job_id!r} has ended and left memory; it takes no more work") from None

    return router


def install_error_handler(app: FastAPI) -> None:
    @app.exception_handler(ControlError)
    async def _control_error(_request: Request, exc: ControlError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse({"detail": exc.message}, status_code=exc.status, headers=headers)

    @app.exception_handler(LedgerBusy)
    async def _ledger_busy(_request: Request, exc: LedgerBusy) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": "1"})
