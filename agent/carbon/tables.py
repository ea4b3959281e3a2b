"""Carbon intensity from the data files codecarbon ships, read directly.

codecarbon's Python modules import pandas at import time; the agent must not,
so only the package's location is looked up (``find_spec`` of a top-level
package does not execute it) and its JSON and CSV files are parsed here.
Every figure returned is in gCO2eq/kWh and follows codecarbon's own rules for
the same table, so a codecarbon run and a jouleward job in one place are
charged at the same intensity.
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.errors import JoulewardError

# codecarbon's own constant for eGRID's lb/MWh (units.EmissionsPerKWh).
LB_PER_MWH_TO_G_PER_KWH = 0.45359237

# codecarbon computes Canadian provinces from the share of these three fuels
# only, with these factors (kg/kWh); other sources count as zero.
_CANADA_FUEL_KG_PER_KWH = {"coal": 0.995725971, "petroleum": 0.8166885263, "naturalGas": 0.7438415916}

NORDIC_ZONES = {
    "SWE": ("SE1", "SE2", "SE3", "SE4"),
    "NOR": ("NO1", "NO2", "NO3", "NO4", "NO5"),
    "FIN": ("FI",),
}
_CHINA_SUFFIX = re.compile(r"\s+(autonomous region|municipality|province|sheng|shi|zizhiqu)$")


class CarbonTableError(JoulewardError, LookupError):
    """A country, region or cloud region is not in codecarbon's tables."""


@dataclass(frozen=True, slots=True)
class ZoneIntensity:
    grams_per_kwh: float
    zone: str  # FRA, USA/CA, CAN/ontario, CHN/CN-BJ, SWE/SE3, gcp/europe-west1
    country_iso_code: str  # ISO 3166 alpha-3, empty when unknown
    country_name: str
    region: str  # as codecarbon writes it in emissions.csv, empty for a country


@functools.cache
def data_dir() -> Path:
    spec = importlib.util.find_spec("codecarbon")
    if spec is None or not spec.submodule_search_locations:
        raise CarbonTableError("codecarbon is not installed: its data files hold the carbon tables")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "data"
        if (candidate / "private_infra" / "global_energy_mix.json").is_file():
            return candidate
    raise CarbonTableError("codecarbon is installed without its data files")


def data_file(*parts: str) -> Path:
    """One of codecarbon's data files (``hardware/cpu_power.csv``, ...)."""
    path = data_dir().joinpath(*parts)
    if not path.is_file():
        raise CarbonTableError(f"codecarbon data file not found: {'/'.join(parts)}")
    return path


@functools.cache
def _json(relative: str) -> Any:
    with open(data_dir() / relative, encoding="utf-8") as handle:
        return json.load(handle)


def world_average() -> float:
    return float(_json("private_infra/carbon_intensity_per_source.json")["world_average"])


def _mix_intensity(mix: dict[str, Any]) -> float:
    """gCO2eq/kWh of a country's generation mix, as codecarbon computes it."""
    if mix.get("carbon_intensity") is not None:
        return float(mix["carbon_intensity"])
    per_source = _json("private_infra/carbon_intensity_per_source.json")
    total = mix["total_TWh"]
    weighted = counted = 0.0
    for key, twh in mix.items():
        factor = per_source.get(key[: -len("_TWh")]) if key.endswith("_TWh") else None
        if isinstance(factor, (int, float)):
            weighted += twh / total * factor
            counted += twh
    # codecarbon distrusts a mix whose sources do not add up to its total.
    return weighted if total and counted == total else world_average()


def country(iso3: str) -> ZoneIntensity:
    code = iso3.strip().upper()
    mix = _json("private_infra/global_energy_mix.json").get(code)
    if mix is None:
        raise CarbonTableError(f"country {iso3!r} is not in codecarbon's energy mix table (ISO 3166 alpha-3, e.g. FRA)")
    return ZoneIntensity(_mix_intensity(mix), code, code, mix.get("country_name", ""), "")


def _usa(region: str) -> ZoneIntensity:
    table = _json("private_infra/2023/usa_emissions.json")
    wanted = region.strip().lower()
    for state, row in table.items():
        if state.startswith("_") or not isinstance(row, dict):
            continue
        if wanted in (state, str(row.get("regionCode", "")).lower()):
            grams = float(row["emissions"]) * LB_PER_MWH_TO_G_PER_KWH
            return ZoneIntensity(grams, f"USA/{row['regionCode']}", "USA", "United States", state)
    raise CarbonTableError(f"region {region!r} is not a US state in codecarbon's eGRID table (e.g. california or CA)")


def _canada(region: str) -> ZoneIntensity:
    table = _json("private_infra/2023/canada_energy_mix.json")
    wanted = region.strip().lower()
    mix = table.get(wanted)
    if mix is None:
        raise CarbonTableError(f"region {region!r} is not a Canadian province in codecarbon's table (e.g. ontario)")
    kg = sum(mix.get(fuel, 0.0) / mix["total"] * factor for fuel, factor in _CANADA_FUEL_KG_PER_KWH.items())
    return ZoneIntensity(kg * 1000.0, f"CAN/{wanted}", "CAN", "Canada", wanted)


def _china(region: str) -> ZoneIntensity:
    table = _json("private_infra/2023/china_provincial_emissions.json")["data"]
    wanted = _CHINA_SUFFIX.sub("", " ".join(region.lower().split()))
    for code, row in table.items():
        if wanted == code.lower() or wanted in row.get("names", ()):
            return ZoneIntensity(float(row["emission_factor"]), f"CHN/{code}", "CHN", "China", row["names"][0])
    raise CarbonTableError(f"region {region!r} is not a Chinese province in codecarbon's table (e.g. beijing or CN-BJ)")


def _nordic(iso3: str, region: str) -> ZoneIntensity:
    zone = region.strip().upper()
    if zone not in NORDIC_ZONES[iso3]:
        raise CarbonTableError(f"region {region!r} is not a bidding zone of {iso3}: {', '.join(NORDIC_ZONES[iso3])}")
    row = _json("private_infra/nordic_emissions.json")["data"][zone]
    return ZoneIntensity(float(row["emission_factor"]), f"{iso3}/{zone}", iso3, country(iso3).country_name, zone)


def region(iso3: str, name: str) -> ZoneIntensity:
    """A sub-national zone: US state, Canadian or Chinese province, Nordic bidding zone."""
    code = iso3.strip().upper()
    if code == "USA":
        return _usa(name)
    if code == "CAN":
        return _canada(name)
    if code == "CHN":
        return _china(name)
    if code in NORDIC_ZONES:
        return _nordic(code, name)
    raise CarbonTableError(
        f"codecarbon has no regional table for {iso3!r}: regions exist for USA, CAN, CHN, SWE, NOR, FIN"
    )


@functools.cache
def _cloud_rows() -> tuple[dict[str, str], ...]:
    # The file starts with a UTF-8 byte-order mark; utf-8-sig drops it so the
    # first column is named "provider", not "\ufeffprovider".
    with open(data_dir() / "cloud" / "impact.csv", encoding="utf-8-sig", newline="") as handle:
        return tuple(csv.DictReader(handle))


def cloud_providers() -> set[str]:
    return {row["provider"] for row in _cloud_rows()}


def cloud(provider: str, cloud_region: str) -> ZoneIntensity:
    wanted = (provider.strip().lower(), cloud_region.strip().lower())
    for row in _cloud_rows():
        if (row["provider"].lower(), row["region"].lower()) == wanted:
            return ZoneIntensity(
                float(row["impact"]),
                f"{row['provider']}/{row['region']}",
                row["countryIsoCode"],
                row["country_name"],
                row["region"],
            )
    known = ", ".join(sorted(cloud_providers()))
    raise CarbonTableError(
        f"cloud region {provider}/{cloud_region} is not in codecarbon's cloud table (providers: {known})"
    )


def lookup(
    country_iso3: str = "", region_name: str = "", cloud_provider: str = "", cloud_region: str = ""
) -> ZoneIntensity:
    """The most specific zone the arguments name: cloud region, then region, then country."""
    if cloud_provider or cloud_region:
        if not (cloud_provider and cloud_region):
            raise CarbonTableError("a cloud zone needs both cloud_provider and cloud_region")
        return cloud(cloud_provider, cloud_region)
    if region_name:
        if not country_iso3:
            raise CarbonTableError("a region needs its country (ISO 3166 alpha-3)")
        return region(country_iso3, region_name)
    if country_iso3:
        return country(country_iso3)
    raise CarbonTableError("no zone given: set country, or country and region, or cloud_provider and cloud_region")
