"""MIG instance activity from a dcgm-exporter on the node (optional).

NVML has no energy counter per MIG instance, and most drivers report no
utilisation for a MIG device either. DCGM's profiling field
``DCGM_FI_PROF_GR_ENGINE_ACTIVE`` is the graphics engine's active ratio per
GPU instance; where dcgm-exporter already runs, its ``/metrics`` carries it
labelled by the parent's ``UUID`` and the instance's ``GPU_I_ID``. A thread
reads it every ``poll_s`` (never the tick), keeps the last answer while the
exporter is down, and says so in its status: up, or down with the reason,
stale once the last good read is older than two polls.

A sensor without energy: ``sample`` returns nothing, ``status`` reports the
exporter's health as ``jouleward_sensor_up{sensor="dcgm"}``.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable

from prometheus_client.parser import text_string_to_metric_families

from agent.model import DeviceEnergy, SensorStatus, TickContext

log = logging.getLogger(__name__)
FIELD = "DCGM_FI_PROF_GR_ENGINE_ACTIVE"
MAX_BODY_BYTES = 16 * 1024 * 1024


class DcgmError(RuntimeError):
    """dcgm-exporter could not be read; the message says why."""


def parse_instance_activity(text: str) -> dict[tuple[str, int], float]:
    """(GPU UUID, GPU instance id) -> graphics engine active ratio, 0..1, from
    dcgm-exporter's exposition. Samples without ``GPU_I_ID`` (whole GPUs) are
    left out."""
    found: dict[tuple[str, int], float] = {}
    try:
        families = list(text_string_to_metric_families(text))
    except ValueError as exc:
        raise DcgmError(f"dcgm-exporter answered something that is not Prometheus text: {exc}") from None
    for family in families:
        if family.name != FIELD:
            continue
        for sample in family.samples:
            uuid, gi = sample.labels.get("UUID", ""), sample.labels.get("GPU_I_ID", "")
            value = sample.value
            if uuid and gi.isdigit() and math.isfinite(value):
                found[(uuid, int(gi))] = min(max(value, 0.0), 1.0)
    return found


def fetch_instance_activity(url: str, timeout_s: float) -> dict[tuple[str, int], float]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(urllib.request.Request(url, headers={"Accept": "text/plain"}), timeout=timeout_s) as response:
            body = response.read(MAX_BODY_BYTES + 1)
    except urllib.error.HTTPError as exc:
        raise DcgmError(f"dcgm-exporter answered HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise DcgmError(f"dcgm-exporter unreachable: {getattr(exc, 'reason', exc)}") from None
    if len(body) > MAX_BODY_BYTES:
        raise DcgmError("dcgm-exporter's /metrics is larger than the agent accepts")
    return parse_instance_activity(body.decode("utf-8", "replace"))


class DcgmActivitySensor:
    """The last MIG instance activity dcgm-exporter reported."""

    name = "dcgm"

    def __init__(
        self,
        url: str,
        poll_s: float = 10.0,
        timeout_s: float = 2.0,
        fetch: Callable[[str, float], dict[tuple[str, int], float]] = fetch_instance_activity,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.poll_s = poll_s
        self.timeout_s = timeout_s
        self._fetch = fetch
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._activity: dict[tuple[str, int], float] = {}
        self._reason = "not read yet"
        self._last_success: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def poll_once(self) -> bool:
        try:
            fresh = self._fetch(self.url, self.timeout_s)
        except DcgmError as exc:
            with self._lock:
                if str(exc) != self._reason:
                    log.warning("%s; keeping the last MIG instance activity", exc)
                self._reason = str(exc)
            return False
        with self._lock:
            self._activity, self._reason, self._last_success = fresh, "", self._monotonic()
        return True

    def activity(self) -> dict[tuple[str, int], float]:
        """The last answer; empty once it is older than two polls."""
        with self._lock:
            if self._last_success is None or self._monotonic() - self._last_success > 2 * self.poll_s + self.timeout_s:
                return {}
            return dict(self._activity)

    def sample(self, ctx: TickContext) -> list[DeviceEnergy]:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="jouleward-dcgm", daemon=True)
            self._thread.start()
        return []

    def status(self) -> list[SensorStatus]:
        with self._lock:
            return [SensorStatus(self.name, "dcgm-exporter", not self._reason, self._reason)]

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll_once()
            self._stop.wait(self.poll_s)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
