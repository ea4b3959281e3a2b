"""Reports in codecarbon's emissions.csv format."""

import ast
import csv
import io
import json
from dataclasses import replace

import pytest

from agent.carbon import emissions, tables
from exporters import report


def codecarbon_columns():
    """EmissionsData's fields, read from codecarbon's source without running it."""
    source = (tables.data_dir().parent / "output_methods" / "emissions_data.py").read_text()
    cls = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == "EmissionsData")
    return [n.target.id for n in cls.body if isinstance(n, ast.AnnAssign)]


def a_job(**overrides):
    fields = dict(
        job_id="r-5f2a",
        job_name="llama-finetune",
        duration_s=5400.0,
        energy_j={"cpu": 2.7e6, "dram": 0.36e6, "gpu": 9.0e6},
        emissions_g=0.0,
        pue=1.25,
        end_unix_s=1_700_000_000.0,
        site=report.Site(
            country_iso_code="FRA",
            country_name="France",
            cpu_model="AMD EPYC 7763",
            cpu_count=64,
            gpu_model="NVIDIA H100 80GB HBM3",
            gpu_count=1,
            ram_total_bytes=512_000_000_000,
        ),
    )
    fields.update(overrides)
    job = report.JobEmissions(**fields)
    if "emissions_g" not in overrides:
        total_j = sum(job.energy_j.values())
        job = report.JobEmissions(**{**fields, "emissions_g": emissions.grams(total_j, 56.039, job.pue)})
    return job


def test_columns_are_codecarbons_in_its_order():
    assert list(report.EMISSIONS_CSV_COLUMNS) == codecarbon_columns()


def test_csv_row_parses_into_codecarbon_header_and_units():
    text = report.to_csv([report.report_row(a_job())])
    reader = csv.DictReader(io.StringIO(text))
    assert reader.fieldnames == codecarbon_columns() + list(report.EFFICIENCY_COLUMNS)
    (row,) = list(reader)
    # kWh, with the PUE applied as codecarbon applies it.
    assert float(row["cpu_energy"]) == pytest.approx(2.7e6 / 3.6e6 * 1.25, rel=1e-12)
    assert float(row["ram_energy"]) == pytest.approx(0.1 * 1.25, rel=1e-12)
    assert float(row["gpu_energy"]) == pytest.approx(2.5 * 1.25, rel=1e-12)
    assert float(row["energy_consumed"]) == pytest.approx(3.35 * 1.25, rel=1e-12)
    # W averaged over the run, kg, kg/s, seconds, GB.
    assert float(row["gpu_power"]) == pytest.approx(9.0e6 * 1.25 / 5400.0, rel=1e-12)
    assert float(row["duration"]) == 5400.0
    assert float(row["emissions"]) == pytest.approx(3.35 * 1.25 * 56.039 / 1000.0, rel=1e-12)
    assert float(row["emissions_rate"]) == pytest.approx(float(row["emissions"]) / 5400.0, rel=1e-12)
    assert float(row["ram_total_size"]) == 512.0
    # kWh x intensity agrees with emissions in the same row.
    assert float(row["energy_consumed"]) * 56.039 / 1000.0 == pytest.approx(float(row["emissions"]), rel=1e-9)
    assert (row["project_name"], row["run_id"], row["country_iso_code"], row["pue"]) == (
        "llama-finetune",
        "r-5f2a",
        "FRA",
        "1.25",
    )
    assert row["tracking_mode"] == "process" and row["on_cloud"] == "N"
    # What we do not measure stays empty rather than invented.
    for column in (
        "experiment_id",
        "water_consumed",
        "codecarbon_version",
        "longitude",
        "latitude",
        "cloud_provider",
        "cloud_region",
        "region",
        "cpu_utilization_percent",
        "wue",
    ):
        assert row[column] == "", column


def test_json_has_the_same_columns_with_nulls():
    site = replace(a_job().site, cloud_provider="gcp", cloud_region="europe-west1")
    (obj,) = json.loads(report.to_json([report.report_row(a_job(site=site))]))
    assert list(obj) == codecarbon_columns() + list(report.EFFICIENCY_COLUMNS)
    assert obj["water_consumed"] is None and obj["on_cloud"] == "Y" and obj["cloud_region"] == "europe-west1"
    assert obj["cpu_count"] == 64 and obj["gpu_energy"] == pytest.approx(3.125)


def test_zero_duration_has_no_division_by_zero():
    row = report.report_row(a_job(duration_s=0.0, energy_j={}, emissions_g=0.0))
    assert row["emissions_rate"] == 0.0 and row["cpu_power"] == 0.0 and row["energy_consumed"] == 0.0


def test_appending_keeps_one_header_and_follows_the_files_column_order(tmp_path):
    path = tmp_path / "emissions.csv"
    report.append_csv(path, [report.report_row(a_job(job_id="r-1"))])
    report.append_csv(path, [report.report_row(a_job(job_id="r-2"))])
    lines = path.read_text().splitlines()
    assert sum(1 for line in lines if line.startswith("timestamp,")) == 1
    assert [r["run_id"] for r in csv.DictReader(io.StringIO(path.read_text()))] == ["r-1", "r-2"]

    # A file codecarbon wrote may order its columns differently and lack a final newline.
    shuffled = list(reversed(codecarbon_columns()))
    other = tmp_path / "theirs.csv"
    other.write_text(",".join(shuffled) + "\n" + ",".join("x" for _ in shuffled))
    report.append_csv(other, [report.report_row(a_job(job_id="r-3"))])
    rows = list(csv.DictReader(io.StringIO(other.read_text())))
    assert [r["run_id"] for r in rows] == ["x", "r-3"]
    assert float(rows[1]["duration"]) == 5400.0


def test_appending_refuses_a_foreign_header(tmp_path):
    path = tmp_path / "emissions.csv"
    path.write_text("a,b,c\n1,2,3\n")
    with pytest.raises(report.ReportError, match="not codecarbon's emissions.csv header"):
        report.append_csv(path, [report.report_row(a_job())])
    assert path.read_text() == "a,b,c\n1,2,3\n"


def test_text_report_shows_grams_and_kwh():
    text = report.to_text(report.report_row(a_job()))
    assert "llama-finetune (r-5f2a)" in text
    assert f"{3.35 * 1.25:.6f} kWh" in text
    assert f"{3.35 * 1.25 * 56.039:.3f} gCO2eq" in text
    assert "gpu idle" not in text


def test_efficiency_columns_beside_codecarbons():
    # 12.06 MJ of IT energy for 2.01e6 generated tokens (prompt tokens do not count), 300 requests.
    job = a_job(work_units={"tokens_generated": 2.01e6, "tokens_prompt": 9e6, "requests": 300.0})
    (row,) = list(csv.DictReader(io.StringIO(report.to_csv([report.report_row(job)]))))
    total_j = 2.7e6 + 0.36e6 + 9.0e6
    assert row["token_unit"] == "tokens_generated" and float(row["tokens"]) == 2.01e6
    assert float(row["energy_per_token_j"]) == pytest.approx(total_j / 2.01e6, rel=1e-12)
    assert float(row["energy_per_request_j"]) == pytest.approx(total_j / 300.0, rel=1e-12)
    assert float(row["emissions_per_1k_tokens_g"]) == pytest.approx(job.emissions_g / 2.01e6 * 1000.0, rel=1e-12)
    # No samples reported: empty, not zero or infinite.
    assert row["samples"] == "" and row["energy_per_sample_j"] == ""
    text = report.to_text(report.report_row(job))
    assert f"{total_j / 2.01e6:.6g} J/token" in text and f"{total_j / 300.0:.6g} J/request" in text
    assert "J/sample" not in text


def test_training_tokens_count_where_nothing_was_generated():
    job = a_job(work_units={"tokens": 4096.0, "samples": 32.0})
    row = report.report_row(job)
    assert row["token_unit"] == "tokens" and row["energy_per_sample_j"] == pytest.approx(12.06e6 / 32.0)
    assert row["energy_per_token_j"] == pytest.approx(12.06e6 / 4096.0) and row["energy_per_request_j"] is None


def test_appending_to_a_codecarbon_file_writes_only_its_columns(tmp_path):
    path = tmp_path / "emissions.csv"
    path.write_text(",".join(codecarbon_columns()) + "\n")
    report.append_csv(path, [report.report_row(a_job(work_units={"samples": 10.0}))])
    header, line = path.read_text().splitlines()
    assert header.split(",") == codecarbon_columns() and len(next(csv.reader([line]))) == len(codecarbon_columns())
    # Ours, then appended to again: the efficiency columns stay.
    ours = tmp_path / "ours.csv"
    report.append_csv(ours, [report.report_row(a_job(work_units={"samples": 10.0}))])
    report.append_csv(ours, [report.report_row(a_job(work_units={"samples": 20.0}))])
    rows = list(csv.DictReader(io.StringIO(ours.read_text())))
    assert [float(r["energy_per_sample_j"]) for r in rows] == pytest.approx([12.06e6 / 10.0, 12.06e6 / 20.0])


def test_text_report_shows_allocated_idle_gpu_energy_and_csv_keeps_codecarbons_columns():
    job = report.job_emissions(
        {
            "id": "pod-1",
            "name": "nb",
            "first_seen": 0.0,
            "finished_at": 3600.0,
            "energy_j": {"gpu": 3.6e6},
            "gpu_idle_j": 0.9e6,
            "emissions_g": 1.0,
        },
        report.Site(),
        1.0,
        3600.0,
    )
    row = report.report_row(job)
    assert "gpu idle    0.250000 kWh on GPUs allocated to the job but idle (25.0 % of gpu)" in report.to_text(row)
    header = list(csv.reader(io.StringIO(report.to_csv([row]))))[0]
    assert header[: len(codecarbon_columns())] == codecarbon_columns() and "gpu_idle_energy" not in header
    assert "gpu_idle_energy" not in json.loads(report.to_json([row]))[0]
