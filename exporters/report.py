"""Per-job reports in codecarbon's ``emissions.csv`` format, as CSV, JSON or text.

A codecarbon user's notebooks read ``emissions.csv`` by column name and unit,
so the columns, their order and their units are codecarbon's: durations in
seconds, energy in kWh, power in W, emissions in kg, ``emissions_rate`` in
kg/s, ``ram_total_size`` in GB. As codecarbon does, energy and power include
the PUE, so ``energy_consumed`` x intensity gives ``emissions``. A column that
does not apply to a job is left empty, never filled with an invented value.

After codecarbon's columns come ours (``EFFICIENCY_COLUMNS``): the job's work
and its energy per unit of work (``agent.model.efficiency``: IT energy
without the PUE, as the API and the recording rules give it) and gCO2eq per
1,000 tokens. A file that has only codecarbon's columns keeps having only
those when rows are appended to it.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from agent.carbon.emissions import J_PER_KWH
from agent.model import REQUEST_UNIT, SAMPLE_UNIT, JobTotals, efficiency

# codecarbon's EmissionsData fields, in its order (output_methods/emissions_data.py).
EMISSIONS_CSV_COLUMNS = (
    "timestamp",
    "project_name",
    "run_id",
    "experiment_id",
    "duration",
    "emissions",
    "emissions_rate",
    "cpu_power",
    "gpu_power",
    "ram_power",
    "cpu_energy",
    "gpu_energy",
    "ram_energy",
    "energy_consumed",
    "water_consumed",
    "country_name",
    "country_iso_code",
    "region",
    "cloud_provider",
    "cloud_region",
    "os",
    "python_version",
    "codecarbon_version",
    "cpu_count",
    "cpu_model",
    "gpu_count",
    "gpu_model",
    "longitude",
    "latitude",
    "ram_total_size",
    "tracking_mode",
    "cpu_utilization_percent",
    "gpu_utilization_percent",
    "ram_utilization_percent",
    "ram_used_gb",
    "on_cloud",
    "pue",
    "wue",
)

# Ours, beside codecarbon's: empty where the job reported no such work.
EFFICIENCY_COLUMNS = (
    "tokens",
    "token_unit",
    "requests",
    "samples",
    "energy_per_token_j",
    "energy_per_request_j",
    "energy_per_sample_j",
    "emissions_per_1k_tokens_g",
)
REPORT_COLUMNS = EMISSIONS_CSV_COLUMNS + EFFICIENCY_COLUMNS

# codecarbon's hardware names for our attributed domains.
_DOMAIN_COLUMN = {"cpu": "cpu", "dram": "ram", "gpu": "gpu"}


class ReportError(ValueError):
    """A report cannot be written; the message says why."""


@dataclass(frozen=True, slots=True)
class Site:
    """Where and on what the jobs ran: the report's location and hardware columns."""

    country_iso_code: str = ""
    country_name: str = ""
    region: str = ""
    cloud_provider: str = ""
    cloud_region: str = ""
    os: str = ""
    python_version: str = ""
    cpu_model: str = ""
    cpu_count: int | None = None
    gpu_model: str = ""
    gpu_count: int | None = None
    ram_total_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class JobEmissions:
    """What the agent knows about one job, in its own units."""

    job_id: str
    job_name: str
    duration_s: float
    energy_j: Mapping[str, float]  # IT energy by domain: cpu, dram, gpu
    emissions_g: float  # already includes the PUE
    pue: float = 1.0
    end_unix_s: float | None = None  # None: still running, report as of now
    site: Site = Site()
    work_units: Mapping[str, float] = field(default_factory=dict)  # by unit: tokens, samples, ...
    extra: Mapping[str, Any] = field(default_factory=dict)
    gpu_idle_j: float = 0.0  # allocated-but-idle GPU energy, part of energy_j["gpu"]


def report_row(job: JobEmissions) -> dict[str, Any]:
    """One ``emissions.csv`` row, keyed by codecarbon's column names and ours; None = empty."""
    kwh = {column: job.energy_j.get(domain, 0.0) * job.pue / J_PER_KWH for domain, column in _DOMAIN_COLUMN.items()}
    duration = job.duration_s
    emissions_kg = job.emissions_g / 1000.0
    when = datetime.fromtimestamp(job.end_unix_s) if job.end_unix_s is not None else datetime.now()
    site = job.site
    row: dict[str, Any] = dict.fromkeys(REPORT_COLUMNS)
    row.update(
        timestamp=when.strftime("%Y-%m-%dT%H:%M:%S"),
        project_name=job.job_name,
        run_id=job.job_id,
        duration=duration,
        emissions=emissions_kg,
        emissions_rate=emissions_kg / duration if duration > 0 else 0.0,
        energy_consumed=sum(kwh.values()),
        country_name=site.country_name or None,
        country_iso_code=site.country_iso_code or None,
        region=site.region or None,
        cloud_provider=site.cloud_provider or None,
        cloud_region=site.cloud_region or None,
        os=site.os or None,
        python_version=site.python_version or None,
        cpu_count=site.cpu_count,
        cpu_model=site.cpu_model or None,
        gpu_count=site.gpu_count,
        gpu_model=site.gpu_model or None,
        ram_total_size=site.ram_total_bytes / 1e9 if site.ram_total_bytes is not None else None,
        # Energy is attributed to the job's processes, which is codecarbon's "process" mode.
        tracking_mode="process",
        on_cloud="Y" if site.cloud_provider else "N",
        pue=job.pue,
    )
    for column, energy_kwh in kwh.items():
        row[f"{column}_energy"] = energy_kwh
        row[f"{column}_power"] = energy_kwh * J_PER_KWH / duration if duration > 0 else 0.0
    work = dict(job.work_units)
    figures = efficiency(JobTotals(energy_j=dict(job.energy_j), work_units=work, emissions_g=job.emissions_g))
    row.update(
        tokens=work[figures.token_unit] if figures.token_unit else None,
        token_unit=figures.token_unit,
        requests=work.get(REQUEST_UNIT),
        samples=work.get(SAMPLE_UNIT),
        energy_per_token_j=figures.energy_per_token_j,
        energy_per_request_j=figures.energy_per_request_j,
        energy_per_sample_j=figures.energy_per_sample_j,
        emissions_per_1k_tokens_g=figures.emissions_per_1k_tokens_g,
    )
    # Not a codecarbon column: the text report shows it, CSV and JSON keep codecarbon's set.
    row["gpu_idle_energy"] = job.gpu_idle_j * job.pue / J_PER_KWH
    return row


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)


def to_csv(rows: Iterable[Mapping[str, Any]], header: bool = True) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    if header:
        writer.writerow(REPORT_COLUMNS)
    for row in rows:
        writer.writerow([_cell(row.get(column)) for column in REPORT_COLUMNS])
    return out.getvalue()


def to_json(rows: Iterable[Mapping[str, Any]]) -> str:
    return json.dumps([{column: row.get(column) for column in REPORT_COLUMNS} for row in rows], indent=2)


def to_text(row: Mapping[str, Any]) -> str:
    lines = [
        f"job         {row['project_name']} ({row['run_id']})",
        f"duration    {row['duration']:.1f} s",
        f"energy      {row['energy_consumed']:.6f} kWh  (cpu {row['cpu_energy']:.6f}, gpu {row['gpu_energy']:.6f}, ram {row['ram_energy']:.6f})",
        f"power       cpu {row['cpu_power']:.1f} W, gpu {row['gpu_power']:.1f} W, ram {row['ram_power']:.1f} W (averages)",
        f"emissions   {row['emissions'] * 1000.0:.3f} gCO2eq  ({row['emissions']:.6g} kg)",
        f"pue         {row['pue']:g}",
    ]
    if row.get("token_unit"):
        lines.append(
            f"tokens      {row['tokens']:g} {row['token_unit']}: {row['energy_per_token_j']:.6g} J/token, "
            f"{row['emissions_per_1k_tokens_g']:.6g} gCO2eq per 1,000 tokens"
        )
    for unit, column in (("requests", "energy_per_request_j"), ("samples", "energy_per_sample_j")):
        if row.get(column) is not None:
            lines.append(f"{unit:<12}{row[unit]:g}: {row[column]:.6g} J/{unit[:-1]}")
    idle = row.get("gpu_idle_energy") or 0.0
    if idle > 0 and row["gpu_energy"] > 0:
        share = 100.0 * idle / row["gpu_energy"]
        lines.insert(3, f"gpu idle    {idle:.6f} kWh on GPUs allocated to the job but idle ({share:.1f} % of gpu)")
    where = " / ".join(str(row[k]) for k in ("country_name", "region", "cloud_provider", "cloud_region") if row.get(k))
    if where:
        lines.append(f"zone        {where}")
    return "\n".join(lines) + "\n"


def append_csv(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """Append rows to an ``emissions.csv``, writing the header only into a new or empty file.

    An existing file whose header is neither codecarbon's column set nor ours
    (codecarbon's and the efficiency columns) is left alone: appending to it
    would shift every value under the wrong name.
    """
    path = Path(path)
    rows = list(rows)
    existing: list[str] | None = None
    ends_with_newline = True
    if path.exists() and path.stat().st_size > 0:
        try:
            with open(path, newline="", encoding="utf-8") as handle:
                existing = next(csv.reader(handle), None)
        except (UnicodeDecodeError, csv.Error):
            raise ReportError(f"{path}: not a UTF-8 CSV file; not appending") from None
        with open(path, "rb") as handle:
            handle.seek(-1, os.SEEK_END)
            ends_with_newline = handle.read(1) == b"\n"
        if existing is None or sorted(existing) not in (sorted(EMISSIONS_CSV_COLUMNS), sorted(REPORT_COLUMNS)):
            raise ReportError(f"{path}: its header is not codecarbon's emissions.csv header; not appending")
    columns = existing or list(REPORT_COLUMNS)
    with open(path, "a", newline="", encoding="utf-8") as handle:
        if not ends_with_newline:
            handle.write("\n")
        writer = csv.writer(handle, lineterminator="\n")
        if existing is None:
            writer.writerow(columns)
        for row in rows:
            writer.writerow([_cell(row.get(column)) for column in columns])


def site_from_config(carbon: Any, procfs: Path = Path("/proc"), gpu_count: int | None = None) -> Site:
    """The site a ``[carbon]`` table describes, with this host's CPU and memory."""
    import platform

    from agent.carbon import tables
    from agent.sensors.cpu_model import read_cpu_identity, read_mem_total_gib

    zone = None
    if carbon.country or carbon.cloud_provider:
        try:
            zone = tables.lookup(carbon.country, carbon.region, carbon.cloud_provider, carbon.cloud_region)
        except tables.CarbonTableError:
            zone = None
    cpu = read_cpu_identity(procfs)
    ram_gib = read_mem_total_gib(procfs)
    return Site(
        country_iso_code=zone.country_iso_code if zone else carbon.country.upper(),
        country_name=zone.country_name if zone else "",
        region=zone.region if zone and not carbon.cloud_provider else "",
        cloud_provider=carbon.cloud_provider,
        cloud_region=carbon.cloud_region,
        os=platform.platform(),
        python_version=platform.python_version(),
        cpu_model=cpu.model_name,
        cpu_count=cpu.logical_cpus if cpu.model_name else None,
        gpu_count=gpu_count,
        ram_total_bytes=int(ram_gib * 1024**3) if ram_gib > 0 else None,
    )


def job_emissions(job: Mapping[str, Any], site: Site, pue: float, now_unix: float) -> JobEmissions:
    """A report input from the agent's job JSON (``/v1/jobs/{id}``: energy_j, emissions_g, first_seen, ...)."""
    end = job.get("finished_at")
    duration = max((end if end is not None else now_unix) - float(job["first_seen"]), 0.0)
    return JobEmissions(
        job_id=str(job["id"]),
        job_name=str(job["name"]),
        duration_s=duration,
        energy_j={str(k): float(v) for k, v in (job.get("energy_j") or {}).items()},
        emissions_g=float(job.get("emissions_g") or 0.0),
        pue=pue,
        work_units={str(k): float(v) for k, v in (job.get("work_units") or {}).items()},
        end_unix_s=end,
        site=site,
        gpu_idle_j=float(job.get("gpu_idle_j") or 0.0),
    )


FORMATS = ("csv", "json", "text")


def render(rows: list[Mapping[str, Any]], fmt: str) -> str:
    if fmt == "csv":
        return to_csv(rows)
    if fmt == "json":
        return to_json(rows) + "\n"
    if fmt == "text":
        return "\n".join(to_text(row) for row in rows)
    raise ReportError(f"format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
