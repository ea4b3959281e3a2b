"""Request and response bodies of the HTTP API (the OpenAPI schema)."""
from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, Field, field_validator

from agent.api.access import MAX_LABELS, ControlError, validate_job_name, validate_labels, validate_work
from agent.ledger.totals import JobRecord

MAX_PIDS = 64


def _delegate(check, *args: Any):
    """Run a framework-free validator from agent.api.access inside pydantic."""
    try:
        return check(*args)
    except ControlError as exc:
        raise ValueError(exc.message) from None


# The schema states what agent.api.access enforces, so that a client (or a
# fuzzer) can tell a valid request from the schema alone: the name is
# stripped of whitespace, then 1-128 characters with no control characters.
_CONTROL = r"\x00-\x1f\x7f-\x9f"
_SPACE = r"\t\n\x0b\x0c\r\x1c-\x1f \x85\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
NAME_PATTERN = f"^[{_SPACE}]*[^{_CONTROL}{_SPACE}]([^{_CONTROL}]{{0,126}}[^{_CONTROL}{_SPACE}])?[{_SPACE}]*$"
LABELS_SCHEMA = {"maxProperties": MAX_LABELS, "propertyNames": {"pattern": "^[A-Za-z_][A-Za-z0-9_]{0,62}$"},
                 "additionalProperties": {"type": "string", "maxLength": 256, "pattern": f"^[^{_CONTROL}]*$"}}


def _whole(value: Any) -> Any:
    """JSON has one number type: 4242.0 is the integer 4242 (strings stay refused)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


class JobRegistration(BaseModel):
    name: str = Field(description="Human name of the job: 1-128 characters, no control characters",
                      json_schema_extra={"pattern": NAME_PATTERN})
    pids: Annotated[list[Annotated[int, Field(strict=True, gt=0, lt=2**31), BeforeValidator(_whole)]],
                    Field(min_length=1, max_length=MAX_PIDS)] \
        = Field(description="Root processes of the job (required); their descendants join it")
    labels: dict[str, str] = Field(default_factory=dict, max_length=MAX_LABELS,
                                   description="Extra metadata, exported on jouleward_job_info as label_<key>",
                                   json_schema_extra=LABELS_SCHEMA)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _delegate(validate_job_name, value)

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: dict[str, str]) -> dict[str, str]:
        return _delegate(validate_labels, value)


class WorkReport(BaseModel):
    unit: str = Field(description="samples, tokens, requests, or a name matching [a-z][a-z0-9_]{0,31}",
                      json_schema_extra={"pattern": "^[a-z][a-z0-9_]{0,31}$"})
    count: float = Field(ge=0, le=1e15, description="units of work done since the last report")

    @field_validator("unit")
    @classmethod
    def _unit(cls, value: str) -> str:
        return _delegate(validate_work, value, 0)[0]


class JobOut(BaseModel):
    id: str
    name: str
    kind: str
    namespace: str
    labels: dict[str, str]
    running: bool
    energy_j: dict[str, float]
    power_w: dict[str, float]
    cpu_s: float
    processes: int
    work_units: dict[str, float]
    first_seen: float
    last_seen: float
    finished_at: float | None
    emissions_g: float = 0.0  # gCO2eq, PUE included
    gpu_idle_j: float = 0.0  # allocated-but-idle GPU energy, part of energy_j["gpu"]


class ErrorOut(BaseModel):
    detail: str


def job_out(record: JobRecord) -> JobOut:
    return JobOut(
        id=record.ref.id, name=record.ref.name, kind=record.ref.kind, namespace=record.ref.namespace,
        labels=dict(record.labels), running=record.finished_at is None, energy_j=dict(record.energy_j),
        power_w=dict(record.power_w), cpu_s=record.cpu_s, processes=record.processes,
        work_units=dict(record.work_units), first_seen=record.first_seen, last_seen=record.last_seen,
        finished_at=record.finished_at, emissions_g=record.emissions_g, gpu_idle_j=record.gpu_idle_j,
    )
