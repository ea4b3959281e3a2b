from __future__ import annotations

import subprocess

import pytest

from tests.support import AgentProcess

# The fake NVML library's fixtures (fake_nvml, fake_nvml_library) for every test module.
pytest_plugins = ["tests.fakenvml.fixtures"]


@pytest.fixture
def processes():
    """Real child processes, killed (by PID) at the end of the test."""
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@pytest.fixture
def agents():
    """Real agent processes, stopped at the end of the test."""
    started: list[AgentProcess] = []
    yield started
    for agent in started:
        agent.stop()
