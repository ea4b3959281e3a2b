"""codecarbon's tables, read without its Python modules."""

import json
import subprocess
import sys

import pytest

from agent.carbon import tables


def test_tables_load_without_pandas_or_codecarbon_code():
    code = (
        "import sys, agent.carbon.tables as t\n"
        "z = [t.lookup('FRA'), t.lookup('USA', 'CA'), t.lookup('CAN', 'ontario'), t.lookup('CHN', 'beijing'),"
        " t.lookup('SWE', 'SE3'), t.lookup(cloud_provider='gcp', cloud_region='europe-west1')]\n"
        "assert 'pandas' not in sys.modules, 'pandas was imported'\n"
        "assert not [m for m in sys.modules if m.startswith('codecarbon')], 'codecarbon code ran'\n"
        "print(len(z))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "6"


def _raw(relative):
    return json.loads((tables.data_dir() / relative).read_text(encoding="utf-8"))


def test_country_uses_the_tables_own_intensity():
    mix = _raw("private_infra/global_energy_mix.json")
    assert tables.country("fra").grams_per_kwh == mix["FRA"]["carbon_intensity"]
    assert tables.country("POL").grams_per_kwh == mix["POL"]["carbon_intensity"]
    assert tables.country("FRA").country_name == "France"
    with pytest.raises(tables.CarbonTableError, match="'XYZ'"):
        tables.country("XYZ")


def test_country_without_intensity_is_computed_from_its_mix_like_codecarbon():
    per_source = _raw("private_infra/carbon_intensity_per_source.json")
    mix = {"coal_TWh": 3.0, "nuclear_TWh": 1.0, "total_TWh": 4.0}
    expected = 0.75 * per_source["coal"] + 0.25 * per_source["nuclear"]
    assert tables._mix_intensity(mix) == pytest.approx(expected, rel=1e-12)
    # Sources that do not add up to the total: codecarbon falls back to the world average.
    assert tables._mix_intensity({"coal_TWh": 1.0, "total_TWh": 4.0}) == per_source["world_average"]


def test_us_state_converts_egrid_pounds_per_mwh():
    row = _raw("private_infra/2023/usa_emissions.json")["california"]
    zone = tables.region("USA", "CA")
    assert zone.grams_per_kwh == pytest.approx(row["emissions"] * 0.45359237, rel=1e-12)
    assert tables.region("usa", "california") == zone
    assert zone.zone == "USA/CA" and zone.region == "california"


def test_canadian_province_from_fossil_shares_like_codecarbon():
    mix = _raw("private_infra/2023/canada_energy_mix.json")["saskatchewan"]
    expected_kg = (
        mix["coal"] / mix["total"] * 0.995725971
        + mix["petroleum"] / mix["total"] * 0.8166885263
        + mix["naturalGas"] / mix["total"] * 0.7438415916
    )
    assert tables.region("CAN", "Saskatchewan").grams_per_kwh == pytest.approx(expected_kg * 1000, rel=1e-12)
    # Hydro provinces are far cleaner than coal-and-gas ones.
    assert tables.region("CAN", "quebec").grams_per_kwh < 50 < tables.region("CAN", "alberta").grams_per_kwh


def test_china_province_by_name_suffix_or_code_and_nordic_zones():
    data = _raw("private_infra/2023/china_provincial_emissions.json")["data"]
    assert tables.region("CHN", "Beijing Municipality").grams_per_kwh == data["CN-BJ"]["emission_factor"]
    assert tables.region("CHN", "CN-BJ").zone == "CHN/CN-BJ"
    nordic = _raw("private_infra/nordic_emissions.json")["data"]
    assert tables.region("NOR", "no2").grams_per_kwh == nordic["NO2"]["emission_factor"]
    with pytest.raises(tables.CarbonTableError, match="SE1, SE2, SE3, SE4"):
        tables.region("SWE", "NO1")
    with pytest.raises(tables.CarbonTableError, match="no regional table for 'FRA'"):
        tables.region("FRA", "bretagne")


def test_cloud_table_with_byte_order_mark():
    raw = (tables.data_dir() / "cloud" / "impact.csv").read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf")  # the file's BOM, which must not leak into the column name
    line = next(l for l in raw.decode("utf-8-sig").splitlines() if l.startswith("gcp,") and ",europe-west1," in l)
    impact = float(line.split(",")[9])
    zone = tables.cloud("GCP", "europe-west1")
    assert zone.grams_per_kwh == impact
    assert zone.zone == "gcp/europe-west1" and zone.country_iso_code == "BEL"
    with pytest.raises(tables.CarbonTableError, match="gcp/nowhere-1"):
        tables.cloud("gcp", "nowhere-1")


def test_lookup_needs_a_complete_zone():
    with pytest.raises(tables.CarbonTableError, match="both cloud_provider and cloud_region"):
        tables.lookup(cloud_provider="gcp")
    with pytest.raises(tables.CarbonTableError, match="needs its country"):
        tables.lookup(region_name="ontario")
