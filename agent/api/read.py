"""HTTP API. Reads are served on the TCP listener; control endpoints
(register, finish) only on the Unix control socket. No arithmetic here."""

from __future__ import annotations

import re
import time
from typing import Annotated, Any
from urllib.parse import unquote

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.convertors import Convertor, register_url_convertor
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from agent.api.control import control_router
from agent.api.control import install_error_handler as install_control_error_handler
from agent.api.http_guard import RequestGuard
from agent.api.models import ErrorOut, JobOut, job_out
from agent.model import JobView
from agent.pipeline.daemon import Agent
from exporters import report
from exporters.prometheus import OPENMETRICS_CONTENT_TYPE, TEXT_CONTENT_TYPE, RenderCache


class JobIdConvertor(Convertor[str]):
    """A job id in a path: "/" allowed (Kubernetes jobs are k8s-<namespace>/<job>),
    but not ending in a sub-resource's name, so /finish, /work and /report
    stay their own routes (and a 405 lists only their methods)."""

    regex = r"(?:(?!/(?:finish|work|report)/?$).)+(?<!/)"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("jobid", JobIdConvertor())


class EncodedSlashes:
    """Routing on the decoded path would read k8s-ns%2Fwork as a /work
    request; keep an encoded slash apart (the handlers read the raw path)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        raw = scope.get("raw_path") if scope["type"] == "http" else None
        if raw and raw.startswith(b"/v1/jobs/") and b"%2f" in raw.lower():
            marked = re.sub(rb"%2[fF]", b"%00", raw.split(b"?", 1)[0])
            scope = {**scope, "path": unquote(marked.decode("latin-1"))}
        await self.app(scope, receive, send)


class DeviceOut(BaseModel):
    domain: str
    device: str
    source: str
    energy_j: float
    power_w: float


class SensorOut(BaseModel):
    sensor: str
    device: str
    up: bool
    reason: str


class CarbonOut(BaseModel):
    grams_per_kwh: float
    zone: str
    source: str
    pue: float
    emissions_g: float
    provider_errors: int


class NodeOut(BaseModel):
    timestamp: float
    cpu_utilization_ratio: float
    devices: list[DeviceOut]
    idle_j: dict[str, float]
    unattributed_j: dict[str, float]
    idle_power_w: dict[str, float]
    sensors: list[SensorOut]
    carbon: CarbonOut | None = None


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error.get("loc", ()) if p != "body")
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(message if message.startswith(f"{where}:") or not where else f"{where}: {message}")
    return "; ".join(parts) or "invalid request"


def _add_read_routes(app: FastAPI, agent: Agent) -> None:
    cache = RenderCache(lambda: agent.snapshot, node=agent.config.node, hostname=agent.config.hostname)

    @app.get(
        "/metrics",
        response_class=Response,
        responses={200: {"content": {TEXT_CONTENT_TYPE: {}, OPENMETRICS_CONTENT_TYPE: {}}}},
    )
    def metrics(request: Request) -> Response:
        body, content_type = cache.negotiate(request.headers.get("accept"))
        return Response(body, headers={"Content-Type": content_type})

    @app.get("/healthz", responses={503: {"model": ErrorOut}})
    def healthz() -> Any:
        """Liveness: fails once the sampler has not completed a tick for ``sampler_stall_s``."""
        since = agent.seconds_since_tick()
        limit = agent.config.sampler_stall_after_s
        if since is not None and since > limit:
            return JSONResponse(
                {"detail": f"sampler stalled: no tick for {since:.0f} s (sampler_stall_s {limit:g} s)"}, status_code=503
            )
        return {"status": "ok", "ticks": agent.ticks}

    @app.get("/readyz", responses={503: {"model": ErrorOut}})
    def readyz() -> Any:
        snap = agent.snapshot
        age = time.time() - snap.timestamp_unix
        ready = agent.ticks >= 2 and age < max(5 * agent.config.interval_s, 10.0)
        if not ready:
            return JSONResponse(
                {"detail": "no complete sample yet" if agent.ticks < 2 else f"last sample is {age:.0f} s old"},
                status_code=503,
            )
        return {"status": "ready", "ticks": agent.ticks}

    @app.get("/v1/node", response_model=NodeOut)
    def node() -> NodeOut:
        snap = agent.snapshot
        return NodeOut(
            timestamp=snap.timestamp_unix,
            cpu_utilization_ratio=snap.cpu_utilization_ratio,
            devices=[
                DeviceOut(domain=d.domain, device=d.device, source=d.source, energy_j=d.energy_j, power_w=d.power_w)
                for d in snap.devices
            ],
            idle_j=dict(snap.idle_j),
            unattributed_j=dict(snap.unattributed_j),
            idle_power_w=dict(snap.idle_power_w),
            sensors=[
                SensorOut(sensor=s.sensor, device=s.device, up=s.up, reason=s.reason) for s in snap.health.sensors
            ],
            carbon=CarbonOut(
                grams_per_kwh=snap.carbon.grams_per_kwh,
                zone=snap.carbon.zone,
                source=snap.carbon.source,
                pue=snap.carbon.pue,
                emissions_g=snap.carbon.node_emissions_g,
                provider_errors=snap.carbon.provider_errors,
            ),
        )

    @app.get("/v1/jobs", response_model=list[JobOut])
    def jobs(limit: Annotated[int, Field(ge=1, le=10000)] = 1000) -> list[JobOut]:
        return [job_out(record) for record in agent.ledger.all_jobs(limit)]

    def _target(request: Request) -> tuple[str, bool]:
        """The job id and whether its report is asked for. Kubernetes job ids
        hold ``/`` (``k8s-<namespace>/<job>``): read from the raw path, an
        encoded ``%2F`` is part of the id and only a literal ``/report`` ends it."""
        raw = request.scope.get("raw_path") or request.url.path.encode()
        tail = raw.split(b"?", 1)[0][len(b"/v1/jobs/") :]
        parts = tail.split(b"/")
        if len(parts) > 1 and parts[-1] == b"report":
            job_id = unquote(b"/".join(parts[:-1]).decode("latin-1"))
            whole = unquote(tail.decode("latin-1"))
            # "k8s-ns/report" unencoded: the job named report, unless a job "k8s-ns" exists.
            if agent.ledger.job(job_id) is None and agent.ledger.job(whole) is not None:
                return whole, False
            return job_id, True
        return unquote(tail.decode("latin-1")), False

    def _record(job_id: str) -> JobView:
        record = agent.ledger.job(job_id)
        if record is None:
            raise HTTPException(404, f"no job {job_id!r}")
        return record

    def _report(record: JobView, format: str) -> Response:
        if format not in report.FORMATS:
            raise HTTPException(400, f"format: expected one of {', '.join(report.FORMATS)}, got {format!r}")
        gpus = sum(1 for d in agent.snapshot.devices if d.domain == "gpu")
        site = report.site_from_config(agent.config.carbon, agent.config.procfs, gpus)
        row = report.report_row(
            report.job_emissions(job_out(record).model_dump(), site, agent.config.carbon.pue, time.time())
        )
        media = {"csv": "text/csv", "json": "application/json", "text": "text/plain"}[format]
        return Response(report.render([row], format), media_type=f"{media}; charset=utf-8")

    # Declared before the job route: both take ids with "/", this one ends in /report.
    @app.get("/v1/jobs/{job_id:jobid}/report", response_class=Response, responses={404: {"model": ErrorOut}})
    def job_report(
        job_id: str,
        request: Request,
        format: Annotated[str, Query(json_schema_extra={"enum": list(report.FORMATS)})] = "csv",
    ) -> Any:
        """The job in codecarbon's emissions.csv format (csv, json or text)."""
        target, is_report = _target(request)
        if not is_report:
            return JSONResponse(job_out(_record(target)).model_dump())
        return _report(_record(target), format)

    @app.get("/v1/jobs/{job_id:jobid}", response_model=JobOut, responses={404: {"model": ErrorOut}})
    def job(job_id: str, request: Request) -> JobOut:
        """One job; ids may hold "/" (Kubernetes jobs), encoded as %2F or not."""
        return job_out(_record(_target(request)[0]))


# Validation errors are one message string (see _validation_message), not
# FastAPI's default list, and a body that is not JSON is a 400: the schema
# must say so. A body over max_request_body_bytes is a 413, one that does not
# arrive within request_timeout_s a 408 (agent.api.http_guard).
_INVALID: dict[int | str, dict[str, Any]] = {code: {"model": ErrorOut} for code in (400, 408, 413, 422)}


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _validation_message(exc)}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 405:
            # Starlette lists only the first route's methods; a path served by
            # two routes (GET and POST /v1/jobs) must list both.
            methods = [
                method
                for method in ("DELETE", "GET", "PATCH", "POST", "PUT")
                if any(
                    route.matches({**request.scope, "method": method})[0] == Match.FULL for route in request.app.routes
                )
            ]
            return JSONResponse({"detail": exc.detail}, status_code=405, headers={"Allow": ", ".join(methods)})
        return await http_exception_handler(request, exc)


def create_read_app(agent: Agent, control_token: str | None = None) -> FastAPI:
    """The TCP listener: reads, plus the control endpoints only when the
    operator configured a token (callers must send it as a bearer token)."""
    app = FastAPI(title="jouleward", version="0.1.0", responses=_INVALID)
    _install_error_handlers(app)
    _add_read_routes(app, agent)
    # Authenticated before the body is read: an unauthenticated caller learns nothing of validation.
    app.add_middleware(EncodedSlashes)
    app.add_middleware(
        RequestGuard,
        max_body_bytes=agent.config.max_request_body_bytes,
        timeout_s=agent.config.request_timeout_s,
        bearer_token=control_token or None,
    )
    if control_token:
        install_control_error_handler(app)
        app.include_router(control_router(agent, tcp_token=control_token))
    return app


def create_control_app(agent: Agent) -> FastAPI:
    """Reads plus the control endpoints; served on the Unix socket only."""
    app = FastAPI(title="jouleward control", version="0.1.0", responses=_INVALID)
    _install_error_handlers(app)
    _add_read_routes(app, agent)
    app.add_middleware(EncodedSlashes)
    app.add_middleware(
        RequestGuard, max_body_bytes=agent.config.max_request_body_bytes, timeout_s=agent.config.request_timeout_s
    )

    # Register, finish and work units, with the caller's uid checked (agent.api.access).
    install_control_error_handler(app)
    app.include_router(control_router(agent))
    return app
