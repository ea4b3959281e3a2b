"""Providers of the grid carbon intensity in force at a given time.

Every provider answers ``at(unix_s)`` at once from memory: the daemon asks on
every tick, so nothing here may block it. The HTTP provider fetches on its own
thread and answers from its cache, or from its fallback while the cache is
empty or stale.
"""

from __future__ import annotations

import bisect
import csv
import json
import math
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, cast

from agent.carbon import tables

if TYPE_CHECKING:
    from agent.config import CarbonConfig

# Above any grid on record (lignite is about 1,100 g/kWh); a larger answer is garbage.
MAX_PLAUSIBLE_G_PER_KWH = 3000.0


@dataclass(frozen=True, slots=True)
class Intensity:
    grams_per_kwh: float
    zone: str
    source: str  # static, codecarbon, csv, http, fallback_static, fallback_codecarbon


class IntensityProvider(Protocol):
    def at(self, unix_s: float) -> Intensity: ...

    @property
    def errors_total(self) -> int: ...

    def close(self) -> None: ...


class IntensityDataError(ValueError):
    """An intensity file or answer cannot be used; the message says where."""


def _check_value(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise IntensityDataError(f"{where}: expected a number of gCO2eq/kWh, got {value!r}")
    number = float(value)
    if not math.isfinite(number) or not 0.0 <= number <= MAX_PLAUSIBLE_G_PER_KWH:
        raise IntensityDataError(f"{where}: {value!r} gCO2eq/kWh is outside 0..{MAX_PLAUSIBLE_G_PER_KWH:g}")
    return number


class StaticProvider:
    def __init__(self, grams_per_kwh: float, zone: str = "", source: str = "static") -> None:
        self._intensity = Intensity(_check_value(grams_per_kwh, "intensity"), zone, source)

    def at(self, unix_s: float) -> Intensity:
        return self._intensity

    @property
    def errors_total(self) -> int:
        return 0

    def close(self) -> None:
        pass


def table_provider(
    country: str = "", region: str = "", cloud_provider: str = "", cloud_region: str = ""
) -> StaticProvider:
    """A fixed value from codecarbon's tables. Raises tables.CarbonTableError."""
    zone = tables.lookup(country, region, cloud_provider, cloud_region)
    return StaticProvider(zone.grams_per_kwh, zone.zone, "codecarbon")


def parse_timestamp(text: str) -> float:
    """Unix seconds, or ISO 8601 (a time without an offset is UTC)."""
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


class CsvSeriesProvider:
    """A time series of (timestamp, gCO2eq/kWh); between points the last value holds.

    Before the first point the first value holds: an operator's series that
    starts a little late should not leave the agent without an intensity.
    """

    def __init__(self, path: Path, zone: str = "") -> None:
        self.path = Path(path)
        self.zone = zone
        self._times, self._values = self._load(self.path)

    @staticmethod
    def _load(path: Path) -> tuple[list[float], list[float]]:
        try:
            handle = open(path, encoding="utf-8-sig", newline="")
        except OSError as exc:
            raise IntensityDataError(f"{path}: cannot read: {exc.strerror}") from None
        points: list[tuple[float, float]] = []
        with handle:
            for line_no, row in enumerate(csv.reader(handle), start=1):
                if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
                    continue
                if len(row) < 2:
                    raise IntensityDataError(f"{path}:{line_no}: expected timestamp,gCO2eq/kWh, got {','.join(row)!r}")
                try:
                    when = parse_timestamp(row[0])
                except ValueError:
                    if not points and line_no == 1:
                        continue  # a header line
                    raise IntensityDataError(f"{path}:{line_no}: bad timestamp {row[0]!r}") from None
                try:
                    value = float(row[1])
                except ValueError:
                    raise IntensityDataError(f"{path}:{line_no}: bad intensity {row[1]!r}") from None
                points.append((when, _check_value(value, f"{path}:{line_no}")))
        if not points:
            raise IntensityDataError(f"{path}: no data points (expected lines of timestamp,gCO2eq/kWh)")
        points.sort()
        return [p[0] for p in points], [p[1] for p in points]

    def at(self, unix_s: float) -> Intensity:
        index = max(bisect.bisect_right(self._times, unix_s) - 1, 0)
        return Intensity(self._values[index], self.zone, "csv")

    @property
    def errors_total(self) -> int:
        return 0

    def close(self) -> None:
        pass


def parse_answer(body: bytes) -> float:
    """gCO2eq/kWh from an Electricity Maps ``carbon-intensity/latest`` answer."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise IntensityDataError("answer is not JSON") from None
    if not isinstance(data, dict) or "carbonIntensity" not in data:
        raise IntensityDataError("answer has no carbonIntensity")
    return _check_value(data["carbonIntensity"], "carbonIntensity")


class HttpProvider:
    """An Electricity Maps compatible API, polled off the hot path, with a fallback.

    The fallback answers (with its source prefixed ``fallback_``) until the
    first good answer, and again once the last good answer is older than
    ``max_age_s``. ``errors_total`` counts failed polls.
    """

    def __init__(
        self,
        url: str,
        zone: str,
        fallback: StaticProvider,
        token: str = "",
        timeout_s: float = 5.0,
        poll_s: float = 300.0,
        max_age_s: float | None = None,
    ) -> None:
        self.zone = zone
        self._url = self._endpoint(url, zone)
        self._token = token
        self._timeout_s = timeout_s
        self._poll_s = poll_s
        self._max_age_s = max_age_s if max_age_s is not None else 3 * poll_s
        self._fallback = fallback
        self._lock = threading.Lock()
        self._value: float | None = None
        self._fetched_monotonic = 0.0
        self._errors = 0
        self.last_error = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="carbon-intensity-poll", daemon=True)
        self._thread.start()

    @staticmethod
    def _endpoint(url: str, zone: str) -> str:
        base = url.rstrip("/")
        if not base.endswith("/carbon-intensity/latest"):
            base += "/v3/carbon-intensity/latest"
        return f"{base}?{urllib.parse.urlencode({'zone': zone})}"

    def _fetch(self) -> float:
        request = urllib.request.Request(self._url, headers={"auth-token": self._token, "Accept": "application/json"})
        with urllib.request.urlopen(request, timeout=self._timeout_s) as response:
            return parse_answer(response.read(1 << 20))

    def poll_once(self) -> None:
        try:
            value = self._fetch()
        except Exception as exc:  # the poller must outlive any answer, however broken
            with self._lock:
                self._errors += 1
                self.last_error = str(exc) or type(exc).__name__
            return
        with self._lock:
            self._value = value
            self._fetched_monotonic = time.monotonic()
            self.last_error = ""

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll_once()
            self._stop.wait(self._poll_s)

    def at(self, unix_s: float) -> Intensity:
        with self._lock:
            value, fetched = self._value, self._fetched_monotonic
        if value is not None and time.monotonic() - fetched <= self._max_age_s:
            return Intensity(value, self.zone, "http")
        fallback = self._fallback.at(unix_s)
        return Intensity(fallback.grams_per_kwh, fallback.zone or self.zone, f"fallback_{fallback.source}")

    @property
    def errors_total(self) -> int:
        with self._lock:
            return self._errors

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self._timeout_s + 1.0)


def _fallback(carbon: CarbonConfig) -> StaticProvider:
    if carbon.intensity_g_per_kwh is not None:
        return StaticProvider(carbon.intensity_g_per_kwh, carbon.zone, "static")
    if carbon.country or carbon.cloud_provider:
        return table_provider(carbon.country, carbon.region, carbon.cloud_provider, carbon.cloud_region)
    return StaticProvider(tables.world_average(), "world", "codecarbon")


def from_config(carbon: CarbonConfig) -> IntensityProvider:
    """The provider the ``[carbon]`` table asks for. Raises ConfigError naming the key."""
    from agent.config import ConfigError

    try:
        if carbon.provider == "static":
            # The config requires the value for this provider (ConfigError otherwise).
            return StaticProvider(cast(float, carbon.intensity_g_per_kwh), carbon.zone or carbon.country, "static")
        if carbon.provider == "csv":
            return CsvSeriesProvider(cast(Path, carbon.csv_path), carbon.zone or carbon.country)
        if carbon.provider == "http":
            return HttpProvider(
                carbon.url, carbon.zone, _fallback(carbon), carbon.token, carbon.timeout_s, carbon.poll_s
            )
        return _fallback(carbon)
    except tables.CarbonTableError as exc:
        raise ConfigError(f"carbon: {exc}") from None
    except IntensityDataError as exc:
        raise ConfigError(f"carbon.csv_path: {exc}") from None
