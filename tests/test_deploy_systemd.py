"""The systemd unit passes systemd-analyze verify and scores an exposure of
3.0 or less in systemd-analyze security, while keeping what the agent needs."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "deploy" / "systemd" / "jouleward.service"
ANALYZE = shutil.which("systemd-analyze")
SYSTEM_UNITS = next((p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")) if p.is_dir()), None)

pytestmark = pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze is not installed (scripts/setup.d/60-deploy.sh)"
)


def unit_sections(text: str) -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key, []).append(value)
    return sections


def exec_path() -> str:
    return unit_sections(UNIT.read_text())["Service"]["ExecStart"][0].split()[0]


def fake_root(tmp_path: Path, unit_text: str) -> Path:
    """A root with the distribution's units, the unit under test, and an
    executable where ExecStart points, so verify checks our unit only."""
    root = tmp_path / "root"
    shutil.copytree(SYSTEM_UNITS, root / "usr/lib/systemd/system", symlinks=True)
    binary = root / exec_path().lstrip("/")
    binary.parent.mkdir(parents=True, exist_ok=True)
    binary.write_text("#!/bin/sh\nexit 0\n")
    binary.chmod(0o755)
    (root / "etc/systemd/system").mkdir(parents=True)
    (root / "etc/systemd/system/jouleward.service").write_text(unit_text)
    return root


def verify(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [ANALYZE, "verify", f"--root={root}", "/etc/systemd/system/jouleward.service"],
        capture_output=True,
        text=True,
        timeout=120,
    )


def exposure(unit: Path) -> tuple[float, subprocess.CompletedProcess]:
    done = subprocess.run(
        [ANALYZE, "security", "--offline=yes", "--threshold=30", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d)", done.stdout)
    assert match, done.stdout + done.stderr
    return float(match.group(1)), done


@pytest.mark.skipif(SYSTEM_UNITS is None, reason="no systemd unit directory to verify against")
def test_unit_verifies_cleanly(tmp_path):
    done = verify(fake_root(tmp_path, UNIT.read_text()))
    complaints = [line for line in (done.stdout + done.stderr).splitlines() if "jouleward" in line]
    assert done.returncode == 0, done.stderr
    assert complaints == []


@pytest.mark.skipif(SYSTEM_UNITS is None, reason="no systemd unit directory to verify against")
def test_verify_reports_a_broken_unit(tmp_path):
    broken = UNIT.read_text().replace("NoNewPrivileges=yes", "NoNewPrivileges=yes\nProtectKernal=yes")
    done = verify(fake_root(tmp_path, broken))
    assert "Unknown key 'ProtectKernal'" in done.stdout + done.stderr


def test_exposure_is_at_most_3():
    level, done = exposure(UNIT)
    assert level <= 3.0, done.stdout
    assert done.returncode == 0


def test_exposure_check_sees_an_unhardened_unit(tmp_path):
    plain = tmp_path / "jouleward.service"
    plain.write_text(f"[Service]\nExecStart={exec_path()} run\n")
    level, done = exposure(plain)
    assert level > 3.0
    assert done.returncode != 0


def test_unit_keeps_what_the_agent_needs():
    service = unit_sections(UNIT.read_text())["Service"]
    # No capability: root reads the root-only RAPL counters as their owner.
    assert service["CapabilityBoundingSet"] == [""]
    assert service["NoNewPrivileges"] == ["yes"]
    assert service["ProtectSystem"] == ["strict"]
    # Every process on the host must stay visible, with its real uid.
    assert service.get("ProtectProc", ["default"]) == ["default"]
    assert service.get("PrivateUsers", ["no"]) == ["no"]
    # NVIDIA device nodes stay reachable; PrivateDevices would hide them.
    assert service.get("PrivateDevices", ["no"]) == ["no"]
    assert service["DevicePolicy"] == ["closed"]
    assert any(v.startswith("char-nvidia") for v in service["DeviceAllow"])
    assert service["StateDirectory"] == ["jouleward"]
    assert "JOULEWARD_STATE_DIR=/var/lib/jouleward" in service["Environment"]
    assert service["ExecStart"][0].split()[:2] == [exec_path(), "run"]


def sh_blocks(path: Path) -> list[list[str]]:
    text = path.read_text()
    return [
        [line for line in block.split("```", 1)[0].splitlines() if line.strip()] for block in text.split("```sh\n")[1:]
    ]


def test_every_copy_of_the_install_is_the_one_the_boot_test_runs():
    """deploy/systemd/README.md's Install block is what
    test_deploy_systemd_boot.py runs; README.md and docs/deploy.md show the
    same commands."""
    readme = ROOT / "deploy" / "systemd" / "README.md"
    tested = sh_blocks(readme)[0]
    assert readme.read_text().index("## Install") < readme.read_text().index("```sh")
    assert any("requirements/runtime.lock" in line and "--require-hashes" in line for line in tested)
    assert tested[-1] == "sudo systemctl enable --now jouleward"
    exec_start = unit_sections(UNIT.read_text())["Service"]["ExecStart"][0].split()[0]
    venv = tested[0].split()[-1]
    assert tested[0] == f"sudo python3 -m venv {venv}" and exec_start == f"{venv}/bin/jouleward"
    for other in (ROOT / "README.md", ROOT / "docs" / "deploy.md"):
        assert [line.strip() for line in tested] in [[line.strip() for line in block] for block in sh_blocks(other)]
