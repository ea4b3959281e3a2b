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

from grafana_foundation_sdk.builders import (
    bargauge,
    dashboard,
    prometheus,
    stat,
    table,
    timeseries,
)
from grafana_foundation_sdk.builders.common import StackingConfig
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import StackingMode
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DashboardLinkType,
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
NAMESPACE = f'{CLUSTER}, job_namespace=~"$job_namespace"'
JOB = f'{NAMESPACE}, job_name=~"$job_name", job_id=~"$job_id"'
# One run of a job, across all its nodes: its cluster-wide id, with its
# namespace and name kept for the legend.
RUN = "job_namespace, job_id, job_name"
RUN_LEGEND = "{{job_namespace}}/{{job_name}} {{job_id}}"
RATE = "$__rate_interval"
RANGE = "$__range"
JOULES_PER_KWH = "3.6e6"
# Units people read: energy totals in kWh, emissions in grams of CO2eq.
KWH = "kwatth"
GRAMS = "suffix: gCO2eq"
GRAMS_PER_KWH = "suffix: gCO2eq/kWh"
GRAMS_PER_HOUR = "suffix: gCO2eq/h"
# The agent's own process metrics share their names with every other Python
# or Go exporter on the node: keep only the series of jouleward targets.
OWN = "and on (instance, job) jouleward_build_info"
TO_JOB = "/d/jouleward-job/jouleward-job?var-job_id=${__field.labels.job_id}&${__url_time_range}"
TO_NODE = "/d/jouleward-node/jouleward-node?var-instance=${__field.labels.instance}&${__url_time_range}"


def kwh(expr: str) -> str:
    return f"({expr}) / {JOULES_PER_KWH}"


def query(expr: str, legend: str = "", ref: str = "A", instant: bool = False) -> prometheus.Dataquery:
    q = prometheus.Dataquery().expr(expr).ref_id(ref).datasource(DATASOURCE)
    if legend:
        q = q.legend_format(legend)
    if instant:
        q = q.instant().format(PromQueryFormat.TABLE)
    return q


def link(title: str, url: str) -> dashboard.DashboardLink:
    return dashboard.DashboardLink(title).type(DashboardLinkType.LINK).url(url)


def series(
    title: str,
    unit: str,
    *targets: prometheus.Dataquery,
    stacked: bool = False,
    w: int = 12,
    h: int = 8,
    description: str = "",
    to: str = "",
) -> timeseries.Panel:
    panel = timeseries.Panel().title(title).unit(unit).span(w).height(h).datasource(DATASOURCE).fill_opacity(10)
    if stacked:
        panel = panel.stacking(StackingConfig().mode(StackingMode.NORMAL)).fill_opacity(40)
    if description:
        panel = panel.description(description)
    if to:
        panel = panel.data_links([link("Open", to)])
    for target in targets:
        panel = panel.with_target(target)
    return panel


def single(title: str, unit: str, expr: str, w: int = 4, h: int = 4, description: str = "") -> stat.Panel:
    panel = stat.Panel().title(title).unit(unit).span(w).height(h).datasource(DATASOURCE).with_target(query(expr))
    return panel.description(description) if description else panel


def bars(
    title: str, unit: str, expr: str, legend: str, w: int = 8, h: int = 8, description: str = "", to: str = ""
) -> bargauge.Panel:
    panel = (
        bargauge.Panel()
        .title(title)
        .unit(unit)
        .span(w)
        .height(h)
        .datasource(DATASOURCE)
        .with_target(query(expr, legend, instant=True).format(PromQueryFormat.TIME_SERIES))
    )
    if description:
        panel = panel.description(description)
    return panel.data_links([link("Open", to)]) if to else panel


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
    return label_variable("job_namespace", "job_namespace", f"jouleward_job_info{{{CLUSTER}}}", "Namespace")


def job_name_variable() -> dashboard.QueryVariable:
    return label_variable("job_name", "job_name", f"jouleward_job_info{{{NAMESPACE}}}", "Job")


def job_id_variable() -> dashboard.QueryVariable:
    return label_variable("job_id", "job_id", f'jouleward_job_info{{{NAMESPACE}, job_name=~"$job_name"}}', "Run")


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
        # Fleet, job and node dashboards link to each other, keeping the time range and variables.
        .link(
            dashboard.DashboardLink("jouleward")
            .type(DashboardLinkType.DASHBOARDS)
            .tags(["jouleward"])
            .as_dropdown(True)
            .include_vars(True)
            .keep_time(True)
        )
        .with_variable(datasource_variable())
        .with_variable(cluster_variable())
    )


def fleet() -> dashboard.Dashboard:
    node_energy = f"jouleward_node_energy_joules_total{{{CLUSTER}, {SUMMED}}}"
    job_energy = f"jouleward_job_energy_joules_total{{{NAMESPACE}}}"
    job_emissions = f"jouleward_job_emissions_grams_total{{{NAMESPACE}}}"
    gpu_idle = f"jouleward_job_gpu_idle_energy_joules_total{{{NAMESPACE}}}"
    return (
        base(
            "jouleward-fleet",
            "jouleward / Fleet",
            "Where the energy and the emissions go across clusters, nodes, namespaces and jobs.",
        )
        .with_variable(namespace_variable())
        .with_row(dashboard.Row("Overview"))
        .with_panel(single("Power now", "watt", f"sum(rate({node_energy}[{RATE}]))"))
        .with_panel(single("Energy in range", KWH, kwh(f"sum(increase({node_energy}[{RANGE}]))")))
        .with_panel(
            single(
                "Emissions in range",
                GRAMS,
                f"sum(increase(jouleward_node_emissions_grams_total{{{CLUSTER}}}[{RANGE}]))",
                description="At the grid intensity in force each tick, times PUE.",
            )
        )
        .with_panel(
            single(
                "Idle share",
                "percentunit",
                f"sum(increase(jouleward_idle_energy_joules_total{{{CLUSTER}}}[{RANGE}]))"
                f" / sum(increase({node_energy}[{RANGE}]))",
                description="Static power of the nodes that no job was charged for.",
            )
        )
        .with_panel(
            single(
                "Modelled share",
                "percentunit",
                f'(sum(increase(jouleward_node_energy_joules_total{{{CLUSTER}, {SUMMED}, source="model"}}[{RANGE}]))'
                f" or vector(0)) / sum(increase({node_energy}[{RANGE}]))",
                description="Energy estimated from utilisation by the CPU power model rather than measured.",
            )
        )
        .with_panel(
            single(
                "Grid intensity",
                GRAMS_PER_KWH,
                f"avg(jouleward_grid_carbon_intensity_grams_per_kwh{{{CLUSTER}}})",
                description="Averaged over the nodes in view.",
            )
        )
        .with_row(dashboard.Row("Top jobs and namespaces"))
        .with_panel(
            bars(
                "Top jobs by energy",
                KWH,
                kwh(f"topk(10, sum by ({RUN}) (increase({job_energy}[{RANGE}])))"),
                RUN_LEGEND,
                to=TO_JOB,
            )
        )
        .with_panel(
            bars(
                "Top jobs by emissions",
                GRAMS,
                f"topk(10, sum by ({RUN}) (increase({job_emissions}[{RANGE}])))",
                RUN_LEGEND,
                to=TO_JOB,
            )
        )
        .with_panel(
            bars(
                "Allocated-but-idle GPU energy by job",
                KWH,
                kwh(f"topk(10, sum by ({RUN}) (increase({gpu_idle}[{RANGE}])))"),
                RUN_LEGEND,
                to=TO_JOB,
                description="GPU energy spent while the job held GPUs without using them.",
            )
        )
        .with_panel(
            bars(
                "Top namespaces by energy",
                KWH,
                kwh(f"topk(10, sum by (job_namespace) (increase({job_energy}[{RANGE}])))"),
                "{{job_namespace}}",
            )
        )
        .with_panel(
            bars(
                "Top namespaces by emissions",
                GRAMS,
                f"topk(10, sum by (job_namespace) (increase({job_emissions}[{RANGE}])))",
                "{{job_namespace}}",
            )
        )
        .with_panel(
            bars(
                "Allocated-but-idle GPU energy by namespace",
                KWH,
                kwh(f"topk(10, sum by (job_namespace) (increase({gpu_idle}[{RANGE}])))"),
                "{{job_namespace}}",
            )
        )
        .with_row(dashboard.Row("Power"))
        .with_panel(
            series(
                "Power by cluster",
                "watt",
                query(f"sum by (cluster) (rate({node_energy}[{RATE}]))", "{{cluster}}"),
            )
        )
        .with_panel(
            series(
                "Power by node",
                "watt",
                query(f"sum by (instance) (rate({node_energy}[{RATE}]))", "{{instance}}"),
                to=TO_NODE,
            )
        )
        .with_panel(
            series(
                "Job power by namespace",
                "watt",
                query(f"sum by (job_namespace) (rate({job_energy}[{RATE}]))", "{{job_namespace}}"),
                stacked=True,
            )
        )
        .with_panel(
            series(
                "Job power by job",
                "watt",
                query(f"topk(10, sum by ({RUN}) (rate({job_energy}[{RATE}])))", RUN_LEGEND),
                description="The ten jobs drawing the most power at each moment.",
                to=TO_JOB,
            )
        )
        .with_panel(
            series(
                "Emissions rate by namespace",
                GRAMS_PER_HOUR,
                query(f"sum by (job_namespace) (rate({job_emissions}[{RATE}])) * 3600", "{{job_namespace}}"),
            )
        )
        .with_panel(
            series(
                "Grid carbon intensity",
                GRAMS_PER_KWH,
                query(
                    f"avg by (zone, source) (jouleward_grid_carbon_intensity_grams_per_kwh{{{CLUSTER}}})",
                    "{{zone}} ({{source}})",
                ),
                description="By zone, and where the figure came from.",
            )
        )
        .with_row(dashboard.Row("Waste"))
        .with_panel(
            series(
                "Idle share of energy",
                "percentunit",
                query(
                    f"sum(rate(jouleward_idle_energy_joules_total{{{CLUSTER}}}[{RATE}]))"
                    f" / sum(rate({node_energy}[{RATE}]))",
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
                    f' / (sum(rate(jouleward_node_energy_joules_total{{{CLUSTER}, domain="gpu"}}[{RATE}])) > 0)',
                    "allocated but idle",
                ),
                description="GPU energy spent while jobs held GPUs without using them.",
            )
        )
        .with_panel(
            series(
                "Allocated-idle share of GPU energy by namespace",
                "percentunit",
                query(
                    "sum by (job_namespace) "
                    f"(cluster_job_namespace:jouleward_job_gpu_idle_per_gpu_energy:ratio_rate15m{{{NAMESPACE}}})",
                    "{{job_namespace}}",
                ),
                description="Of each namespace's GPU energy, the share spent on GPUs allocated to its jobs but idle.",
            )
        )
        .with_panel(
            series(
                "Unallocated GPU idle power by node",
                "watt",
                query(
                    f"cluster_instance:jouleward_gpu_unallocated_idle_energy_joules:rate15m{{{CLUSTER}}}",
                    "{{instance}}",
                ),
                description="Static power of GPUs the scheduler allocated to no job (where an allocation source runs).",
                to=TO_NODE,
            )
        )
    )


def job() -> dashboard.Dashboard:
    sel = f"{{{JOB}}}"
    energy = f"jouleward_job_energy_joules_total{sel}"
    return (
        base("jouleward-job", "jouleward / Job", "One ML job across all its pods and nodes; one run per job_id.")
        .with_variable(namespace_variable())
        .with_variable(job_name_variable())
        .with_variable(job_id_variable())
        .with_row(dashboard.Row("Totals"))
        .with_panel(single("Power now", "watt", f"sum(rate({energy}[{RATE}]))"))
        # last_over_time: a finished job's series drop out after a while; its totals stay on screen.
        .with_panel(single("Energy", KWH, kwh(f"sum(last_over_time({energy}[{RANGE}]))")))
        .with_panel(
            single("Emissions", GRAMS, f"sum(last_over_time(jouleward_job_emissions_grams_total{sel}[{RANGE}]))")
        )
        .with_panel(
            single(
                "Allocated-idle GPU energy",
                KWH,
                kwh(f"sum(last_over_time(jouleward_job_gpu_idle_energy_joules_total{sel}[{RANGE}]))"),
            )
        )
        .with_panel(single("Processes", "none", f"sum(last_over_time(jouleward_job_processes{sel}[{RANGE}]))"))
        .with_panel(
            single(
                "Finished",
                "none",
                f"max(last_over_time(jouleward_job_finished{sel}[{RANGE}]))",
                description="1 once every piece of the job has ended.",
            )
        )
        .with_row(dashboard.Row("Power and energy"))
        .with_panel(
            series(
                "Power by domain",
                "watt",
                query(f"sum by (domain) (rate({energy}[{RATE}]))", "{{domain}}"),
                stacked=True,
            )
        )
        .with_panel(
            series(
                "Power by node",
                "watt",
                query(f"sum by (instance) (rate({energy}[{RATE}]))", "{{instance}}"),
                stacked=True,
                to=TO_NODE,
            )
        )
        .with_panel(
            series(
                "Cumulative energy",
                KWH,
                query(kwh(f"sum by (domain) ({energy})"), "{{domain}}"),
                stacked=True,
            )
        )
        .with_panel(
            series(
                "Cumulative emissions",
                GRAMS,
                query(f"sum(jouleward_job_emissions_grams_total{sel})", "CO2eq"),
            )
        )
        .with_row(dashboard.Row("Efficiency"))
        .with_panel(
            series(
                "Energy per unit of work",
                "joule",
                query(
                    f"cluster_job_namespace_job_id_job_name_unit:jouleward_job_energy_joules_per_work_unit:ratio_rate5m{sel}",
                    "J per {{unit}} {{job_id}}",
                ),
                description="Joules per sample, token or request over the last five minutes, across all nodes.",
            )
        )
        .with_panel(
            series(
                "Emissions per 1,000 units of work",
                GRAMS,
                query(
                    "cluster_job_namespace_job_id_job_name_unit:"
                    f"jouleward_job_emissions_grams_per_kilo_work_unit:ratio_rate5m{sel}",
                    "g per 1k {{unit}} {{job_id}}",
                ),
                description="gCO2eq per 1,000 tokens, samples or requests over the last five minutes, PUE included.",
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
                "Energy per unit of work, per served model",
                "joule",
                query(
                    "sum by (model, unit) (cluster_job_namespace_job_id_job_name_model_unit:"
                    f"jouleward_job_served_energy_joules:rate5m{sel})"
                    f" / (sum by (model, unit) (rate(jouleward_job_served_work_units_total{sel}[5m])) > 0)",
                    "J per {{unit}} {{model}}",
                ),
                description=(
                    "Joules per generated token or request of each model the job's serving engine reports,"
                    " over the last five minutes; a job serving several models shares its energy among"
                    " them by their share of the work."
                ),
            )
        )
        .with_panel(
            series(
                "Served work rate by model",
                "none",
                query(
                    f"sum by (model, unit) (rate(jouleward_job_served_work_units_total{sel}[{RATE}]))",
                    "{{model}} {{unit}}/s",
                ),
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
                "Allocated-idle share of GPU energy",
                "percentunit",
                query(
                    f"sum by (job_id) (rate(jouleward_job_gpu_idle_energy_joules_total{sel}[{RATE}]))"
                    f' / (sum by (job_id) (rate(jouleward_job_energy_joules_total{{{JOB}, domain="gpu"}}[{RATE}])) > 0)',
                    "{{job_id}}",
                ),
                description="Share of the job's GPU energy spent on GPUs allocated to it but idle.",
            )
        )
        .with_panel(
            series(
                "GPUs allocated",
                "none",
                query(f"sum by (instance) (jouleward_job_gpus_allocated{sel})", "{{instance}} allocated", "A"),
                query(
                    f"sum by (instance) (jouleward_job_gpus_unallocated_use{sel})",
                    "{{instance}} used without allocation",
                    "B",
                ),
                description="GPUs (MIG devices, time-sliced replicas) the scheduler gave the job, and GPUs it "
                "used without being given them (charged by use).",
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
        .with_panel(listing("Pieces of the job", f"jouleward_job_info{sel}", w=24))
    )


def node() -> dashboard.Dashboard:
    sel = f"{{{NODE}}}"
    return (
        base(
            "jouleward-node",
            "jouleward / Node",
            "Every device of a node, where its energy went, and the agent's own health and cost.",
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
                    f"sum by (instance, domain, device, source) (rate(jouleward_node_energy_joules_total{sel}[{RATE}]))",
                    "{{instance}} {{device}} ({{source}})",
                ),
            )
        )
        .with_panel(
            series(
                "Where the energy went",
                "watt",
                query(
                    f"sum by (domain) (rate(jouleward_job_energy_joules_total{sel}[{RATE}]))", "jobs {{domain}}", "A"
                ),
                query(
                    f"sum by (domain) (rate(jouleward_idle_energy_joules_total{sel}[{RATE}]))", "idle {{domain}}", "B"
                ),
                query(
                    f"sum by (domain) (rate(jouleward_unattributed_energy_joules_total{sel}[{RATE}]))",
                    "unattributed {{domain}}",
                    "C",
                ),
                stacked=True,
                description="Jobs, idle and unattributed add up to the measured cpu, dram and gpu power.",
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
                query(f"jouleward_gpu_utilization_ratio{sel}", "{{instance}} gpu {{gpu}}"),
            )
        )
        .with_row(dashboard.Row("GPU allocation"))
        .with_panel(
            series(
                "Jobs allocated each GPU",
                "none",
                query(f"jouleward_gpu_allocated_jobs{sel}", "{{instance}} gpu {{gpu}}"),
                w=8,
                description="0: allocated to nobody (its idle stays the node's); 2 and more: time-sliced sharing.",
            )
        )
        .with_panel(
            series(
                "GPU power left by the allocation",
                "watt",
                query(
                    f"sum by (instance, gpu) (rate(jouleward_gpu_unallocated_idle_energy_joules_total{sel}[{RATE}]))",
                    "{{instance}} gpu {{gpu}} unallocated idle",
                    "A",
                ),
                query(
                    f"sum by (instance, gpu) (rate(jouleward_gpu_unallocated_use_energy_joules_total{sel}[{RATE}]))",
                    "{{instance}} gpu {{gpu}} used without allocation",
                    "B",
                ),
                w=8,
                description="Idle power of GPUs allocated to nobody, and power of jobs on GPUs not allocated to them.",
            )
        )
        .with_panel(
            series(
                "MIG instance power",
                "watt",
                query(
                    "sum by (instance, gpu, GPU_I_ID, source) "
                    f"(rate(jouleward_gpu_instance_energy_joules_total{sel}[{RATE}]))",
                    "{{instance}} gpu {{gpu}} instance {{GPU_I_ID}} ({{source}})",
                ),
                w=8,
                description="Each MIG instance's share of its GPU: by instance activity where NVML reports it, "
                "else by slices.",
            )
        )
        .with_panel(
            series(
                "GPU allocation sources",
                "none",
                query(f"jouleward_gpu_allocation_up{sel}", "{{instance}} {{source}} up", "A"),
                query(f"jouleward_gpu_allocation_stale{sel}", "{{instance}} {{source}} stale", "B"),
                w=8,
                description="The kubelet's pod-resources API and Slurm's mapping directory: up, and stale "
                "(the last allocation read stays in force).",
            )
        )
        .with_row(dashboard.Row("Agent health"))
        .with_panel(
            series(
                "Ticks per second",
                "none",
                query(f"rate(jouleward_ticks_total{sel}[{RATE}])", "{{instance}}"),
                w=8,
                description="Zero while the sampler is stalled.",
            )
        )
        .with_panel(
            series(
                "Sensors up",
                "none",
                query(f"jouleward_sensor_up{sel}", "{{instance}} {{sensor}} {{device}}"),
                w=8,
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
                w=8,
            )
        )
        .with_panel(
            series(
                "Kubelet",
                "none",
                query(f"jouleward_kubelet_up{sel}", "{{instance}} up", "A"),
                query(f"jouleward_kubelet_metadata_stale{sel}", "{{instance}} stale", "B"),
                w=8,
                description="Pod metadata from the kubelet: up, and stale (last poll failed or overdue).",
            )
        )
        .with_panel(
            series(
                "Ledger",
                "s",
                query(f"time() - jouleward_ledger_flush_timestamp_seconds{sel}", "{{instance}} flush age", "A"),
                query(f"increase(jouleward_ledger_errors_total{sel}[{RATE}])", "{{instance}} errors", "B"),
                w=8,
            )
        )
        .with_panel(
            series(
                "Carbon provider",
                GRAMS_PER_KWH,
                query(f"jouleward_grid_carbon_intensity_grams_per_kwh{sel}", "{{instance}} {{zone}} ({{source}})", "A"),
                query(f"increase(jouleward_carbon_intensity_errors_total{sel}[{RATE}])", "{{instance}} errors", "B"),
                w=8,
                description="The intensity in force and its source (fallback_* while the live provider fails).",
            )
        )
        .with_panel(
            series(
                "Jobs and processes",
                "none",
                query(f"sum by (state) (jouleward_jobs{sel})", "jobs {{state}}", "A"),
                query(f"sum(jouleward_processes{sel})", "processes", "B"),
                query(
                    f'sum(jouleward_job_processes{{{NODE}, job_id="_other"}}) or vector(0)',
                    "processes past the export cap",
                    "C",
                ),
            )
        )
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
