"""GPUs as the scheduler sees them: allocation from the kubelet's pod-resources
API (a real gRPC server on a Unix socket, stubs generated from the vendored
proto by grpcio-tools) and from Slurm's job-mapping directory, charged by the
agent against the fake NVML library."""

from __future__ import annotations

import filecmp
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from agent.cli.doctor import _allocation_findings
from agent.config import build
from agent.pipeline.daemon import Agent
from exporters.prometheus import render_snapshot
from tests.fakenvml.build import FakeDevice, FakeMig, FakeProcess
from tests.support import metric_sum, metric_values, parse_metrics
from tests.support.kubelet_server import FakeKubelet, pod_item
from tests.support.podresources_server import Server, generate_stubs, gpu_pod, write_state

REPO = Path(__file__).resolve().parents[1]
IDLE_W = 50.0
TOKEN = "pod-resources-test-token"
UUID = {n: f"GPU-{n}{n}{n}{n}{n}{n}{n}{n}-0000-4000-8000-00000000000{n}" for n in "01234"}
MIG_A = "MIG-aaaaaaaa-0000-4000-8000-00000000000a"
MIG_B = "MIG-bbbbbbbb-0000-4000-8000-00000000000b"
U_NOTEBOOK = "11111111-1111-4111-8111-111111111111"
U_SHARE_A = "22222222-2222-4222-8222-222222222222"
U_SHARE_B = "33333333-3333-4333-8333-333333333333"
U_TRAINER = "44444444-4444-4444-8444-444444444444"
U_DRA = "55555555-5555-4555-8555-555555555555"
OWNER = "99999999-9999-4999-8999-999999999999"


def devices(now: float) -> list[FakeDevice]:
    return [
        FakeDevice(0, UUID["0"], epoch_s=now, power_mw=120_000),  # the notebook's, never opened
        FakeDevice(1, UUID["1"], epoch_s=now, power_mw=80_000),  # time-sliced between two pods
        FakeDevice(2, UUID["2"], epoch_s=now, power_mw=200_000, mig=1),  # MIG: one instance allocated
        FakeDevice(3, UUID["3"], epoch_s=now, power_mw=100_000),  # allocated to nobody, used anyway
        FakeDevice(4, UUID["4"], epoch_s=now, power_mw=90_000),  # a DRA claim
    ]


MIGS = [FakeMig(2, MIG_A, gi=1, slices=3, util=60), FakeMig(2, MIG_B, gi=2, slices=4, util=20)]


def pod_resources() -> list[dict]:
    dra = {
        "name": "dra-pod",
        "namespace": "ds",
        "containers": [
            {
                "name": "main",
                "dynamic_resources": [
                    {
                        "claim_name": "gpu-claim",
                        "claim_namespace": "ds",
                        "claim_resources": [
                            {"driver_name": "gpu.nvidia.com", "pool_name": "node-a", "device_name": "gpu-4"}
                        ],
                    }
                ],
            }
        ],
    }
    return [
        gpu_pod("notebook", "ds", UUID["0"], "GPU-ffffffff-0000-4000-8000-00000000000f"),  # one GPU this node lacks
        gpu_pod("share-a", "ds", f"{UUID['1']}::0", resource="nvidia.com/gpu.shared"),
        gpu_pod("share-b", "ds", f"{UUID['1']}::3", resource="nvidia.com/gpu.shared"),
        gpu_pod("ft-worker-0", "research", MIG_A, resource="nvidia.com/mig-3g.40gb"),
        dra,
        gpu_pod("ghost", "ds", UUID["3"]),  # no metadata for it: unmapped, not charged
        gpu_pod("nic", "ds", "mlx5_0", resource="nvidia.com/rdma"),  # not a GPU
    ]


def kubelet_pods() -> list[dict]:
    return [
        pod_item(U_NOTEBOOK, "notebook", "ds"),
        pod_item(U_SHARE_A, "share-a", "ds"),
        pod_item(U_SHARE_B, "share-b", "ds"),
        pod_item(
            U_TRAINER,
            "ft-worker-0",
            "research",
            labels={"training.kubeflow.org/job-name": "ft"},
            owner=("PyTorchJob", "ft", OWNER),
        ),
        pod_item(U_DRA, "dra-pod", "ds"),
    ]


def test_committed_stubs_are_what_grpcio_tools_generates_from_the_vendored_proto(tmp_path):
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "podresources-stubs.sh"), str(tmp_path)],
        capture_output=True,
        text=True,
        env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    generated = tmp_path / "agent" / "workloads" / "podresources_v1"
    for name in ("api_pb2.py", "api_pb2.pyi", "api_pb2_grpc.py"):
        committed = REPO / "agent" / "workloads" / "podresources_v1" / name
        assert filecmp.cmp(generated / name, committed, shallow=False), f"{name}: run scripts/podresources-stubs.sh"


@pytest.fixture
def worker():
    """A process of a job the scheduler did not give the GPU it uses."""
    process = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)"], env={"JOULEWARD_JOB": "rogue", "PATH": "/usr/bin"}
    )
    yield process
    process.kill()
    process.wait()


def tick_for(agent: Agent, seconds: float) -> float:
    """Tick every 0.2 s for ``seconds``; the summed intervals the ticks covered."""
    covered = 0.0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.2)
        covered += agent.tick().interval_s
    return covered


def samples(agent: Agent):
    return parse_metrics(render_snapshot(agent.snapshot, node="node-a").decode())


def one(found, name, **labels) -> float:
    values = metric_values(found, name, **labels)
    assert len(values) == 1, (name, labels, values)
    return values[0][1]


def test_pod_resources_allocation_charges_idle_to_pods_splits_shares_and_mig(tmp_path, fake_nvml, worker):
    now = time.monotonic()
    fake_nvml.state.devices = devices(now)
    fake_nvml.state.migs = MIGS
    fake_nvml.state.processes = [FakeProcess(3, worker.pid, mem=2**30, sm=50)]
    fake_nvml.write()
    stubs = generate_stubs(tmp_path / "stubs")
    socket_path = tmp_path / "pr" / "kubelet.sock"
    socket_path.parent.mkdir()
    state = tmp_path / "pr-state.json"
    write_state(state, pod_resources(), [{"resource_name": "nvidia.com/gpu", "device_ids": [UUID["0"], UUID["3"]]}])
    server = Server(stubs, socket_path, state)
    kubelet = FakeKubelet(TOKEN, kubelet_pods())
    token = tmp_path / "token"
    token.write_text(TOKEN)
    (tmp_path / "sys").mkdir()
    config = replace(
        build(flags={"state_dir": str(tmp_path / "state"), "sysfs": str(tmp_path / "sys")}, environ={}),
        gpu_idle_power_w=IDLE_W,
        kubelet_enabled=True,
        kubelet_url=kubelet.url,
        kubelet_ca_file=kubelet.ca_file,
        kubelet_token_file=token,
        pod_resources_enabled=True,
        pod_resources_socket=socket_path,
        pod_resources_poll_s=0.2,
        pod_resources_timeout_s=1.0,
    )
    agent = Agent(config)
    try:
        agent.start_pod_metadata()
        agent.tick()
        covered = tick_for(agent, 2.5)
        found = samples(agent)

        gpu = {
            labels["job_id"]: v for labels, v in metric_values(found, "jouleward_job_energy_joules_total", domain="gpu")
        }
        idle = {labels["job_id"]: v for labels, v in metric_values(found, "jouleward_job_gpu_idle_energy_joules_total")}
        notebook, share_a, share_b = (f"pod-{U_NOTEBOOK}", f"pod-{U_SHARE_A}", f"pod-{U_SHARE_B}")
        trainer, dra = f"k8s-{OWNER}", f"pod-{U_DRA}"
        print(
            f"covered {covered:.3f} s: notebook idle {idle[notebook]:.3f} J (want {IDLE_W * covered:.3f}),"
            f" shares {idle[share_a]:.3f}/{idle[share_b]:.3f} J, MIG pod {idle[trainer]:.3f} J"
            f" (want {IDLE_W * 3 / 7 * covered:.3f}), rogue {gpu['env-rogue']:.3f} J by use"
        )
        # The notebook never opened a context: it pays its GPU's idle, 50 W for the time covered.
        assert idle[notebook] == pytest.approx(IDLE_W * covered, rel=0.02)
        assert gpu[notebook] == pytest.approx(idle[notebook], rel=1e-9)
        # Two time-sliced replicas of one GPU: its idle split evenly.
        assert idle[share_a] == pytest.approx(IDLE_W / 2 * covered, rel=0.02)
        assert idle[share_a] == pytest.approx(idle[share_b], rel=1e-9)
        # A DRA claim of gpu-4 (by the driver's device name).
        assert idle[dra] == pytest.approx(IDLE_W * covered, rel=0.02)
        # The MIG device's pod pays its instance's slices' share of the static power (3 of 7).
        assert idle[trainer] == pytest.approx(IDLE_W * 3 / 7 * covered, rel=0.02)
        # The rogue job used gpu-3 without being allocated it: charged by use, none of the idle, flagged.
        assert idle.get("env-rogue", 0.0) == 0.0
        assert gpu["env-rogue"] == pytest.approx((100 - IDLE_W) * covered, rel=0.02)
        assert one(found, "jouleward_job_gpus_unallocated_use", job_id="env-rogue") == 1.0
        assert one(found, "jouleward_gpu_unallocated_use_energy_joules_total", gpu="3") == pytest.approx(
            gpu["env-rogue"], rel=0.05
        )
        # Allocated to nobody: gpu-3's idle and MIG-B's share stay with the node.
        unallocated = {
            labels["gpu"]: v for labels, v in metric_values(found, "jouleward_gpu_unallocated_idle_energy_joules_total")
        }
        assert unallocated["3"] == pytest.approx(IDLE_W * covered, rel=0.05)
        assert unallocated["2"] == pytest.approx(IDLE_W * 4 / 7 * covered, rel=0.05)
        assert set(unallocated) == {"2", "3"}

        # MIG instances: by NVML's instance activity (60 % of 3 slices, 20 % of 4), summing to the parent.
        parent = one(found, "jouleward_node_energy_joules_total", domain="gpu", device="gpu-2")
        instances = {
            labels["GPU_I_ID"]: (labels["source"], labels["mig_uuid"], v)
            for labels, v in metric_values(found, "jouleward_gpu_instance_energy_joules_total")
        }
        assert {k: (s, u) for k, (s, u, _) in instances.items()} == {"1": ("nvml", MIG_A), "2": ("nvml", MIG_B)}
        assert instances["1"][2] + instances["2"][2] == pytest.approx(parent, rel=0.02)
        # Static power by slices, active power by activity: (50*3/7 + 150*1.8/2.6) W against (50*4/7 + 150*0.8/2.6) W.
        want = (IDLE_W * 3 / 7 + 150 * 1.8 / 2.6) / (IDLE_W * 4 / 7 + 150 * 0.8 / 2.6)
        assert instances["1"][2] / instances["2"][2] == pytest.approx(want, rel=0.03)

        allocated = {labels["job_id"]: v for labels, v in metric_values(found, "jouleward_job_gpus_allocated")}
        assert allocated == {notebook: 1, share_a: 1, share_b: 1, trainer: 1, dra: 1}
        jobs_on = {labels["gpu"]: v for labels, v in metric_values(found, "jouleward_gpu_allocated_jobs")}
        assert jobs_on == {"0": 1, "1": 2, "2": 1, "3": 0, "4": 1}
        assert one(found, "jouleward_gpu_allocation_up", source="kubelet") == 1.0
        assert one(found, "jouleward_gpu_allocation_stale", source="kubelet") == 0.0
        assert one(found, "jouleward_gpu_allocations_unmapped", source="kubelet") == 1.0  # the ghost pod
        assert one(found, "jouleward_gpu_allocations", source="kubelet") == 6.0
        assert one(found, "jouleward_gpu_allocations_unseen") == 1.0
        assert one(found, "jouleward_gpu_allocatable_devices", source="kubelet") == 2.0

        # Every family is in the metrics contract, and the exposition passes promtool's lint.
        text = render_snapshot(agent.snapshot, node="node-a").decode()
        documented = set(re.findall(r"`(jouleward_[a-z0-9_]+)", (REPO / "docs" / "metrics.md").read_text()))
        names = {
            name for name, _, _ in found if name.startswith("jouleward_gpu") or name.startswith("jouleward_job_gpu")
        }
        assert "jouleward_gpu_instance_energy_joules_total" in names
        assert sorted(names - documented) == []
        promtool = shutil.which("promtool")
        if promtool:
            check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
            assert check.returncode == 0 and not (check.stdout + check.stderr).strip(), check.stdout + check.stderr

        # Conservation over the domain.
        measured = metric_sum(found, "jouleward_node_energy_joules_total", domain="gpu")
        parts = (
            metric_sum(found, "jouleward_idle_energy_joules_total", domain="gpu")
            + metric_sum(found, "jouleward_unattributed_energy_joules_total", domain="gpu")
            + sum(gpu.values())
        )
        assert parts == pytest.approx(measured, rel=1e-9)

        # The API's job view carries the same figure; the notebook has no process here and runs all the same.
        view = agent.ledger.job(notebook)
        assert view is not None and view.gpu_idle_j == pytest.approx(idle[notebook], rel=1e-9)
        assert view.running and view.processes == 0
        assert one(found, "jouleward_job_finished", job_id=notebook) == 0.0

        # jouleward doctor reads the same socket once.
        (finding,) = _allocation_findings(config)
        assert finding.usable and "7 GPU device(s) allocated to 6 pod(s), 2 allocatable" in finding.detail

        # The kubelet's socket goes away: the last allocation stays in force, marked stale.
        server.stop()
        before = idle[notebook]
        covered_after = tick_for(agent, 1.5)
        found = samples(agent)
        after = {
            labels["job_id"]: v for labels, v in metric_values(found, "jouleward_job_gpu_idle_energy_joules_total")
        }
        assert after[notebook] - before == pytest.approx(IDLE_W * covered_after, rel=0.05)
        assert one(found, "jouleward_gpu_allocation_up", source="kubelet") == 0.0
        assert one(found, "jouleward_gpu_allocation_stale", source="kubelet") == 1.0
        assert one(found, "jouleward_gpu_allocation_errors_total", source="kubelet") >= 1.0
        (finding,) = _allocation_findings(config)
        assert not finding.usable and f"no pod-resources socket at {socket_path}" in finding.detail
    finally:
        agent.stop()
        agent.close()
        server.stop()
        kubelet.stop()


def write_map(directory: Path, files: dict[str, str]) -> None:
    directory.mkdir(exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(text)


def test_slurm_mapping_directory_charges_jobs_and_keeps_the_last_map_when_it_goes(tmp_path, fake_nvml):
    now = time.monotonic()
    fake_nvml.state.devices = devices(now)[:3]
    fake_nvml.state.migs = [FakeMig(2, MIG_A, gi=1, slices=3), FakeMig(2, MIG_B, gi=2, slices=4)]
    fake_nvml.write()
    mapping = tmp_path / "job-map"
    # dcgm-exporter's convention: a file per GPU index (GPU.instance for MIG), job ids one per line.
    write_map(mapping, {"0": "1234\n", "1": "77\n78 1000\n", "2.2": "99\n", "README": "not a GPU\n"})
    (tmp_path / "sys").mkdir()
    config = replace(
        build(flags={"state_dir": str(tmp_path / "state"), "sysfs": str(tmp_path / "sys")}, environ={}),
        gpu_idle_power_w=IDLE_W,
        kubelet_enabled=False,
        pod_resources_enabled=False,
        slurm_gpu_job_map_dir=mapping,
        slurm_gpu_job_map_poll_s=0.2,
    )
    agent = Agent(config)
    try:
        agent.start_pod_metadata()
        agent.tick()
        covered = tick_for(agent, 2.0)
        found = samples(agent)
        idle = {labels["job_id"]: v for labels, v in metric_values(found, "jouleward_job_gpu_idle_energy_joules_total")}
        kinds = {
            labels["job_id"]: labels["job_kind"] for labels, _ in metric_values(found, "jouleward_job_gpus_allocated")
        }
        assert idle["slurm-1234"] == pytest.approx(IDLE_W * covered, rel=0.02)
        assert idle["slurm-77"] == pytest.approx(IDLE_W / 2 * covered, rel=0.02)
        assert idle["slurm-77"] == pytest.approx(idle["slurm-78"], rel=1e-9)
        # Job 99 holds GPU instance 2 (4 of 7 slices; no utilisation reported: split by slices).
        assert idle["slurm-99"] == pytest.approx(IDLE_W * 4 / 7 * covered, rel=0.02)
        assert {
            labels["source"] for labels, _ in metric_values(found, "jouleward_gpu_instance_energy_joules_total")
        } == {"slices"}
        assert kinds == {"slurm-1234": "slurm", "slurm-77": "slurm", "slurm-78": "slurm", "slurm-99": "slurm"}
        assert one(found, "jouleward_gpu_allocations_unmapped", source="slurm") == 1.0  # README
        (finding,) = _allocation_findings(config)
        assert "4 allocation(s) of 4 job(s), 1 file(s) unlike the convention skipped" in finding.detail
        assert one(found, "jouleward_gpu_allocation_stale", source="slurm") == 0.0

        # An epilog empties the map for job 1234: gpu-0 goes back to the node.
        (mapping / "0").unlink()
        time.sleep(0.5)
        tick_for(agent, 0.6)
        before = {
            labels["job_id"]: v
            for labels, v in metric_values(samples(agent), "jouleward_job_gpu_idle_energy_joules_total")
        }
        tick_for(agent, 0.8)
        found = samples(agent)
        after = {
            labels["job_id"]: v for labels, v in metric_values(found, "jouleward_job_gpu_idle_energy_joules_total")
        }
        assert after["slurm-1234"] == before["slurm-1234"]
        assert after["slurm-77"] > before["slurm-77"]

        # The directory disappears (a tmpfs unmounted): the last map stays in force, marked stale.
        shutil.rmtree(mapping)
        time.sleep(0.5)
        before = after
        covered_after = tick_for(agent, 1.2)
        found = samples(agent)
        after = {
            labels["job_id"]: v for labels, v in metric_values(found, "jouleward_job_gpu_idle_energy_joules_total")
        }
        assert after["slurm-77"] - before["slurm-77"] == pytest.approx(IDLE_W / 2 * covered_after, rel=0.05)
        assert one(found, "jouleward_gpu_allocation_stale", source="slurm") == 1.0
        assert one(found, "jouleward_gpu_allocation_up", source="slurm") == 0.0
    finally:
        agent.stop()
        agent.close()


class FakeDcgmExporter:
    """dcgm-exporter's /metrics on loopback: GR engine activity per MIG instance."""

    def __init__(self, body: str) -> None:
        self.body = body
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                data = outer.body.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/metrics"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)


DCGM_TEXT = f"""# HELP DCGM_FI_PROF_GR_ENGINE_ACTIVE Ratio of time the graphics engine is active.
# TYPE DCGM_FI_PROF_GR_ENGINE_ACTIVE gauge
DCGM_FI_PROF_GR_ENGINE_ACTIVE{{gpu="2",UUID="{UUID['2']}",device="nvidia2",modelName="NVIDIA H100",GPU_I_PROFILE="3g.40gb",GPU_I_ID="1",Hostname="node-a"}} 0.900000
DCGM_FI_PROF_GR_ENGINE_ACTIVE{{gpu="2",UUID="{UUID['2']}",device="nvidia2",modelName="NVIDIA H100",GPU_I_PROFILE="4g.40gb",GPU_I_ID="2",Hostname="node-a"}} 0.100000
DCGM_FI_PROF_GR_ENGINE_ACTIVE{{gpu="0",UUID="{UUID['0']}",device="nvidia0",modelName="NVIDIA H100",Hostname="node-a"}} 0.500000
# HELP DCGM_FI_DEV_POWER_USAGE Power draw (in W).
# TYPE DCGM_FI_DEV_POWER_USAGE gauge
DCGM_FI_DEV_POWER_USAGE{{gpu="2",UUID="{UUID['2']}",device="nvidia2",modelName="NVIDIA H100",Hostname="node-a"}} 200.0
"""


def instance_energy(found) -> dict[tuple[str, str], float]:
    return {
        (labels["GPU_I_ID"], labels["source"]): v
        for labels, v in metric_values(found, "jouleward_gpu_instance_energy_joules_total")
    }


def test_mig_instances_split_by_dcgm_exporter_activity_where_nvml_reports_none(tmp_path, fake_nvml):
    fake_nvml.state.devices = devices(time.monotonic())[:3]
    fake_nvml.state.migs = [FakeMig(2, MIG_A, gi=1, slices=3), FakeMig(2, MIG_B, gi=2, slices=4)]
    fake_nvml.write()
    dcgm = FakeDcgmExporter(DCGM_TEXT)
    (tmp_path / "sys").mkdir()
    config = replace(
        build(flags={"state_dir": str(tmp_path / "state"), "sysfs": str(tmp_path / "sys")}, environ={}),
        gpu_idle_power_w=IDLE_W,
        kubelet_enabled=False,
        pod_resources_enabled=False,
        dcgm_exporter_url=dcgm.url,
        dcgm_exporter_poll_s=0.2,
    )
    agent = Agent(config)
    try:
        agent.tick()
        tick_for(agent, 1.0)  # the exporter's first answer arrives
        before = instance_energy(samples(agent))
        tick_for(agent, 2.0)
        found = samples(agent)
        after = instance_energy(found)
        grown = {gi: after[(gi, "dcgm")] - before.get((gi, "dcgm"), 0.0) for gi in ("1", "2")}
        # Static 50 W by slices (3:4), the other 150 W by activity x slices (0.9 x 3 : 0.1 x 4).
        want = (IDLE_W * 3 / 7 + 150 * 2.7 / 3.1) / (IDLE_W * 4 / 7 + 150 * 0.4 / 3.1)
        assert grown["1"] / grown["2"] == pytest.approx(want, rel=0.03)
        parent = one(found, "jouleward_node_energy_joules_total", domain="gpu", device="gpu-2")
        assert sum(after.values()) == pytest.approx(parent, rel=0.02)
        assert one(found, "jouleward_sensor_up", sensor="dcgm", device="dcgm-exporter") == 1.0

        # The exporter goes away: reported down, and once its last answer is older than
        # two polls and a timeout (2.4 s) the split falls back to slices.
        dcgm.stop()
        tick_for(agent, 3.0)
        before = instance_energy(samples(agent))
        tick_for(agent, 1.0)
        found = samples(agent)
        after = instance_energy(found)
        assert after[("1", "dcgm")] == before[("1", "dcgm")]
        grown = {gi: after[(gi, "slices")] - before.get((gi, "slices"), 0.0) for gi in ("1", "2")}
        assert grown["1"] / grown["2"] == pytest.approx(3 / 4, rel=0.03)
        assert one(found, "jouleward_sensor_up", sensor="dcgm", device="dcgm-exporter") == 0.0
    finally:
        agent.stop()
        agent.close()


def test_pod_devices_read_device_plugins_and_dra_claims_from_the_published_messages():
    from agent.workloads.podresources import allocatable_gpus, pod_devices
    from agent.workloads.podresources_v1 import api_pb2

    claim = api_pb2.DynamicResource(
        claim_name="c",
        claim_namespace="ml",
        claim_resources=[
            api_pb2.ClaimResource(
                driver_name="gpu.nvidia.com",
                pool_name="node-a",
                device_name="gpu-0-mig-1",
                cdi_devices=[api_pb2.CDIDevice(name=f"k8s.gpu.nvidia.com/device={MIG_A}")],
            ),
            api_pb2.ClaimResource(driver_name="gpu.nvidia.com", pool_name="node-a", device_name="gpu-3"),
            api_pb2.ClaimResource(driver_name="net.example.com", pool_name="node-a", device_name="eth1"),
        ],
    )
    response = api_pb2.ListPodResourcesResponse(
        pod_resources=[
            api_pb2.PodResources(
                name="p",
                namespace="ml",
                containers=[
                    api_pb2.ContainerResources(
                        name="a",
                        devices=[
                            api_pb2.ContainerDevices(resource_name="nvidia.com/gpu", device_ids=[UUID["0"], UUID["1"]]),
                            api_pb2.ContainerDevices(resource_name="nvidia.com/rdma", device_ids=["mlx5_0"]),
                        ],
                        dynamic_resources=[claim],
                    ),
                    api_pb2.ContainerResources(
                        name="b",
                        devices=[api_pb2.ContainerDevices(resource_name="nvidia.com/mig-1g.10gb", device_ids=[MIG_B])],
                    ),
                ],
            )
        ]
    )
    assert pod_devices(response) == [
        ("ml", "p", UUID["0"]),
        ("ml", "p", UUID["1"]),
        ("ml", "p", MIG_A),  # the UUID in the CDI name wins over the driver's device name
        ("ml", "p", "gpu-3"),
        ("ml", "p", MIG_B),
    ]
    allocatable = api_pb2.AllocatableResourcesResponse(
        devices=[
            api_pb2.ContainerDevices(resource_name="nvidia.com/gpu", device_ids=[UUID["0"], UUID["1"], UUID["2"]]),
            api_pb2.ContainerDevices(resource_name="example.com/fpga", device_ids=["f0"]),
        ]
    )
    assert allocatable_gpus(allocatable) == 3
