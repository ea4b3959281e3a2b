"""Request and response bodies of the HTTP API (the OpenAPI schema)."""

from __future__ import annotations

import dataclasses
import typing
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import BaseModel, BeforeValidator, Field, create_model, field_validator

from agent.api.access import MAX_LABELS, ControlError, validate_job_name, validate_labels, validate_work
from agent.model import (
    CONTROL_CHAR_CLASS,
    JOB_NAME_MAX_LEN,
    LABEL_KEY_MAX_LEN,
    LABEL_VALUE_MAX_LEN,
    JobEfficiency,
    JobTotals,
    JobView,
)
from agent.model import PIDS_MAX as MAX_PIDS


def _delegate(check, *args: Any):
    """Run a framework-free validator from agent.api.access inside pydantic."""
    try:
        return check(*args)
    except ControlError as exc:
        raise ValueError(exc.message) from None


# The schema states what agent.api.access enforces, so that a client (or a
# fuzzer) can tell a valid request from the schema alone: the name is
# stripped of whitespace, then 1-128 characters with no control characters.
_CONTROL = CONTROL_CHAR_CLASS
_SPACE = r"\t\n\x0b\x0c\r\x1c-\x1f \x85\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
NAME_PATTERN = (
    f"^[{_SPACE}]*[^{_CONTROL}{_SPACE}]([^{_CONTROL}]{{0,{JOB_NAME_MAX_LEN - 2}}}[^{_CONTROL}{_SPACE}])?[{_SPACE}]*$"
)
LABELS_SCHEMA: dict[str, Any] = {
    "maxProperties": MAX_LABELS,
    "propertyNames": {"pattern": f"^[A-Za-z_][A-Za-z0-9_]{{0,{LABEL_KEY_MAX_LEN - 1}}}$"},
    "additionalProperties": {"type": "string", "maxLength": LABEL_VALUE_MAX_LEN, "pattern": f"^[^{_CONTROL}]*$"},
}


def _whole(value: Any) -> Any:
    """JSON has one number type: 4242.0 is the integer 4242 (strings stay refused)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


class JobRegistration(BaseModel):
    name: str = Field(
        description="Human name of the job: 1-128 characters, no control characters",
        json_schema_extra={"pattern": NAME_PATTERN},
    )
    pids: Annotated[
        list[Annotated[int, Field(strict=True, gt=0, lt=2**31), BeforeValidator(_whole)]],
        Field(min_length=1, max_length=MAX_PIDS),
    ] = Field(description="Root processes of the job (required); their descendants join it")
    labels: dict[str, str] = Field(
        default_factory=dict,
        max_length=MAX_LABELS,
        description="Extra metadata, exported on jouleward_job_info as label_<key>",
        json_schema_extra=LABELS_SCHEMA,
    )

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _delegate(validate_job_name, value)

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: dict[str, str]) -> dict[str, str]:
        return _delegate(validate_labels, value)


class WorkReport(BaseModel):
    unit: str = Field(
        description="samples, tokens, requests, or a name matching [a-z][a-z0-9_]{0,31}",
        json_schema_extra={"pattern": "^[a-z][a-z0-9_]{0,31}$"},
    )
    count: float = Field(ge=0, le=1e15, description="units of work done since the last report")

    @field_validator("unit")
    @classmethod
    def _unit(cls, value: str) -> str:
        return _delegate(validate_work, value, 0)[0]


class _JobIdentityOut(BaseModel):
    id: str
    name: str
    kind: str
    namespace: str
    labels: dict[str, str]
    running: bool
    power_w: dict[str, float]
    processes: int
    first_seen: float
    last_seen: float
    finished_at: float | None


# Every per-job figure of the one totals type, so the API cannot miss one,
# and the figures derived from them (``JobTotals.efficiency``), computed once
# in agent.model rather than here.
if TYPE_CHECKING:

    class JobOut(_JobIdentityOut):
        """One job: identity and state above, then every field of ``JobTotals``, then its efficiency."""

        efficiency: JobEfficiency
else:
    _TOTALS_HINTS = typing.get_type_hints(JobTotals)
    JobOut = create_model(
        "JobOut",
        __base__=_JobIdentityOut,
        **{f.name: (_TOTALS_HINTS[f.name], ...) for f in dataclasses.fields(JobTotals)},
        efficiency=(
            JobEfficiency,
            Field(description="per unit of work: J per token, request, sample; g per 1k tokens"),
        ),
    )


class ErrorOut(BaseModel):
    detail: str


def job_out(job: JobView) -> JobOut:
    ref, totals = job.ref, job.totals
    return JobOut(
        id=ref.id,
        name=ref.name,
        kind=ref.kind,
        namespace=ref.namespace,
        labels=dict(job.labels),
        running=job.finished_at is None,
        power_w=dict(job.power_w),
        processes=job.processes,
        first_seen=job.first_seen,
        last_seen=job.last_seen,
        finished_at=job.finished_at,
        **{f.name: getattr(totals, f.name) for f in dataclasses.fields(JobTotals)},
        efficiency=totals.efficiency,
    )
