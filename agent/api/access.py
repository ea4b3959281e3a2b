"""Who may change what through the control API, and what a valid request is.

The control endpoints (register, finish, work units) are served on a Unix
socket; the kernel tells us the caller's uid (SO_PEERCRED), so no secret is
needed there. A caller may register only processes its own uid owns and may
touch only jobs it registered; root may do anything. A TCP control listener
exists only with an operator-configured token and its callers act as root.
Framework-free: the API maps ``ControlError.status`` to the HTTP answer.
"""

from __future__ import annotations

import hmac
import math
import re
import socket
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.errors import JoulewardError
from agent.model import CONTROL_CHAR_CLASS
from agent.model import JOB_NAME_MAX_LEN as MAX_JOB_NAME_LEN
from agent.model import LABEL_KEY_MAX_LEN as MAX_LABEL_KEY_LEN
from agent.model import LABEL_VALUE_MAX_LEN as MAX_LABEL_VALUE_LEN
from agent.model import LABELS_MAX as MAX_LABELS
from agent.model import WORK_COUNT_MAX as MAX_WORK_COUNT

WELL_KNOWN_UNITS = ("samples", "tokens", "requests")

_CONTROL_CHARS = re.compile(f"[{CONTROL_CHAR_CLASS}]")
# Label keys become Prometheus label names (``label_<key>``), so they keep to
# that charset.
_LABEL_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_UNIT = re.compile(r"[a-z][a-z0-9_]{0,31}")


class ControlError(JoulewardError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class Caller:
    """The party behind one control request."""

    uid: int | None  # None for a token-authenticated TCP caller
    pid: int | None = None
    via: str = "unix"  # unix, tcp

    @property
    def privileged(self) -> bool:
        return self.uid == 0 or self.via == "tcp"


def peer_credentials(sock: socket.socket) -> Caller | None:
    """The connecting process of a Unix stream socket, from SO_PEERCRED."""
    if sock.family != socket.AF_UNIX:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    pid, uid, _gid = struct.unpack("3i", raw)
    return Caller(uid=uid, pid=pid, via="unix")


def bearer_ok(authorization: str | None, token: str) -> bool:
    if not token or not authorization:
        return False
    scheme, _, presented = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(presented.strip().encode(), token.encode())


def validate_job_name(value: Any) -> str:
    if not isinstance(value, str):
        raise ControlError(422, "name: expected a string")
    name = value.strip()
    if not name:
        raise ControlError(422, "name: must not be empty")
    if len(name) > MAX_JOB_NAME_LEN:
        raise ControlError(422, f"name: longer than {MAX_JOB_NAME_LEN} characters")
    if _CONTROL_CHARS.search(name):
        raise ControlError(422, "name: control characters are not allowed")
    return name


def validate_labels(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ControlError(422, "labels: expected an object of key: value strings")
    if len(value) > MAX_LABELS:
        raise ControlError(422, f"labels: at most {MAX_LABELS} labels")
    out = {}
    for key, val in value.items():
        if not isinstance(key, str) or not _LABEL_KEY.fullmatch(key) or len(key) > MAX_LABEL_KEY_LEN:
            raise ControlError(
                422, f"labels: key {key!r} must match [A-Za-z_][A-Za-z0-9_]* and be at most {MAX_LABEL_KEY_LEN} long"
            )
        if not isinstance(val, str):
            raise ControlError(422, f"labels.{key}: expected a string")
        if len(val) > MAX_LABEL_VALUE_LEN:
            raise ControlError(422, f"labels.{key}: longer than {MAX_LABEL_VALUE_LEN} characters")
        if _CONTROL_CHARS.search(val):
            raise ControlError(422, f"labels.{key}: control characters are not allowed")
        out[key] = val
    return out


def validate_work(unit: Any, count: Any) -> tuple[str, float]:
    if not isinstance(unit, str) or not _UNIT.fullmatch(unit):
        raise ControlError(422, "unit: expected samples, tokens, requests or a name matching [a-z][a-z0-9_]{0,31}")
    if isinstance(count, bool) or not isinstance(count, (int, float)):
        raise ControlError(422, "count: expected a number")
    if not math.isfinite(count) or count < 0 or count > MAX_WORK_COUNT:
        raise ControlError(422, f"count: expected a finite number between 0 and {MAX_WORK_COUNT:g}")
    return unit, float(count)


def process_uids(pid: int, procfs: Path = Path("/proc")) -> tuple[int, int]:
    """Real and effective uid of a live process; ControlError 404 if gone."""
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        raise ControlError(422, "pid: expected a positive integer")
    try:
        text = (procfs / str(pid) / "status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        raise ControlError(404, f"pid {pid}: no such process") from None
    except OSError as exc:
        raise ControlError(404, f"pid {pid}: cannot read its status: {exc.strerror}") from None
    uids = None
    for line in text.splitlines():
        if line.startswith("Tgid:") and int(line.split()[1]) != pid:
            raise ControlError(
                400, f"pid {pid}: a thread of process {line.split()[1]}, not a process; register the process"
            )
        if line.startswith("Uid:"):
            fields = line.split()
            uids = int(fields[1]), int(fields[2])
    if uids is None:
        raise ControlError(404, f"pid {pid}: no Uid line in its status")
    return uids


def namespace_pids(pid: int | str, procfs: Path = Path("/proc")) -> tuple[int, ...] | None:
    """A process's pid in each pid namespace it is in, ours first (the
    ``NSpid`` line of its status, world-readable, unlike ``ns/pid``); None
    where the kernel does not say."""
    try:
        text = (procfs / str(pid) / "status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("NSpid:"):
            return tuple(int(field) for field in line.split()[1:])
    return None


def nested_under(scanned: Path, procfs: Path = Path("/proc")) -> bool:
    """Whether the agent runs in a pid namespace below the one whose procfs it
    scans (a pod that mounts the host's /proc without ``hostPID``): the scanned
    procfs then names the agent by more pids than its own /proc does."""
    if scanned == procfs:
        return False
    seen_there, seen_here = namespace_pids("self", scanned), namespace_pids("self", procfs)
    return seen_there is not None and seen_here is not None and len(seen_there) > len(seen_here)


def pids_as_seen_here(
    caller: Caller, pids: list[int], procfs: Path = Path("/proc"), scanned: Path | None = None
) -> list[int]:
    """The pids a caller names, in the agent's pid namespace.

    A caller in a nested pid namespace (a container without the host's pid
    namespace) knows only its own namespace's pids; the kernel gives us its
    pid in ours (SO_PEERCRED). Such a caller may register itself, under the
    pid it knows itself by, and nothing else: any other number of its names
    a different process here.

    Where the agent itself is nested below the procfs it scans (``scanned``),
    pids are numbers of that procfs, and a caller the kernel cannot show us
    (SO_PEERCRED pid 0) is taken to speak them: its uid is still checked
    against each process's owner there.
    """
    if caller.via != "unix" or caller.pid is None:
        return pids
    if caller.pid == 0 and scanned is not None and nested_under(scanned, procfs):
        return pids
    if caller.pid == 0:
        raise ControlError(400, "pids: the caller's process is not visible in the agent's pid namespace")
    theirs, ours = namespace_pids(caller.pid, procfs), namespace_pids("self", procfs)
    if theirs is None or ours is None or len(theirs) <= len(ours):
        return pids
    own = theirs[-1]  # the caller's pid in its own namespace
    for pid in pids:
        if pid != own:
            raise ControlError(
                400,
                f"pids: the caller is in another pid namespace, where it is pid {own}; "
                f"pid {pid} there is not pid {pid} here, so it may register only itself",
            )
    return [caller.pid]


def authorize_register(caller: Caller, pid: int, procfs: Path = Path("/proc")) -> None:
    """A caller may register only processes its own uid runs as (real and effective)."""
    real, effective = process_uids(pid, procfs)
    if caller.privileged:
        return
    if real != caller.uid or effective != caller.uid:
        raise ControlError(403, f"pid {pid}: not owned by uid {caller.uid}")


def authorize_job_change(caller: Caller, owner_uid: int | None) -> None:
    """Finish or update: only the uid that registered the job, or root."""
    if caller.privileged:
        return
    if owner_uid is None or owner_uid != caller.uid:
        raise ControlError(403, f"job was not registered by uid {caller.uid}")
