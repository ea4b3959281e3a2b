"""Generate jouleward's Grafana dashboards with the Grafana Foundation SDK.

    python3 grafana/generate.py [--out DIR]

writes fleet.json, job.json and node.json (default: grafana/dashboards/).
The JSON is committed; a test regenerates it and fails when the two differ,
so edit this file, run it, and commit both.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from grafana_foundation_sdk.builders import bargauge, dashboard, prometheus, stat, table, timeseries
from grafana_foundation_sdk.builders.common import StackingConfig
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import StackingMode
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DataSourceRef,
    VariableOption,
    VariableRefresh,
    VariableSort,
)
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

DEFAULT_OUT = Path(__file__).resolve().parent / "dashboards"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
# Domains that add up to a node's energy: platform and board overlap them.
SUMMED = 'domain=~"cpu|dram|gpu"'
CLUSTER = 'cluster=~"$cluster"'
NODE = f'{CLUSTER}, instance=~"$instance"'
JOB = f'{CLUSTER}, namespace=~"$namespace", job_name=~"$job_name"'
RATE = "$__rate_interval"
# The agent's own process metrics share their names with every other Python
# or Go exporter on the node: keep only the series of jouleward targets.
OWN = "and on (instance, job) jouleward_build_info"


def query(expr: str, legend: str = "", ref: str = "A", instant: bool = False) -> prometheus.Dataquery:
    q = prometheus.Dataquery().expr(expr).ref_id(ref).datasource(DATASOURCE)
    if legend:
        q = q.legend_format(legend)
    if instant:
        q = q.instant().format(PromQueryFormat.TABLE)
    return q


def series(
    title: str,
    unit: str,
    *targets: prometheus.Dataquery,
    stacked: bool = False,
    w: int = 12,
    h: int = 8,
    description: str = "",
) -> timeseries.Panel:
    panel = timeseries.Panel().title(title).unit(unit).span(w).height(h).datasource(DATASOURCE).fill_opacity(10)
    if stacked:
        panel = panel.stacking(StackingConfig().mode(StackingMode.NORMAL)).fill_opacity(40)
    if description:
        panel = panel.description(description)
    for target in targets:
        panel = panel.with_target(target)
    return panel


def single(title: str, unit: str, expr: str, w: int = 6, h: int = 4, description: str = "") -> stat.Panel:
    panel = stat.Panel().title(title).unit(unit).span(w).height(h).datasource(DATASOURCE).with_target(query(expr))
    return panel.description(description) if description else panel


def bars(title: str, unit: str, expr: str, legend: str, w: int = 12, h: int = 8) -> bargauge.Panel:
    return (
        bargauge.Panel()
        .title(title)
        .unit(unit)
        .span(w)
        .height(h)
        .datasource(DATASOURCE)
        .with_target(query(expr, legend, instant=True).format(PromQueryFormat.TIME_SERIES))
    )


def listing(title: str, expr: str, w: int = 24, h: int = 8) -> table.Panel:
    return table.Panel().title(title).span(w).height(h).datasource(DATASOURCE).with_target(query(expr, instant=True))


def datasource_variable() -> dashboard.DatasourceVariable:
    return dashboard.DatasourceVariable("datasource").label("Data source").type("prometheus")


def label_variable(name: str, label: str, metric: str, text: str) -> dashboard.QueryVariable:
    return (
        dashboard.QueryVariable(name)
        .label(text)
        .datasource(DATASOURCE)
        .query({"query": f"label_values({metric}, {label})", "refId": "PrometheusVariableQueryEditor-VariableQuery"})
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(VariableSort.ALPHABETICAL_ASC)
        .include_all(True)
        .all_value(".*")
        .multi(True)
        .current(VariableOption(text="All", value="$__all"))
    )


def cluster_variable() -> dashboard.QueryVariable:
    return label_variable("cluster", "cluster", "jouleward_build_info", "Cluster")


def instance_variable() -> dashboard.QueryVariable:
    return label_variable("instance", "instance", f"jouleward_build_info{{{CLUSTER}}}", "Node")


def namespace_variable() -> dashboard.QueryVariable:
    return label_variable("namespace", "namespace", f"jouleward_job_info{{{CLUSTER}}}", "Namespace")


def job_variable() -> dashboard.QueryVariable:
    return label_variable("job_name", "job_name", f'jouleward_job_info{{{CLUSTER}, namespace=~"$namespace"}}', "Job")


def base(uid: str, title: str, description: str) -> dashboard.Dashboard:
    return (
        dashboard.Dashboard(title)
        .uid(uid)
        .description(description)
        .tags(["jouleward", "energy", "carbon"])
        .editable()
        .tooltip(DashboardCursorSync.CROSSHAIR)
        .refresh("30s")
        .time("now-6h", "now")
        .timezone("browser")
        .with_variable(datasource_variable())
        .with_variable(cluster_variable())
    )


def fleet() -> dashboard.Dashboard:
    node_power = f"jouleward_node_power_watts{{{CLUSTER}, {SUMMED}}}"
    return (
        base(
            "jouleward-fleet",
            "jouleward / Fleet",
            "Power, energy and emissions across clusters, nodes, namespaces and jobs.",
        )
        .with_variable(namespace_variable())
        .with_row(dashboard.Row("Overview"))
        .with_panel(single("Power now", "watt", f"sum({node_power})"))
        .with_panel(
            single(
                "Energy in range",
                "joule",
                f"sum(increase(jouleward_node_energy_joules_total{{{CLUSTER}, {SUMMED}}}[$__range]))",
            )
        )
        .with_panel(
            single(
                "Emissions in range",
                "massg",
                f"sum(increase(jouleward_node_emissions_grams_total{{{CLUSTER}}}[$__range]))",
                description="Grams CO2eq, at the grid intensity in force each tick, times PUE.",
            )
        )
        .with_panel(
            single(
                "Grid intensity",
                "none",
                f"avg(jouleward_grid_carbon_intensity_grams_per_kwh{{{CLUSTER}}})",
                description="gCO2eq/kWh, averaged over the nodes in view.",
            )
        )
        .with_row(dashboard.Row("Power"))
        .with_panel(
            series(
                "Power by cluster",
                "watt",
                query(
                    f"sum by (cluster) (cluster_instance:jouleward_node_power_watts:sum{{{CLUSTER}}})", "{{cluster}}"
                ),
            )
        )
        .with_panel(
            series(
                "Power by node",
                "watt",
                query(
                    f"sum by (instance) (cluster_instance:jouleward_node_power_watts:sum{{{CLUSTER}}})", "{{instance}}"
                ),
            )
        )
        .with_panel(
            series(
                "Job power by namespace",
                "watt",
                query(
                    "sum by (namespace) (cluster_namespace_job_name:jouleward_job_power_watts:sum"
                    f'{{{CLUSTER}, namespace=~"$namespace"}})',
                    "{{namespace}}",
                ),
                stacked=True,
            )
        )
        .with_panel(
            series(
                "Job power by job",
                "watt",
                query(
                    f'cluster_namespace_job_name:jouleward_job_power_watts:sum{{{CLUSTER}, namespace=~"$namespace"}}',
                    "{{namespace}}/{{job_name}}",
                ),
                stacked=True,
            )
        )
        .with_row(dashboard.Row("Top jobs"))
        .with_panel(
            bars(
                "Top jobs by energy in range",
                "joule",
                "topk(10, sum by (namespace, job_name) (increase(jouleward_job_energy_joules_total"
                f'{{{CLUSTER}, namespace=~"$namespace"}}[$__range])))',
                "{{namespace}}/{{job_name}}",
            )
        )
        .with_panel(
            bars(
                "Top jobs by emissions in range",
                "massg",
                "topk(10, sum by (namespace, job_name) (increase(jouleward_job_emissions_grams_total"
                f'{{{CLUSTER}, namespace=~"$namespace"}}[$__range])))',
                "{{namespace}}/{{job_name}}",
            )
        )
        .with_panel(
            series(
                "Emissions rate by namespace",
                "massg",
                query(
                    "sum by (namespace) (rate(jouleward_job_emissions_grams_total"
                    f'{{{CLUSTER}, namespace=~"$namespace"}}[{RATE}])) * 3600',
                    "{{namespace}}",
                ),
                description="Grams CO2eq per hour.",
            )
        )
        .with_panel(
            series(
                "Grid carbon intensity",
                "none",
                query(
                    f"avg by (zone, source) (jouleward_grid_carbon_intensity_grams_per_kwh{{{CLUSTER}}})",
                    "{{zone}} ({{source}})",
                ),
                description="gCO2eq/kWh by zone, and where the figure came from.",
            )
        )
        .with_row(dashboard.Row("Waste"))
        .with_panel(
            series(
                "Idle share of energy",
                "percentunit",
                query(
                    f"sum(rate(jouleward_idle_energy_joules_total{{{CLUSTER}}}[{RATE}]))"
                    f" / sum(rate(jouleward_node_energy_joules_total{{{CLUSTER}, {SUMMED}}}[{RATE}]))",
                    "idle (no job)",
                ),
                description="Static power of the nodes not charged to any job.",
            )
        )
        .with_panel(
            series(
                "Allocated-idle share of GPU energy",
                "percentunit",
                query(
                    f"sum(rate(jouleward_job_gpu_idle_energy_joules_total{{{CLUSTER}}}[{RATE}]))"
                    f' / sum(rate(jouleward_node_energy_joules_total{{{CLUSTER}, domain="gpu"}}[{RATE}]))',
                    "allocated but idle",
                ),
                description="GPU energy spent while jobs held GPUs without using them.",
            )
        )
    )


def job() -> dashboard.Dashboard:
    sel = f"{{{JOB}}}"
    return (
        base("jouleward-job", "jouleward / Job", "One ML job across all its pods and nodes.")
        .with_variable(namespace_variable())
        .with_variable(job_variable())
        .with_row(dashboard.Row("Totals"))
        .with_panel(single("Power now", "watt", f"sum(jouleward_job_power_watts{sel})"))
        .with_panel(single("Energy so far", "joule", f"sum(jouleward_job_energy_joules_total{sel})"))
        .with_panel(single("Emissions so far", "massg", f"sum(jouleward_job_emissions_grams_total{sel})"))
        .with_panel(single("Processes", "none", f"sum(jouleward_job_processes{sel})"))
        .with_row(dashboard.Row("Power and energy"))
        .with_panel(
            series(
                "Power by domain",
                "watt",
                query(f"sum by (domain) (jouleward_job_power_watts{sel})", "{{domain}}"),
                stacked=True,
            )
        )
        .with_panel(
            series(
                "Power by node",
                "watt",
                query(f"sum by (instance) (jouleward_job_power_watts{sel})", "{{instance}}"),
                stacked=True,
            )
        )
        .with_panel(
            series(
                "Cumulative energy",
                "joule",
                query(f"sum by (domain) (jouleward_job_energy_joules_total{sel})", "{{domain}}"),
                stacked=True,
            )
        )
        .with_panel(
            series(
                "Cumulative emissions",
                "massg",
                query(f"sum(jouleward_job_emissions_grams_total{sel})", "CO2eq"),
            )
        )
        .with_row(dashboard.Row("Efficiency"))
        .with_panel(
            series(
                "Energy per unit of work",
                "joule",
                query(
                    f"cluster_namespace_job_name_unit:jouleward_job_joules_per_work_unit:ratio_rate5m{sel}",
                    "J per {{unit}}",
                ),
                description="Joules per sample, token or request over the last five minutes, across all nodes.",
            )
        )
        .with_panel(
            series(
                "Work rate",
                "none",
                query(f"sum by (unit) (rate(jouleward_job_work_units_total{sel}[{RATE}]))", "{{unit}}/s"),
            )
        )
        .with_panel(
            series(
                "GPU allocated-idle power",
                "watt",
                query(
                    f"sum by (instance) (rate(jouleward_job_gpu_idle_energy_joules_total{sel}[{RATE}]))", "{{instance}}"
                ),
                description="Power of GPUs the job holds but does not use.",
            )
        )
        .with_panel(
            series(
                "GPU allocated-idle energy",
                "joule",
                query(f"sum(jouleward_job_gpu_idle_energy_joules_total{sel})", "allocated but idle"),
            )
        )
        .with_panel(
            series(
                "CPU time rate",
                "none",
                query(f"sum by (instance) (rate(jouleward_job_cpu_seconds_total{sel}[{RATE}]))", "{{instance}}"),
                description="CPU cores busy with the job's processes.",
            )
        )
        .with_panel(listing("Pieces of the job", f"jouleward_job_info{sel}", w=12))
    )


def node() -> dashboard.Dashboard:
    sel = f"{{{NODE}}}"
    return (
        base(
            "jouleward-node",
            "jouleward / Node",
            "Every device of a node, its source, sensor health and the agent's own cost.",
        )
        .with_variable(instance_variable())
        .with_row(dashboard.Row("Devices"))
        .with_panel(
            listing(
                "Devices and sources",
                f"max by (instance, domain, device, source) (jouleward_node_power_watts{sel})",
            )
        )
        .with_panel(
            series(
                "Power by device",
                "watt",
                query(
                    f"sum by (instance, domain, device, source) (jouleward_node_power_watts{sel})",
                    "{{instance}} {{device}} ({{source}})",
                ),
            )
        )
        .with_panel(
            series(
                "Where the energy went",
                "watt",
                query(f"sum by (domain) (jouleward_job_power_watts{sel})", "jobs {{domain}}", "A"),
                query(
                    f"sum by (domain) (rate(jouleward_idle_energy_joules_total{sel}[{RATE}]))", "idle {{domain}}", "B"
                ),
                query(
                    f"sum by (domain) (rate(jouleward_unattributed_energy_joules_total{sel}[{RATE}]))",
                    "unattributed {{domain}}",
                    "C",
                ),
                stacked=True,
            )
        )
        .with_panel(
            series(
                "CPU utilisation",
                "percentunit",
                query(f"jouleward_node_cpu_utilization_ratio{sel}", "{{instance}}"),
            )
        )
        .with_panel(
            series(
                "GPU utilisation",
                "percentunit",
                query(f"jouleward_gpu_utilization_ratio{sel}", "{{instance}} {{device}}"),
            )
        )
        .with_row(dashboard.Row("Sensor health"))
        .with_panel(
            series(
                "Sensors up",
                "none",
                query(f"jouleward_sensor_up{sel}", "{{instance}} {{sensor}} {{device}}"),
            )
        )
        .with_panel(
            series(
                "Sensor errors",
                "none",
                query(
                    f"sum by (instance, sensor, device) (increase(jouleward_sensor_errors_total{sel}[{RATE}]))",
                    "{{instance}} {{sensor}} {{device}}",
                ),
            )
        )
        .with_panel(
            series(
                "Ledger flush age",
                "s",
                query(f"time() - jouleward_ledger_flush_timestamp_seconds{sel}", "{{instance}}"),
            )
        )
        .with_panel(
            series(
                "Jobs and processes",
                "none",
                query(f"sum by (state) (jouleward_jobs{sel})", "jobs {{state}}", "A"),
                query(f"sum(jouleward_processes{sel})", "processes", "B"),
            )
        )
        .with_row(dashboard.Row("Agent"))
        .with_panel(
            series(
                "Agent CPU",
                "percentunit",
                query(f"rate(process_cpu_seconds_total{sel}[{RATE}]) {OWN}", "{{instance}}"),
                w=8,
            )
        )
        .with_panel(
            series(
                "Agent memory",
                "bytes",
                query(f"process_resident_memory_bytes{sel} {OWN}", "{{instance}}"),
                w=8,
            )
        )
        .with_panel(
            series(
                "Sample duration",
                "s",
                query(
                    "histogram_quantile(0.5, sum by (instance, le) "
                    f"(rate(jouleward_sample_duration_seconds_bucket{sel}[{RATE}])))",
                    "p50 {{instance}}",
                    "A",
                ),
                query(
                    "histogram_quantile(0.99, sum by (instance, le) "
                    f"(rate(jouleward_sample_duration_seconds_bucket{sel}[{RATE}])))",
                    "p99 {{instance}}",
                    "B",
                ),
                w=8,
            )
        )
    )


DASHBOARDS = {"fleet": fleet, "job": job, "node": node}


def render(name: str) -> str:
    model = DASHBOARDS[name]().build()
    panel_id = 0
    for panel in model.panels:
        for piece in [panel, *(getattr(panel, "panels", None) or [])]:
            panel_id += 1
            piece.id_val = panel_id
    return json.dumps(model, cls=JSONEncoder, sort_keys=True, indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory for the JSON files")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in DASHBOARDS:
        (args.out / f"{name}.json").write_text(render(name), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
