"""``jouleward doctor``: which sensors this host offers, and exactly why not."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

from agent.config import Config
from agent.sensors.cpu_model import build_cpu_model, read_cpu_identity
from agent.sensors.hwmon import discover as discover_hwmon
from agent.sensors.powercap import PowercapSensor, describe_read_error
from agent.sensors.powercap import discover as discover_powercap


@dataclass(frozen=True)
class Finding:
    sensor: str
    usable: bool
    measured: bool  # a measurement, not a model
    detail: str


def _is_virtual_machine(config: Config) -> bool:
    try:
        if " hypervisor" in (config.procfs / "cpuinfo").read_text(errors="replace"):
            return True
    except OSError:
        pass
    return False


def _powercap_findings(config: Config) -> list[Finding]:
    root = config.sysfs / "class" / "powercap"
    if not root.is_dir():
        if _is_virtual_machine(config):
            why = "no powercap interface: this is a virtual machine, and hypervisors do not expose RAPL"
        elif not (config.sysfs / "module" / "intel_rapl_common").exists():
            why = "no powercap interface: the intel_rapl_common kernel module is not loaded (modprobe intel_rapl_msr)"
        else:
            why = f"no powercap interface under {root}"
        return [Finding("powercap", False, True, why)]
    zones, problems = discover_powercap(config.sysfs)
    findings = [Finding("powercap", False, True, f"{p.zone_id}: {p.reason}") for p in problems]
    if not zones:
        findings.append(Finding("powercap", False, True, f"no RAPL zones with an energy counter under {root}"))
    for zone in zones:
        role = f"{zone.domain}/{zone.device}" if zone.domain else f"{zone.device} (inside its package, not added)"
        raw = PowercapSensor.read_raw_zone(zone)
        if isinstance(raw, int):
            findings.append(Finding("powercap", bool(zone.domain), True, f"{zone.zone_id} {role}: energy_uj={raw}"))
        else:
            findings.append(Finding("powercap", False, True, f"{zone.zone_id} {role}: {describe_read_error(raw)}"))
    return findings


def _hwmon_findings(config: Config) -> list[Finding]:
    channels = discover_hwmon(config.sysfs)
    if not channels:
        return [Finding("hwmon", False, True, "no power or energy channels under class/hwmon")]
    return [Finding("hwmon", True, True, f"{c.chip} {c.label}: {c.kind} channel, domain {c.domain}") for c in channels]


def _gpu_findings(config: Config) -> list[Finding]:
    if not config.gpu_enabled:
        return [Finding("nvml", False, True, "GPUs switched off in the configuration (gpu_enabled = false)")]
    from agent.sensors.nvml import diagnose

    return [
        Finding("nvml", usable, True, detail)
        for usable, detail in diagnose(config.gpu_visible_devices, config.gpu_power_sample_interval_s)
    ]


def _allocation_findings(config: Config) -> list[Finding]:
    """Where GPU allocation comes from (docs/gpu.md, Allocation): one read of each source."""
    if not config.gpu_enabled:
        return []
    from agent.workloads.allocation import AllocationError, SlurmMapReader
    from agent.workloads.podresources import pod_devices_of

    findings = []
    if config.pod_resources_active:
        socket = config.pod_resources_socket
        try:
            devices, allocatable = pod_devices_of(socket, config.pod_resources_timeout_s)
        except AllocationError as exc:
            findings.append(Finding("gpualloc", False, False, f"kubelet pod-resources: {exc}"))
        else:
            pods = len({(namespace, name) for namespace, name, _ in devices})
            findings.append(
                Finding(
                    "gpualloc",
                    True,
                    False,
                    f"kubelet pod-resources at {socket}: {len(devices)} GPU device(s) allocated to {pods} pod(s),"
                    f" {allocatable} allocatable",
                )
            )
    if config.slurm_gpu_job_map_dir is not None:
        try:
            read = SlurmMapReader(config.slurm_gpu_job_map_dir)()
        except AllocationError as exc:
            findings.append(Finding("gpualloc", False, False, f"Slurm GPU job map: {exc}"))
        else:
            jobs = len({a.job.id for a in read.allocations})
            skipped = f", {read.unmapped} file(s) unlike the convention skipped" if read.unmapped else ""
            findings.append(
                Finding(
                    "gpualloc",
                    True,
                    False,
                    f"Slurm GPU job map {config.slurm_gpu_job_map_dir}: {len(read.allocations)} allocation(s)"
                    f" of {jobs} job(s){skipped}",
                )
            )
    if not findings:
        findings.append(
            Finding(
                "gpualloc",
                False,
                False,
                "no GPU allocation source (pod-resources socket or slurm_gpu_job_map_dir): "
                "GPU idle is charged to the jobs holding a context",
            )
        )
    return findings


def _other_users_process(procfs: Path) -> tuple[int, int] | None:
    """(pid, uid) of a live process of another uid than the agent's."""
    me = os.geteuid()
    try:
        entries = os.listdir(procfs)
    except OSError:
        return None
    for name in entries:
        if name.isdigit():
            try:
                uid = os.stat(procfs / name).st_uid
            except OSError:
                continue
            if uid != me:
                return int(name), uid
    return None


def _attribution_findings(config: Config) -> list[Finding]:
    """Env labels (JOULEWARD_JOB, SLURM_JOB_NAME) and exe rules read other
    users' /proc/<pid>/environ and exe: that needs CAP_SYS_PTRACE, which
    neither shipped deployment grants. Found by trying."""
    found = _other_users_process(config.procfs)
    if found is None:
        return [
            Finding(
                "procfs",
                False,
                False,
                "no process of another user runs now: cannot tell whether other users' environ and exe are readable",
            )
        ]
    pid, uid = found
    try:
        (config.procfs / str(pid) / "environ").read_bytes()
        os.readlink(config.procfs / str(pid) / "exe")
    except FileNotFoundError:
        return [Finding("procfs", False, False, f"pid {pid} (uid {uid}) exited while being read; run doctor again")]
    except PermissionError as exc:
        return [
            Finding(
                "procfs",
                False,
                False,
                f"cannot read {exc.filename} of uid {uid}: {exc.strerror}. Without CAP_SYS_PTRACE (the "
                "shipped systemd unit and DaemonSet grant none) JOULEWARD_JOB labels, Slurm job names and "
                "exe rules see only the agent's own uid's processes; use cmdline rules, the jouleward.io/job "
                "pod annotation, or register jobs (a Slurm prolog; docs/jobs.md)",
            )
        ]
    except OSError as exc:
        return [Finding("procfs", False, False, f"cannot read /proc/{pid} of uid {uid}: {exc.strerror}")]
    return [
        Finding(
            "procfs",
            True,
            False,
            f"other users' environ and exe are readable (tried pid {pid}, uid {uid}): "
            "JOULEWARD_JOB labels, Slurm job names and exe rules work for every user",
        )
    ]


def examine(config: Config) -> list[Finding]:
    findings = _powercap_findings(config) + _hwmon_findings(config) + _gpu_findings(config)
    measured_cpu = any(f.usable and f.measured and ("cpu/" in f.detail or "domain cpu" in f.detail) for f in findings)
    model = build_cpu_model(
        read_cpu_identity(config.procfs),
        config.cpu_tdp_w,
        config.cpu_idle_w,
        config.cpu_max_w,
        config.cpu_idle_fraction,
    )
    if measured_cpu:
        findings.append(Finding("cpu_model", False, False, "not needed: the CPU is measured"))
    else:
        findings.append(
            Finding(
                "cpu_model",
                True,
                False,
                f"CPU estimated from utilisation: idle {model.idle_w:.1f} W,"
                f" max {model.max_w:.1f} W (TDP from {model.tdp_source})",
            )
        )
    return findings + _allocation_findings(config) + _attribution_findings(config)


def report(findings: list[Finding]) -> tuple[str, int]:
    """The text to print and the exit code: 0 when something measures energy,
    1 when only the utilisation model is available."""
    lines = []
    for finding in findings:
        mark = "ok " if finding.usable else "-- "
        lines.append(f"{mark}{finding.sensor:10} {finding.detail}")
    measured = any(f.usable and f.measured for f in findings)
    lines.append("")
    lines.append(
        "energy is measured"
        if measured
        else "no energy counters: the agent runs on the utilisation model (source=\"model\")"
    )
    return "\n".join(lines), 0 if measured else 1


def command(args: argparse.Namespace) -> int:
    """``jouleward doctor``: exit 0 when energy is measured, 1 when only modelled."""
    from agent.cli.common import config_from_args

    text, code = report(examine(config_from_args(args)))
    print(text)
    return code
