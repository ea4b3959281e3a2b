"""Slurm job name and user from a process environment.

The job id comes from the cgroup path (``agent.workloads.resolve``) and is
cluster-wide. The environment adds the name and user where the agent may read
it, and is trusted only when its ``SLURM_JOB_ID`` agrees with the cgroup, so a
stray variable inherited into another job cannot rename it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

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


# -- GPU allocation: dcgm-exporter's HPC job-mapping directory ----------------
# One file per GPU, named by its NVML index (``0``), by ``<index>.<GPU
# instance>`` for a MIG device, or by a MIG device's UUID; each holds the ids
# of the jobs on it, one per line (a second word on a line, such as a user id,
# is ignored). A prolog writes them, an epilog removes them (docs/gpu.md).
_JOB_ID = re.compile(r"[0-9]+")
_MAP_NAME = re.compile(r"[0-9]+(?:\.[0-9]+)?|MIG-[0-9A-Fa-f-]{36}|GPU-[0-9A-Fa-f-]{36}")
MAX_MAP_FILE_BYTES = 64 * 1024
MAX_MAP_FILES = 4096


def read_gpu_job_map(directory: Path) -> tuple[list[tuple[str, str]], int]:
    """(device id, Slurm job id) pairs from the mapping directory, and the
    number of files skipped as unreadable or unlike the convention. Raises
    OSError when the directory itself cannot be listed."""
    pairs: list[tuple[str, str]] = []
    skipped = 0
    for count, entry in enumerate(sorted(os.scandir(directory), key=lambda e: e.name)):
        if count >= MAX_MAP_FILES:
            break
        if not _MAP_NAME.fullmatch(entry.name) or not entry.is_file():
            skipped += 1
            continue
        try:
            with open(entry.path, "rb") as handle:
                text = handle.read(MAX_MAP_FILE_BYTES).decode("utf-8", "replace")
        except OSError:
            skipped += 1
            continue
        for line in text.splitlines():
            words = line.split()
            if words and _JOB_ID.fullmatch(words[0]):
                pairs.append((entry.name, words[0]))
    return pairs, skipped
