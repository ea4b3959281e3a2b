"""Two real PyTorch processes on GPU 0, alone and together, measured with the
agent's NVML sensor and split with its GPU attribution. Prints one JSON report.

Reads only: it never changes clocks, power limits, MIG or persistence mode.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

from agent.attribution.gpu import attribute_gpus
from agent.model import TickContext
from agent.sensors.nvml import NvmlSensor

WORKER = Path(__file__).with_name("worker.py")
CTX = TickContext(1.0, 0.0, 0.0)


def measure(sensor, seconds, job_of, idle_w):
    """Energy per job on gpu-0 over ``seconds`` of 1 s ticks, plus what NVML showed."""
    sensor.sample(CTX)
    jobs, allocated, measured, ticks, seen = {}, {}, 0.0, 0, []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(1.0)
        energies = [e for e in sensor.sample(CTX) if e.device == "gpu-0"]
        views = sensor.views()
        result = attribute_gpus(energies, views, {"gpu-0": idle_w}, job_of)
        for split in result.devices:
            measured += split.measured_j
            for job, joules in split.jobs_j.items():
                jobs[job] = jobs.get(job, 0.0) + joules
            for job, joules in split.allocated_idle_j.items():
                allocated[job] = allocated.get(job, 0.0) + joules
        view = views.get("gpu-0")
        if view:
            seen.append(
                {
                    "utilization": view.utilization_ratio,
                    "method": view.split_method,
                    "processes": [[p.pid, p.sm_utilization_pct, p.used_memory_bytes] for p in view.processes],
                }
            )
        ticks += 1
    active = {job: jobs[job] - allocated.get(job, 0.0) for job in jobs}
    return {
        "measured_j": measured,
        "jobs_j": jobs,
        "active_j": active,
        "allocated_idle_j": allocated,
        "ticks": ticks,
        "nvml": seen[-3:],
    }


def start(duty):
    proc = subprocess.Popen([sys.executable, str(WORKER), str(duty)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def main(seconds=10.0):
    sensor = NvmlSensor(visible_devices="0", power_sample_interval_s=0.05)
    report = {"driver": sensor.driver_version}
    try:
        baseline = measure(sensor, 5.0, {}, None)
        idle_w = baseline["measured_j"] / max(baseline["ticks"], 1)
        report["idle_w_unheld"] = idle_w
        alone = {}
        for name, duty in (("heavy", 0.9), ("light", 0.3)):
            proc = start(duty)
            try:
                alone[name] = measure(sensor, seconds, {proc.pid: name}, idle_w)
            finally:
                proc.kill()
                proc.wait()
        report["alone"] = alone
        heavy, light = start(0.9), start(0.3)
        try:
            report["together"] = measure(sensor, seconds, {heavy.pid: "heavy", light.pid: "light"}, idle_w)
        finally:
            for proc in (heavy, light):
                proc.kill()
                proc.wait()
    finally:
        sensor.close()
    a, b = alone["heavy"]["active_j"]["heavy"], alone["light"]["active_j"]["light"]
    together = report["together"]["active_j"]
    report["heavy_share_alone"] = a / (a + b)
    report["heavy_share_together"] = together["heavy"] / (together["heavy"] + together["light"])
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
