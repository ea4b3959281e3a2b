"""``jouleward doctor`` says whether other users' ``/proc/<pid>/environ`` and
``exe`` are readable, found by trying on a real process of another uid
(``nobody``), with and without the capabilities the shipped deployments drop."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.support import REPO

NOBODY = 65534
pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="a second uid and dropping capabilities need root and setpriv",
)


@pytest.fixture
def nobody_sleeps():
    proc = subprocess.Popen(["sleep", "120"], user=NOBODY, group=NOBODY, extra_groups=[])
    yield proc
    proc.kill()
    proc.wait()


def doctor(*wrapper: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOULEWARD_")}
    done = subprocess.run(
        [*wrapper, sys.executable, "-m", "agent.cli", "doctor"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**env, "PYTHONPATH": str(REPO)},
    )
    assert "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stdout.splitlines() if line[3:].startswith("procfs")]
    assert len(lines) == 1, done.stdout
    return lines[0]


def test_doctor_says_when_other_users_environ_is_unreadable(nobody_sleeps):
    # As the shipped systemd unit and DaemonSet run it: root without any capability.
    line = doctor("setpriv", "--bounding-set=-all", "--inh-caps=-all")
    assert line.startswith("-- procfs")
    assert "of uid " in line and "Permission denied" in line and "CAP_SYS_PTRACE" in line
    assert "cmdline rules" in line and "jouleward.io/job" in line and "Slurm prolog" in line


def test_doctor_says_when_other_users_environ_is_readable(nobody_sleeps):
    line = doctor()
    assert line.startswith("ok procfs") and "readable" in line
