"""The systemd unit under a real systemd: Debian 12 boots with systemd as
PID 1 in a systemd-nspawn container, the agent is installed there exactly as
deploy/systemd/README.md says (its Install commands run as written, as root,
in a copy of the repository), and the running unit is checked: ready, reached
by an unprivileged user's ``jouleward wrap`` through the default control
socket, flushed by ``systemctl stop``, continued after ``start``, scored by
``systemd-analyze security`` live, and blind to the host's secrets."""

from __future__ import annotations

import json
import re
import shlex
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import metric_sum, metric_values, parse_metrics
from tests.support.debian import (
    REPO,
    WHEELS_IN_CONTAINER,
    Booted,
    boot,
    debian_rootfs,
    repo_copy,
    require_tools,
    wheelhouse,
    wheelhouse_env,
)
from tests.support.debian import assert_conserved_in_the_api as conserved

README = REPO / "deploy" / "systemd" / "README.md"
SOURCE = "/usr/local/src/jouleward"
PORT = 9883
USER = "alice"
ATTRIBUTED = ("cpu", "dram")
# Files the agent must not read, made in the container before the install.
SECRETS = {
    "/etc/ssh/ssh_host_ed25519_key": "ssh-host-key-secret",
    "/var/lib/kubelet/pki/kubelet-client-current.pem": "kubelet-client-key-secret",
    "/etc/kubernetes/kubelet.conf": "kubelet-kubeconfig-secret",
}


def readme_block(heading: str) -> list[str]:
    """The command lines of the first ```sh block under ``## heading``."""
    text = README.read_text()
    section = text.split(f"## {heading}\n", 1)[1]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def as_root(line: str) -> str:
    return line.removeprefix("sudo ")


@pytest.fixture(scope="module")
def system(tmp_path_factory) -> Iterator[Booted]:
    require_tools("debootstrap", "systemd-nspawn", "unshare", "nsenter")
    rootfs = debian_rootfs()
    work = tmp_path_factory.mktemp("systemd-boot")
    source = repo_copy(work / "src")
    wheels = wheelhouse(rootfs, source / "requirements" / "runtime.lock")
    binds = [f"--bind={source}:{SOURCE}", f"--bind-ro={wheels}:{WHEELS_IN_CONTAINER}"]
    booted = boot(rootfs, work / "console.log", binds)
    try:
        secrets = "\n".join(
            f"mkdir -p {shlex.quote(str(Path(p).parent))} && printf %s {shlex.quote(v)} > {p} && chmod 0600 {p}"
            for p, v in SECRETS.items()
        )
        booted.sh(f"{secrets}\nuseradd --create-home {USER}")
        # No periodic flush while the test runs: what is on disk after
        # `systemctl stop` was written by the stop.
        booted.sh("echo JOULEWARD_FLUSH_INTERVAL_S=3600 > /etc/default/jouleward")
        # The container has no network: pip's index is the wheel directory.
        install_env = wheelhouse_env(WHEELS_IN_CONTAINER)
        for line in readme_block("Install"):
            done = booted.sh(as_root(line), cwd=SOURCE, env=install_env, check=False)
            assert done.returncode == 0, f"{line}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        yield booted
    finally:
        booted.container.stop()


def metrics(system: Booted):
    status, text = system.container.http("GET", "/metrics", PORT)
    assert status == 200 and isinstance(text, str), text
    return parse_metrics(text)


def wait_ready(system: Booted, timeout_s: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        try:
            status, last = system.container.http("GET", "/readyz", PORT)
            if status == 200:
                return last  # type: ignore[return-value]
        except OSError as exc:
            last = exc
        time.sleep(0.25)
    journal = system.run(["journalctl", "-u", "jouleward", "--no-pager", "-n", "50"], check=False).stdout
    raise AssertionError(f"agent not ready after {timeout_s} s: {last}\n{journal}")


def assert_conserved(samples) -> None:
    """Per domain, over one snapshot: idle + unattributed + sum of jobs == node."""
    for domain in ATTRIBUTED:
        node = metric_sum(samples, "jouleward_node_energy_joules_total", domain=domain)
        parts = (
            metric_sum(samples, "jouleward_idle_energy_joules_total", domain=domain)
            + metric_sum(samples, "jouleward_unattributed_energy_joules_total", domain=domain)
            + metric_sum(samples, "jouleward_job_energy_joules_total", domain=domain)
        )
        assert node > 0, domain
        assert parts == pytest.approx(node, rel=1e-9, abs=1e-9), domain


def assert_conserved_in_the_api(system: Booted) -> None:
    conserved(lambda path: system.container.http("GET", path, PORT), ATTRIBUTED)


def counters(samples) -> dict[tuple, float]:
    return {
        (name, tuple(sorted(labels.items()))): value
        for name, labels, value in samples
        if name.endswith("_total") and name.startswith("jouleward_")
    }


def api_jobs(system: Booted) -> list[dict]:
    status, jobs = system.container.http("GET", "/v1/jobs", PORT)
    assert status == 200, jobs
    return jobs  # type: ignore[return-value]


def ledger(system: Booted) -> dict:
    """The ledger on disk, read with the agent's own interpreter."""
    script = (
        "import json, sqlite3; db = sqlite3.connect('file:/var/lib/jouleward/ledger.sqlite3?mode=ro', uri=True); "
        "print(json.dumps({'node': {d: e for d, e in db.execute("
        "'SELECT domain, sum(energy_j) FROM node_energy GROUP BY domain')}, "
        "'jobs': {n + '/' + d: e for n, d, e in db.execute("
        "'SELECT j.name, e.domain, e.energy_j FROM jobs j JOIN job_energy e ON e.job_id = j.id')}}))"
    )
    return json.loads(system.run(["/opt/jouleward/bin/python", "-c", script]).stdout)


def test_install_as_documented_starts_and_becomes_ready(system):
    assert system.run(["systemctl", "is-active", "jouleward"]).stdout.strip() == "active"
    assert system.run(["systemctl", "is-enabled", "jouleward"]).stdout.strip() == "enabled"
    main_pid = system.main_pid("jouleward")
    cmdline = system.run(["cat", f"/proc/{main_pid}/cmdline"]).stdout.split("\0")
    assert "/opt/jouleward/bin/jouleward" in cmdline and "run" in cmdline
    ready = wait_ready(system)
    assert ready["status"] == "ready"
    check = readme_block("Check")
    # The documented checks, as written: readiness, then the tick counter.
    done = system.sh(check[0])
    assert json.loads(done.stdout)["status"] == "ready"
    done = system.sh(check[1])
    assert re.fullmatch(r"jouleward_ticks_total \d+\.\d+", done.stdout.strip()), done.stdout
    samples = metrics(system)
    assert metric_sum(samples, "jouleward_processes") >= 5  # the container's systemd, journald, dbus, ...
    assert_conserved(samples)


def test_unprivileged_wrap_reaches_the_agent_through_the_default_socket(system):
    wait_ready(system)
    wrap = readme_block("Check")[2]
    assert wrap.startswith("jouleward wrap ") and "--socket" not in wrap
    done = system.sh(wrap, user=USER, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    uid = int(system.run(["id", "-u", USER]).stdout)
    assert uid != 0
    name = shlex.split(wrap)[shlex.split(wrap).index("--name") + 1]
    # Registered with the agent (not measured standalone), over the socket.
    assert f"job {name!r} (agent" in done.stderr + done.stdout, done.stderr + done.stdout
    (job,) = [job for job in api_jobs(system) if job["name"] == name]
    assert job["kind"] == "registered"
    assert job["running"] is False
    assert job["cpu_s"] > 0.05
    assert job["energy_j"]["cpu"] > 0
    assert_conserved(metrics(system))
    assert_conserved_in_the_api(system)


def test_stop_flushes_the_ledger_and_start_continues_the_counters(system):
    wait_ready(system)
    before_stop = metrics(system)
    jobs_before = {job["name"]: job["energy_j"] for job in api_jobs(system)}
    node_before = {d: metric_sum(before_stop, "jouleward_node_energy_joules_total", domain=d) for d in ATTRIBUTED}
    stopped = system.run(["systemctl", "stop", "jouleward"], check=False)
    assert stopped.returncode == 0, stopped.stderr
    show = system.run(["systemctl", "show", "-P", "Result", "jouleward"]).stdout.strip()
    assert show == "success"
    assert system.run(["systemctl", "show", "-P", "ExecMainStatus", "jouleward"]).stdout.strip() == "0"
    on_disk = ledger(system)
    for domain in ATTRIBUTED:
        # Everything the agent had counted when it was asked to stop is on disk.
        assert on_disk["node"][domain] >= node_before[domain] > 0
    for name, energy in jobs_before.items():
        for domain, joules in energy.items():
            assert on_disk["jobs"][f"{name}/{domain}"] >= joules
    journal = system.run(["journalctl", "-u", "jouleward", "--no-pager", "-o", "cat"]).stdout
    assert "received SIGTERM, stopping" in journal

    assert system.run(["systemctl", "start", "jouleward"], check=False).returncode == 0
    wait_ready(system)
    after = metrics(system)
    grown = 0
    for key, value in counters(before_stop).items():
        now = counters(after).get(key)
        if key[0] in (
            "jouleward_ticks_total",
            "jouleward_sensor_errors_total",
            "jouleward_ledger_errors_total",
            "jouleward_kubelet_errors_total",
            "jouleward_carbon_intensity_errors_total",
        ):
            continue  # the process's own counters start again at zero
        if now is None:
            continue  # a finished job past its retention, or a host process's job that ended
        assert now >= value, key
        grown += now > value
    assert grown >= 2  # node energy per domain at least
    for domain in ATTRIBUTED:
        assert metric_sum(after, "jouleward_node_energy_joules_total", domain=domain) >= on_disk["node"][domain]
    # The finished job is back from the ledger with the energy it had.
    (hello,) = [job for job in api_jobs(system) if job["name"] == "hello"]
    assert hello["energy_j"] == jobs_before["hello"]
    assert_conserved_in_the_api(system)


def test_live_security_exposure_is_at_most_3(system):
    wait_ready(system)
    done = system.run(["systemd-analyze", "security", "--no-pager", "jouleward.service"], check=False)
    match = re.search(r"Overall exposure level for jouleward\.service: (\d+\.\d)", done.stdout)
    assert match, done.stdout + done.stderr
    assert float(match.group(1)) <= 3.0, done.stdout


def test_the_agent_cannot_read_the_hosts_secrets_and_still_works(system):
    wait_ready(system)
    main_pid = system.main_pid("jouleward")
    # As the agent runs: root with no capability, in the unit's mount namespace.
    as_agent = ["nsenter", "-t", str(main_pid), "-m", "--", "setpriv", "--bounding-set=-all", "--inh-caps=-all", "--"]
    as_root_without_caps = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--"]
    for path in ["/etc/shadow", *SECRETS]:
        # Outside the unit, root without capabilities reads them as their owner...
        outside = system.run([*as_root_without_caps, "cat", path], check=False)
        assert outside.returncode == 0 and outside.stdout, (path, outside.stderr)
        # ...inside, they are gone.
        inside = system.run([*as_agent, "cat", path], check=False)
        assert inside.returncode != 0, (path, inside.stdout)
        assert "Permission denied" in inside.stderr or "No such file" in inside.stderr, inside.stderr
    assert "root:" in system.run([*as_root_without_caps, "cat", "/etc/shadow"]).stdout
    ssh_dir = system.run([*as_agent, "ls", "-A", "/etc/ssh"], check=False)
    assert "ssh_host" not in ssh_dir.stdout
    # And the agent keeps working: it reads every process and keeps counting.
    before = metric_sum(metrics(system), "jouleward_ticks_total")
    time.sleep(2.5)
    samples = metrics(system)
    assert metric_sum(samples, "jouleward_ticks_total") >= before + 1
    assert metric_sum(samples, "jouleward_processes") >= 5
    assert [value for _, value in metric_values(samples, "jouleward_sensor_up")] != []
    assert_conserved_in_the_api(system)
