"""Serving engines' /metrics as work sources, against stand-in engines on loopback."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.workloads.engines import Engine, WorkSourceError, increase, parse_exposition
from agent.workloads.kubelet import PodMeta
from agent.workloads.worksources import listening_endpoints, pod_targets
from tests.support import REPO, AgentProcess, free_port, metric_values, two_socket_server, wait_until
from tests.support.engines import EngineServer, render

ENGINES = ("vllm", "sglang", "tgi", "triton", "llamacpp")
# Which stand-in counter feeds which unit, per engine (docs/jobs.md, "Work units").
UNITS = {
    "vllm": {"prompt": "tokens_prompt", "generated": "tokens_generated", "requests": "requests"},
    "sglang": {"prompt": "tokens_prompt", "generated": "tokens_generated", "requests": "requests"},
    "tgi": {"prompt": "tokens_prompt", "generated": "tokens_generated", "requests": "requests"},
    "triton": {"requests": "requests", "inferences": "inferences"},
    "llamacpp": {"prompt": "tokens_prompt", "generated": "tokens_generated"},
}
VLLM_JOB = "rule-serve-vllm"
START = {"prompt": 5000.0, "generated": 1000.0, "requests": 40.0, "inferences": 90.0}


def _series(text: str, engine: str | None = None) -> dict[tuple[str, str], float]:
    reading = parse_exposition(text, Engine(engine) if engine else None)
    out: dict[tuple[str, str], float] = {}
    for (unit, model, _labels), value in reading.series.items():
        out[(unit, model)] = out.get((unit, model), 0.0) + value
    return out


@pytest.mark.parametrize("engine", ENGINES)
def test_each_engine_format_is_detected_and_read(engine):
    counters = {"prompt": 123.0, "generated": 45.0, "requests": 8.0, "inferences": 19.0}
    reading = parse_exposition(render(engine, counters))
    assert reading.engine == engine
    totals: dict[str, float] = {}
    for (unit, _model, _labels), value in reading.series.items():
        totals[unit] = totals.get(unit, 0.0) + value
    assert totals == {unit: counters[name] for name, unit in UNITS[engine].items()}


def test_models_are_kept_where_the_engine_labels_them():
    assert _series(render("vllm", {"generated": 7}, model="a"))[("tokens_generated", "a")] == 7
    assert _series(render("triton", {"inferences": 5}))[("inferences", "resnet50")] == 5
    assert _series(render("llamacpp", {"generated": 3}))[("tokens_generated", "")] == 3


def test_garbage_and_foreign_metrics_are_errors_not_zeroes():
    for text in ("\x00\xff<html>", 'vllm:generation_tokens_total{model_name="x" 9\n', "node_cpu_seconds_total 5\n"):
        with pytest.raises(WorkSourceError):
            parse_exposition(text)
    # A named engine does not accept another engine's counters.
    with pytest.raises(WorkSourceError):
        parse_exposition(render("sglang", {"generated": 3}), Engine.VLLM)


def test_increase_counts_resets_from_zero_and_never_goes_negative():
    key = ("tokens_generated", "m", (("__name__", "x"),))
    other = ("tokens_generated", "m", (("__name__", "y"),))
    assert increase(None, {key: 500.0}) == {}  # the baseline counts nothing
    assert increase({key: 500.0}, {key: 650.0}) == {("tokens_generated", "m"): 150.0}
    assert increase({key: 650.0}, {key: 40.0}) == {("tokens_generated", "m"): 40.0}  # restart
    # A series born after the baseline started at zero; one that resets does not eat the other's progress.
    assert increase({key: 10.0}, {key: 12.0, other: 5.0}) == {("tokens_generated", "m"): 7.0}
    assert increase({key: 10.0, other: 5.0}, {key: 1.0, other: 9.0}) == {("tokens_generated", "m"): 5.0}


def test_pod_annotation_names_the_endpoint_at_the_pod_ip():
    pod = PodMeta(
        uid="u1",
        name="llama-0",
        namespace="serve",
        labels={"batch.kubernetes.io/job-name": "llama"},
        annotations={"jouleward.io/work-metrics": "8000/metrics", "jouleward.io/work-engine": "vllm"},
        pod_ip="10.1.2.3",
    )
    bad = PodMeta(
        uid="u2", name="x", namespace="serve", annotations={"jouleward.io/work-metrics": "99999"}, pod_ip="10.1.2.4"
    )
    no_ip = PodMeta(uid="u3", name="y", namespace="serve", annotations={"jouleward.io/work-metrics": "8000"})
    targets = pod_targets([pod, bad, no_ip], ("batch.kubernetes.io/job-name",))
    assert [(t.job_id, t.url, t.engine) for t in targets] == [
        ("k8s-serve.llama", "http://10.1.2.3:8000/metrics", Engine.VLLM)
    ]


def test_listening_sockets_of_a_process_are_found(processes, tmp_path):
    port = free_port()
    child = subprocess.Popen(
        [sys.executable, str(REPO / "tests/support/engines.py"), "vllm", str(port), str(tmp_path / "none.json")]
    )
    processes.append(child)
    wait_until(lambda: listening_endpoints(Path("/proc"), child.pid), 10, what="the child listening")
    assert listening_endpoints(Path("/proc"), child.pid) == [("127.0.0.1", port)]


def _work(agent: AgentProcess) -> dict[tuple[str, str], float]:
    return {
        (labels["job_name"], labels["unit"]): value
        for labels, value in metric_values(agent.metrics(), "jouleward_job_work_units_total")
    }


def _sources(agent: AgentProcess) -> dict[str, dict[str, float]]:
    samples = agent.metrics()
    out: dict[str, dict[str, float]] = {}
    for name in ("jouleward_work_source_up", "jouleward_work_source_stale", "jouleward_work_source_errors_total"):
        for labels, value in metric_values(samples, name):
            out.setdefault(labels["job_id"], {})[name] = value
    return out


def test_agent_books_exactly_the_engines_counter_increases(tmp_path, processes, agents):
    """A realistic run of five engines: counters rise, two restart, one hangs,
    one answers garbage, one a 50 MB body; the agent books exactly the increases."""
    tree = two_socket_server(tmp_path / "sys")
    servers = {engine: EngineServer(engine, START) for engine in ENGINES}
    rules, sources = [], []
    for engine, server in servers.items():
        marker = f"engine-stand-in={engine}"
        processes.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", marker]))
        rules.append(f'[[rules]]\nname = "serve-{engine}"\ncmdline = "{marker}"\n')
        # vLLM is named, the others are detected from their metric names.
        named = 'engine = "vllm"\n' if engine == "vllm" else ""
        sources.append(f'[[work_sources]]\njob = "^serve-{engine}$"\nurl = "{server.url}"\n{named}')
    config = tmp_path / "jouleward.toml"
    config.write_text(
        "work_source_poll_s = 0.2\nwork_source_timeout_s = 0.5\nwork_source_discovery = false\n"
        + "\n".join(rules + sources)
    )
    expected = {(f"serve-{e}", unit): 0.0 for e in ENGINES for unit in UNITS[e].values()}

    def book(engine: str, **delta: float) -> None:
        for name, value in delta.items():
            if name in UNITS[engine]:
                expected[(f"serve-{engine}", UNITS[engine][name])] += value

    seen: list[dict[tuple[str, str], float]] = []

    def matches() -> bool:
        work = _work(agent)
        seen.append(work)
        return all(work.get(key, 0.0) == value for key, value in expected.items())

    try:
        agent = AgentProcess(tmp_path / "state", sysfs=tmp_path / "sys", interval_s=0.2, config=config)
        agents.append(agent)
        wait_until(
            lambda: sum(s.get("jouleward_work_source_up", 0) for s in _sources(agent).values()) == 5,
            20,
            what="every engine scraped once (the baseline)",
        )
        tree.zones["intel-rapl:0"].add_j(50)
        assert matches(), "the baseline must count nothing"

        # 1. Counters rise.
        for engine, server in servers.items():
            delta = {"prompt": 300.0, "generated": 250.0, "requests": 8.0, "inferences": 32.0}
            server.add(**delta)
            book(engine, **delta)
        wait_until(matches, 15, what=f"the first increases: {expected} vs {seen[-1] if seen else None}")

        # 2. vLLM and llama.cpp restart: their counters start again from small values.
        for engine in ("vllm", "llamacpp"):
            servers[engine].restart(prompt=20, generated=40, requests=4, inferences=0)
            book(engine, prompt=20, generated=40, requests=4)
        wait_until(matches, 15, what=f"counting after a restart: {expected} vs {seen[-1]}")

        # 3. vLLM hangs: the source goes stale, the agent keeps ticking, the work done meanwhile counts later.
        servers["vllm"].hang_s = 3.0
        servers["vllm"].mode = "hang"
        wait_until(
            lambda: _sources(agent)[VLLM_JOB]["jouleward_work_source_stale"] == 1,
            15,
            what="a hanging engine marked stale",
        )
        started = time.monotonic()
        agent.wait_ticks(5, timeout_s=5)
        assert time.monotonic() - started < 3.0, "a hanging engine must not stall the tick"
        servers["vllm"].add(generated=70, prompt=7)
        book("vllm", generated=70, prompt=7)
        servers["vllm"].mode = "ok"
        wait_until(matches, 20, what=f"work done while hung: {expected} vs {seen[-1]}")

        # 4. SGLang answers garbage, then recovers.
        servers["sglang"].mode = "garbage"
        wait_until(lambda: _sources(agent)["rule-serve-sglang"]["jouleward_work_source_up"] == 0, 15, what="garbage")
        servers["sglang"].add(generated=11)
        book("sglang", generated=11)
        servers["sglang"].mode = "ok"
        wait_until(matches, 15, what=f"after garbage: {expected} vs {seen[-1]}")

        # 5. TGI sends an endless 50 MB body: cut off at the size limit, nothing booked from it.
        servers["tgi"].mode = "huge"
        wait_until(lambda: _sources(agent)["rule-serve-tgi"]["jouleward_work_source_up"] == 0, 15, what="huge body")
        errors = _sources(agent)["rule-serve-tgi"]["jouleward_work_source_errors_total"]
        assert errors >= 1
        servers["tgi"].mode = "ok"
        servers["tgi"].add(generated=5, requests=1, prompt=9)
        book("tgi", generated=5, requests=1, prompt=9)
        wait_until(matches, 15, what=f"after a huge body: {expected} vs {seen[-1]}")
        assert servers["tgi"].huge_bytes_sent < 30 * 1024 * 1024, "the agent must stop reading at its limit"

        final = _work(agent)
        assert {k: final.get(k, 0.0) for k in expected} == expected
        # Counters never went backwards at any observation.
        for earlier, later in zip(seen, seen[1:]):
            for key, value in earlier.items():
                assert later.get(key, 0.0) >= value, key
        # Per served model, where the engine labels one.
        served = {
            (labels["job_name"], labels["model"], labels["unit"]): value
            for labels, value in metric_values(agent.metrics(), "jouleward_job_served_work_units_total")
        }
        assert (
            served[("serve-vllm", "meta-llama/Llama-3.1-8B-Instruct", "tokens_generated")]
            == expected[("serve-vllm", "tokens_generated")]
        )
        assert served[("serve-triton", "resnet50", "inferences")] == expected[("serve-triton", "inferences")]
        for state in _sources(agent).values():
            assert state["jouleward_work_source_up"] == 1 and state["jouleward_work_source_stale"] == 0
    finally:
        for server in servers.values():
            server.mode = "ok"
            server.stop()


def test_known_engine_found_by_its_listening_socket(tmp_path, processes, agents):
    two_socket_server(tmp_path / "sys")
    port = free_port()
    state = tmp_path / "counters.json"
    state.write_text(json.dumps({"prompt": 900, "generated": 400, "requests": 12}))
    # The command line carries "vllm serve", as a real vLLM server's does.
    engine = subprocess.Popen(
        [sys.executable, str(REPO / "tests/support/engines.py"), "vllm", str(port), str(state), "vllm", "serve", "m"]
    )
    processes.append(engine)
    config = tmp_path / "jouleward.toml"
    config.write_text(
        'work_source_poll_s = 0.2\nwork_source_timeout_s = 0.5\n[[rules]]\nname = "llama-serve"\ncmdline = "engines.py vllm"\n'
    )
    agent = AgentProcess(tmp_path / "state", sysfs=tmp_path / "sys", interval_s=0.2, config=config)
    agents.append(agent)
    url = f"http://127.0.0.1:{port}/metrics"

    def discovered() -> bool:
        samples = agent.metrics()
        return any(
            labels["url"] == url and labels["origin"] == "socket" and labels["engine"] == "vllm" and value == 1
            for labels, value in metric_values(samples, "jouleward_work_source_up")
        )

    wait_until(discovered, 20, what="the engine found by its listening socket")
    state.write_text(json.dumps({"prompt": 950, "generated": 480, "requests": 15}))
    wait_until(
        lambda: (
            _work(agent).get(("llama-serve", "tokens_generated")) == 80
            and _work(agent).get(("llama-serve", "requests")) == 3
            and _work(agent).get(("llama-serve", "tokens_prompt")) == 50
        ),
        15,
        what=f"the discovered engine's increases, {_work(agent)}",
    )


def test_command_lines_are_kept_while_the_members_stay_and_read_again_when_a_pid_comes_back(tmp_path):
    from agent.config import WorkSourceRule
    from agent.workloads.worksources import JobMembers, WorkSourcePoller, WorkSourceSettings

    (tmp_path / "700").mkdir()
    cmdline = tmp_path / "700" / "cmdline"
    cmdline.write_bytes(b"vllm\0serve\0")
    rule = WorkSourceRule(url="http://127.0.0.1:1/metrics", cmdline="vllm")
    poller = WorkSourcePoller(WorkSourceSettings(rules=(rule,), discover_sockets=False), procfs=tmp_path)
    poller.update_jobs({"serve": JobMembers("serve", (700,))})
    assert [t.job_id for t in poller.targets()] == ["serve"]
    cmdline.write_bytes(b"sleep\0")  # not read again while the job's members are unchanged
    assert [t.job_id for t in poller.targets()] == ["serve"]
    # The pid leaves the job and comes back (another process): its command line is read again.
    poller.update_jobs({"serve": JobMembers("serve", ())})
    poller.update_jobs({"serve": JobMembers("serve", (700,))})
    assert poller.targets() == []
    poller.stop()
