"""Slurm job name and user from a process environment.

The job id comes from the cgroup path (``agent.workloads.resolve``) and is
cluster-wide. The environment adds the name and user where the agent may read
it, and is trusted only when its ``SLURM_JOB_ID`` agrees with the cgroup, so a
stray variable inherited into another job cannot rename it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from agent.model import EXTERNAL_CONTROL_CHAR_CLASS, EXTERNAL_NAME_MAX_LEN

_CONTROL = re.compile(f"[{EXTERNAL_CONTROL_CHAR_CLASS}]")
MAX_VALUE_LEN = EXTERNAL_NAME_MAX_LEN


@dataclass(frozen=True, slots=True)
class SlurmIdentity:
    job_id: str
    name: str  # SLURM_JOB_NAME, or the job id when unreadable
    user: str  # SLURM_JOB_USER, or "" when unreadable


def _clean(value: str | None) -> str:
    if not value or len(value) > MAX_VALUE_LEN or _CONTROL.search(value):
        return ""
    return value.strip()


def identity_from_environ(job_id: str, environ: Mapping[str, str]) -> SlurmIdentity:
    if environ.get("SLURM_JOB_ID", "").strip() != job_id:
        return SlurmIdentity(job_id, job_id, "")
    return SlurmIdentity(job_id, _clean(environ.get("SLURM_JOB_NAME")) or job_id, _clean(environ.get("SLURM_JOB_USER")))
