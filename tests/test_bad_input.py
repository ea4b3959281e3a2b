"""Bad input: malformed configuration and flags, awkward job names and
labels in the exposition, and an unbounded stream of distinct job names."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.api.read import create_control_app
from agent.config import Config, ConfigError, build
from agent.pipeline.daemon import Agent
from exporters.prometheus import RenderCache
from tests.faultkit import ROOT, FakeProcfs, Powercap, as_local_peer, boot_ticks, parse_exposition, value

# -- configuration files and flags ---------------------------------------------------
KEYS = [f.name for f in dataclasses.fields(Config)] + ["agent", "bogus", "interval", "rules"]


def to_toml(item) -> str:
    """A TOML value (inline form) for a JSON-like Python value."""
    if isinstance(item, bool):
        return "true" if item else "false"
    if isinstance(item, float):
        return (
            "nan" if math.isnan(item) else ("inf" if item == math.inf else "-inf" if item == -math.inf else repr(item))
        )
    if isinstance(item, (int, str)):
        return json.dumps(item, ensure_ascii=False)
    if isinstance(item, list):
        return "[" + ", ".join(to_toml(v) for v in item) + "]"
    return "{" + ", ".join(f"{json.dumps(k, ensure_ascii=False)} = {to_toml(v)}" for k, v in item.items()) + "}"


text = st.text(st.characters(exclude_categories=("Cs",)), max_size=20)  # TOML cannot hold surrogates
scalars = st.one_of(st.booleans(), st.integers(-(10**6), 10**12), st.floats(), text)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(text, inner, max_size=3)),
    max_leaves=6,
)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.dictionaries(st.sampled_from(KEYS), values, min_size=1, max_size=3))
def test_any_config_file_loads_or_names_the_key(document):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "jouleward.toml"
        path.write_text("\n".join(f"{key} = {to_toml(item)}" for key, item in document.items()) + "\n")
        try:
            build(file_path=path, environ={})
        except ConfigError as exc:
            message = str(exc)
            assert "\n" not in message
            assert str(path) in message
            named = set(document) | set(document["agent"] if isinstance(document.get("agent"), dict) else ())
            assert (
                any(key in message or repr(key) in message for key in named)
                or "[agent]" in message
                or "not valid TOML" in message
            ), message


FLAGS = ["listen", "state_dir", "control_socket", "sysfs", "procfs", "interval_s"]


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(FLAGS), st.text(max_size=30))
def test_any_flag_value_is_accepted_or_names_the_flag(flag, text):
    try:
        build(flags={flag: text}, environ={})
    except ConfigError as exc:
        shown = "--" + {"interval_s": "interval"}.get(flag, flag.replace("_", "-"))
        assert str(exc).startswith(shown + ":"), str(exc)


@pytest.mark.parametrize(
    ("content", "args", "named"),
    [
        ('interval_s = "fast"\n', [], "interval_s"),
        ("rules = 5\n", [], "rules"),
        ('[[rules]]\nname = "a"\ncmdline = "("\n', [], "rules[0].cmdline"),
        ("[idle_power_w]\ncpu = -3\n", [], "idle_power_w.cpu"),
        ("listen = 9883\n", [], "listen"),
        ('node_name = "gpu\\u0007node"\n', [], "node_name"),
        ("no_such_key = 1\n", [], "no_such_key"),
        ("interval_s = \n", [], "not valid TOML"),
        ("", ["--interval", "0"], "--interval"),
        ("", ["--listen", "127.0.0.1:99999"], "--listen"),
        ("", ["--no-such-flag"], "--no-such-flag"),
    ],
)
def test_cli_rejects_bad_config_with_one_message_and_exit_2(tmp_path, content, args, named):
    config = tmp_path / "jouleward.toml"
    config.write_text(content)
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOULEWARD_")}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "agent.cli",
            "run",
            "--config",
            str(config),
            "--state-dir",
            str(tmp_path / "state"),
            *args,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("jouleward: error:")]
    assert len(errors) == 1 and named in errors[0], result.stderr
    assert "Traceback" not in result.stderr


# -- names and labels in the exposition ----------------------------------------------------
AWKWARD = ['say "hi"', "back\\slash", "ünïcødé ✓ 训练", "trailing\\", 'mix "\\" ðŸ', "a{b}=c,d"]


def _promtool_check(text: bytes) -> None:
    result = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, timeout=60)
    assert result.returncode == 0, (result.stdout + result.stderr).decode()


def test_awkward_names_and_labels_survive_exposition(tmp_path):
    from starlette.testclient import TestClient

    procfs = FakeProcfs(tmp_path / "proc")
    for index, name in enumerate(AWKWARD):  # env labels may even hold newlines
        procfs.add(200 + index, boot_ticks() - 100, 0, env={"JOULEWARD_JOB": name + "\nline two"})
    for index in range(len(AWKWARD)):  # one process per registration: a process belongs to one job
        procfs.add(300 + index, boot_ticks() - 100, 0)
    Powercap(tmp_path / "sys")
    agent = Agent(
        dataclasses.replace(Config(), procfs=procfs.root, sysfs=tmp_path / "sys", state_dir=tmp_path / "state")
    )
    client = TestClient(as_local_peer(create_control_app(agent)))
    registered = {}
    for index, name in enumerate(AWKWARD):
        response = client.post("/v1/jobs", json={"name": name, "pids": [300 + index], "labels": {"note": name}})
        assert response.status_code == 201, response.text
        registered[response.json()["id"]] = name
    for bad in ("new\nline", "tab\there", "nul\x00", "c1\x85inside"):
        response = client.post("/v1/jobs", json={"name": bad, "pids": [300]})
        assert response.status_code == 422 and "control characters" in response.json()["detail"], response.text
    agent.tick()
    agent.tick()
    text = RenderCache(lambda: agent.snapshot).render()
    _promtool_check(text)
    samples = parse_exposition(text.decode())
    for job_id, name in registered.items():
        assert value(samples, "jouleward_job_info", job_id=job_id, job_name=name, label_note=name) == 1.0
    for name in AWKWARD:
        assert value(samples, "jouleward_job_processes", job_id=f"env-{name}\nline two") == 1.0
    agent.close()


# -- an unbounded stream of job names -------------------------------------------------------
def _name_stream(tmp_path: Path, total: int, batch: int = 1000, cap: int = 50) -> None:
    procfs = FakeProcfs(tmp_path / "proc")
    rapl = Powercap(tmp_path / "sys")
    agent = Agent(
        dataclasses.replace(
            Config(),
            procfs=procfs.root,
            sysfs=tmp_path / "sys",
            state_dir=tmp_path / "state",
            max_exported_jobs=cap,
            finished_job_retention_s=0.0,
            flush_interval_s=0.0,
        )
    )
    agent.tick()
    cache = RenderCache(lambda: agent.snapshot)
    sizes = []
    pid = 1000
    for round_index in range(total // batch):
        pids = list(range(pid, pid + batch))
        pid += batch
        for p in pids:
            procfs.add(p, boot_ticks() + 1000, 1, env={"JOULEWARD_JOB": f"job-{p}"})
        procfs.advance_node(batch, batch)
        rapl.advance("intel-rapl:0", 100)
        agent.tick()
        samples = parse_exposition(cache.render().decode())
        exported = {labels for name, labels in samples if name == "jouleward_job_processes"}
        assert len(exported) <= cap + 1  # the cap, plus `_other`
        for p in pids:
            procfs.remove(p)
        procfs.advance_node(0, batch)
        agent.tick()
        sizes.append(
            (
                len(agent.ledger.jobs),
                sum(agent.ledger.exposition_size()),
                len(agent.registry.jobs),
                len(agent.scanner._facts),
                len(agent.resolver._static),
            )
        )
    # Memory stays bounded: nothing in memory grows with the names seen.
    assert max(max(s) for s in sizes) <= batch + cap + 1, sizes[-3:]
    assert sizes[-1] == sizes[len(sizes) // 2], sizes
    agent.close()
    db = sqlite3.connect(tmp_path / "state" / "ledger.sqlite3")
    try:
        assert db.execute("SELECT count(*) FROM jobs").fetchone()[0] == total
        for domain in ("cpu", "dram"):
            node = db.execute(
                "SELECT coalesce(sum(energy_j), 0) FROM node_energy WHERE domain = ?", (domain,)
            ).fetchone()[0]
            jobs = db.execute(
                "SELECT coalesce(sum(energy_j), 0) FROM job_energy WHERE domain = ?", (domain,)
            ).fetchone()[0]
            idle, unattributed = db.execute(
                "SELECT idle_j, unattributed_j FROM domain_totals WHERE domain = ?", (domain,)
            ).fetchone() or (0.0, 0.0)
            assert node > 0 or domain == "dram"
            assert jobs + idle + unattributed == pytest.approx(node, rel=1e-9, abs=1e-6)
    finally:
        db.close()


def test_many_distinct_job_names(tmp_path):
    _name_stream(tmp_path, total=5_000)


@pytest.mark.slow
def test_one_hundred_thousand_distinct_job_names(tmp_path):
    _name_stream(tmp_path, total=100_000)
