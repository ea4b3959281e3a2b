"""Against real NVML on a real NVIDIA GPU; skipped everywhere else."""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _clean_env():
    env = {k: v for k, v in os.environ.items() if k not in ("LD_LIBRARY_PATH", "LD_PRELOAD", "FAKENVML_STATE")}
    env["PYTHONPATH"] = str(REPO)
    return env


def _python(code: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], env=_clean_env(), capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


@functools.cache
def _gpu_count() -> int:
    result = _python("import pynvml; pynvml.nvmlInit(); print(pynvml.nvmlDeviceGetCount())", timeout=60)
    return int(result.stdout.strip()) if result.returncode == 0 and result.stdout.strip().isdigit() else 0


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_gpu_count() == 0, reason="no NVIDIA GPU with a working NVML")]


def test_real_gpus_report_energy_and_identity():
    code = (
        "import json, time\n"
        "from agent.sensors.nvml import NvmlSensor\n"
        "from agent.model import TickContext\n"
        "s = NvmlSensor(); ctx = TickContext(1, 0, 0); s.sample(ctx); out = []\n"
        "for _ in range(3):\n"
        "    time.sleep(1); out += [(e.device, e.source, e.power_w) for e in s.sample(ctx)]\n"
        "v = s.views(); s.close()\n"
        "print(json.dumps({'energy': out, 'limits': {k: x.power_limit_w for k, x in v.items()},"
        " 'uuids': {k: x.uuid for k, x in v.items()}}))\n"
    )
    result = _python(code)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert len(report["energy"]) == 3 * _gpu_count()
    for device, source, power_w in report["energy"]:
        assert source in ("nvml_energy", "nvml_power")
        assert 1.0 < power_w < 1.5 * (report["limits"][device] or 2000.0)
        assert report["uuids"][device].startswith(("GPU-", "MIG-"))


def test_two_pytorch_processes_split_as_they_run_alone():
    if _python("import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)").returncode != 0:
        pytest.skip("PyTorch with CUDA is not installed")
    result = subprocess.run(
        [sys.executable, "-m", "tests.gpu_real.compare"],
        env=_clean_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    print(result.stdout)
    report = json.loads(result.stdout)
    assert report["heavy_share_together"] == pytest.approx(report["heavy_share_alone"], abs=0.15)
