"""schemathesis against the agent's own OpenAPI schemas: the read API on a
real agent's TCP listener, and the control API (the app the Unix socket
serves) in process, with a real Agent behind it and the test's own
credentials where the socket would supply the caller's. No 5xx, and every
response matches the schema the agent publishes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from agent.api.read import create_control_app
from agent.config import Config
from agent.pipeline.daemon import Agent
from tests.faultkit import AgentProcess, Powercap, as_local_peer


@pytest.fixture(scope="module")
def read_schema(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("fuzz-read")
    Powercap(workdir / "sys")
    agent = AgentProcess(workdir, workdir / "sys")
    agent.wait_ready()
    agent.settle()
    yield schemathesis.openapi.from_url(agent.url + "/openapi.json")
    agent.kill()
    assert "Traceback" not in agent.log


@pytest.fixture(scope="module")
def control_schema(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("fuzz-control")
    Powercap(workdir / "sys")
    config = dataclasses.replace(Config(), sysfs=workdir / "sys", state_dir=workdir / "state", procfs=Path("/proc"))
    agent = Agent(config)
    agent.tick()
    agent.tick()
    yield schemathesis.openapi.from_asgi("/openapi.json", as_local_peer(create_control_app(agent)))
    agent.close()


def _validate(case) -> None:
    case.call_and_validate()


read_api = schemathesis.pytest.from_fixture("read_schema")
control_api = schemathesis.pytest.from_fixture("control_schema")


@read_api.parametrize()
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_read_api_over_tcp(case):
    _validate(case)


@control_api.parametrize()
@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
def test_control_api(case):
    _validate(case)
