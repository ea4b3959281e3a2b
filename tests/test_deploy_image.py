"""The image, built and run the way the DaemonSet runs it.

The Containerfile is built for real with podman (``--isolation chroot``) on a
base image made here from Debian's packages (the cached debootstrap rootfs,
``podman import``). Then, for every DaemonSet of every overlay, the container
spec is taken from the ``kustomize`` output, not retyped: command and args
(over the image's entrypoint and cmd, ``$(VAR)`` expanded), env (field
references filled in as the kubelet would, optional Secret keys left out),
ports and probes, volume mounts (host ``/proc`` and ``/sys`` bound read-only at
the manifest's mount paths, other hostPaths as directories of the test, the
ConfigMap's files, memory emptyDirs as tmpfs), ``readOnlyRootFilesystem``,
``runAsUser``, dropped capabilities and no privilege escalation. The image's
filesystem runs so under ``systemd-nspawn`` with a network namespace of its
own. nspawn always gives the container a PID namespace, where the DaemonSet
has ``hostPID``; the agent reads processes through the ``--procfs`` mount,
which is the host's ``/proc``, so it sees the host's processes either way.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import time
from pathlib import Path

import pytest
import yaml

from tests.support import (
    UnixHTTPConnection,
    http_request,
    metric_sum,
    parse_metrics,
    start_burner,
)
from tests.support.debian import (
    REPO,
    WHEELS_IN_CONTAINER,
    Container,
    assert_conserved_in_the_api,
    base_image,
    debian_rootfs,
    machine_name,
    podman,
    repo_copy,
    require_tools,
    run,
    start_container,
    wheelhouse,
    wheelhouse_env,
)

K8S = REPO / "deploy" / "kubernetes"
OVERLAYS = ["plain-nodes", "gpu-nodes"]
TAG = "localhost/jouleward-test:latest"
NODE_NAME = "node-under-test"
HOST_IP = "127.0.0.1"  # inside the pod's own network: nothing answers there
ATTRIBUTED = ("cpu", "dram")


def kustomize(directory: Path) -> list[dict]:
    if shutil.which("kubectl"):
        command = ["kubectl", "kustomize", str(directory)]
    elif shutil.which("kustomize"):
        command = ["kustomize", "build", str(directory)]
    else:
        pytest.fail("neither kubectl nor kustomize is installed (scripts/setup.d/60-deploy.sh)")
    return [doc for doc in yaml.safe_load_all(run(command, timeout_s=120).stdout) if doc]


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    require_tools("debootstrap", "podman", "systemd-nspawn", "unshare")
    rootfs = debian_rootfs()
    base = base_image(rootfs)
    context = repo_copy(tmp_path_factory.mktemp("image") / "context")
    wheels = wheelhouse(rootfs, context / "requirements" / "runtime.lock")
    build_args = [f"--build-arg={key}={value}" for key, value in wheelhouse_env(WHEELS_IN_CONTAINER).items()]
    started = time.monotonic()
    done = run(
        podman(
            "build",
            "--isolation",
            "chroot",
            "--file",
            str(context / "Containerfile"),
            f"--build-arg=BASE_IMAGE={base}",
            *build_args,
            f"--volume={wheels}:{WHEELS_IN_CONTAINER}:ro",
            "--tag",
            TAG,
            str(context),
        ),
        check=False,
        timeout_s=900,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    print(f"image built in {time.monotonic() - started:.1f} s")
    (config,) = json.loads(run(podman("image", "inspect", TAG)).stdout)
    mounted = Path(run(podman("image", "mount", TAG)).stdout.strip())
    try:
        yield config["Config"], mounted
    finally:
        run(podman("image", "unmount", TAG), check=False)


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) references to variables defined earlier; $$ escapes."""
    return re.sub(
        r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)",
        lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)),
        value,
    )


def container_env(image_env: list[str], container: dict, pod: dict) -> dict[str, str]:
    env = dict(item.split("=", 1) for item in image_env)
    fields = {
        "spec.nodeName": NODE_NAME,
        "status.hostIP": HOST_IP,
        "status.podIP": HOST_IP,
        "metadata.name": "jouleward-test",
        "metadata.namespace": "jouleward",
        "spec.serviceAccountName": pod.get("serviceAccountName", "default"),
    }
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = expand(item["value"], env)
            continue
        source = item["valueFrom"]
        if "fieldRef" in source:
            env[item["name"]] = fields[source["fieldRef"]["fieldPath"]]
        elif "secretKeyRef" in source:
            # No such Secret in this test: the reference must be optional.
            assert source["secretKeyRef"].get("optional") is True, item
        else:
            raise AssertionError(f"env source the test does not know: {item}")
    return env


class Pod:
    """One DaemonSet's container, run from the image's filesystem."""

    def __init__(
        self, daemonset: dict, configmaps: dict[str, dict], image_config: dict, image_root: Path, work: Path
    ) -> None:
        self.pod = daemonset["spec"]["template"]["spec"]
        (self.container,) = self.pod["containers"]
        self.work = work
        env = container_env(image_config.get("Env", []), self.container, self.pod)
        self.env = env
        entrypoint = self.container.get("command") or image_config.get("Entrypoint") or []
        args = (
            self.container["args"]
            if "args" in self.container
            else ([] if "command" in self.container else image_config.get("Cmd") or [])
        )
        self.argv = [expand(part, env) for part in [*entrypoint, *args]]
        security = self.container["securityContext"]
        volumes = {volume["name"]: volume for volume in self.pod["volumes"]}
        self.host_dirs: dict[str, Path] = {}  # mountPath -> directory on this machine
        nspawn = [
            f"--directory={work / 'root'}",
            "--as-pid2",
            "--private-network",
            "--console=pipe",
            f"--chdir={image_config.get('WorkingDir') or '/'}",
        ]
        if security.get("readOnlyRootFilesystem"):
            nspawn.append("--read-only")
        assert security.get("runAsUser", 0) == 0, "the test maps runAsUser 0 only"
        nspawn.append("--user=root")
        if security.get("capabilities", {}).get("drop") == ["ALL"]:
            nspawn.append("--drop-capability=all")
        if security.get("allowPrivilegeEscalation") is False:
            nspawn.append("--no-new-privileges=yes")
        mountpoints = []
        for mount in self.container["volumeMounts"]:
            volume = volumes[mount["name"]]
            target = mount["mountPath"]
            mountpoints.append(target)
            flag = "--bind-ro" if mount.get("readOnly") else "--bind"
            if "hostPath" in volume:
                path = volume["hostPath"]["path"]
                # The kernel's views are the host's own; the agent's state and
                # socket directories stand in for the node's.
                source = Path(path) if path in ("/proc", "/sys") else work / "host" / path.lstrip("/")
                source.mkdir(parents=True, exist_ok=True)
                self.host_dirs[target] = source
                nspawn.append(f"{flag}={source}:{target}")
            elif "emptyDir" in volume:
                size = volume["emptyDir"].get("sizeLimit", "16Mi").replace("Mi", "M")
                nspawn.append(f"--tmpfs={target}:mode=1777,size={size}")
            elif "configMap" in volume:
                name = volume["configMap"]["name"]
                data = configmaps[name]["data"]
                source = work / "configmaps" / name
                source.mkdir(parents=True, exist_ok=True)
                for key, text in data.items():
                    (source / key).write_text(text)
                nspawn.append(f"--bind-ro={source}:{target}")
            else:
                raise AssertionError(f"volume kind the test does not know: {volume}")
        nspawn += [f"--setenv={key}={value}" for key, value in env.items()]
        self.nspawn = nspawn + ["--", *self.argv]
        # The runtime's writable layer over the image, with the mount points
        # in it, before the root becomes read-only.
        dirs = {name: work / name for name in ("upper", "overlay-work", "root")}
        for path in dirs.values():
            path.mkdir(parents=True, exist_ok=True)
        self.setup = (
            f"mount -t overlay overlay -o lowerdir={shlex.quote(str(image_root))},"
            f"upperdir={shlex.quote(str(dirs['upper']))},workdir={shlex.quote(str(dirs['overlay-work']))} "
            f"{shlex.quote(str(dirs['root']))}; "
            + "".join(f"mkdir -p {shlex.quote(str(dirs['root']) + p)}; " for p in mountpoints)
        )
        self.ports = {port["name"]: port["containerPort"] for port in self.container["ports"]}
        self.running: Container | None = None

    def start(self) -> Container:
        self.running = start_container(machine_name("jw-pod"), self.nspawn, self.work / "pod.log", self.setup)
        # The agent's own process, once it runs: its namespaces are the pod's.
        deadline = time.monotonic() + 60
        while True:
            if self.running.proc.poll() is not None:
                raise AssertionError(f"the container exited: {self.running.log()}")
            try:
                self.running.leader = self.agent_pid()
                return self.running
            except LookupError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"no agent process in the container: {self.running.log()}") from None
                time.sleep(0.1)

    def probe(self, name: str) -> tuple[int, object]:
        get = self.container[name]["httpGet"]
        port = get["port"] if isinstance(get["port"], int) else self.ports[get["port"]]
        return self.running.http("GET", get["path"], port)  # type: ignore[union-attr]

    def wait_until_ready(self, timeout_s: float = 90.0) -> None:
        deadline = time.monotonic() + timeout_s
        last: object = None
        while time.monotonic() < deadline:
            if self.running.proc.poll() is not None:  # type: ignore[union-attr]
                raise AssertionError(f"the container exited: {self.running.log()}")  # type: ignore[union-attr]
            try:
                status, last = self.probe("readinessProbe")
                if status == 200:
                    return
            except OSError as exc:
                last = exc
            time.sleep(0.25)
        raise AssertionError(f"not ready after {timeout_s} s: {last}\n{self.running.log()}")  # type: ignore[union-attr]

    def control_socket(self) -> Path:
        inside = Path(self.env["JOULEWARD_CONTROL_SOCKET"])
        return self.host_dirs[str(inside.parent)] / inside.name

    def control(self, method: str, path: str, body: object = None) -> tuple[int, object]:
        return http_request(UnixHTTPConnection(str(self.control_socket())), method, path, body)

    def get(self, path: str) -> tuple[int, object]:
        return self.running.http("GET", path, self.ports["metrics"])  # type: ignore[union-attr]

    def agent_pid(self) -> int:
        """The agent's PID on this machine: nspawn's descendant running the entrypoint."""
        pending = [self.running.proc.pid]  # type: ignore[union-attr]
        while pending:
            pid = pending.pop()
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if cmdline[0].decode() == self.argv[0] or self.argv[0].encode() in cmdline[:2]:
                return pid
            try:
                pending += [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
            except OSError:
                continue
        raise LookupError("no agent process under the container")


def daemonsets(overlay: str) -> tuple[list[dict], dict[str, dict]]:
    docs = kustomize(K8S / "overlays" / overlay)
    configmaps = {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == "ConfigMap"}
    return [doc for doc in docs if doc["kind"] == "DaemonSet"], configmaps


def host_pids() -> int:
    return sum(1 for name in os.listdir("/proc") if name.isdigit())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_image_runs_as_each_daemonset_runs_it(overlay, image, tmp_path, processes):
    image_config, image_root = image
    found, configmaps = daemonsets(overlay)
    assert len(found) == {"plain-nodes": 1, "gpu-nodes": 2}[overlay]
    for daemonset in found:
        name = daemonset["metadata"]["name"]
        pod = Pod(daemonset, configmaps, image_config, image_root, tmp_path / name)
        assert "--config=/etc/jouleward/config.toml" in pod.argv
        pod.start()
        try:
            pod.wait_until_ready()
            status, health = pod.probe("livenessProbe")
            assert status == 200, health
            # The container runs as the manifest says: root, no capability,
            # no privilege escalation, read-only root filesystem.
            agent = pod.agent_pid()
            proc_status = dict(line.split(":", 1) for line in Path(f"/proc/{agent}/status").read_text().splitlines())
            assert proc_status["Uid"].split()[0] == "0"
            assert int(proc_status["CapEff"], 16) == 0 and int(proc_status["CapBnd"], 16) == 0
            assert proc_status["NoNewPrivs"].strip() == "1"
            write = run(["nsenter", "-t", str(agent), "-m", "--", "/bin/sh", "-c", "echo x > /probe"], check=False)
            assert write.returncode != 0 and "Read-only file system" in write.stderr, write.stderr
            # It sees this machine's processes through the host /proc mount.
            samples = parse_metrics(pod.get("/metrics")[1])  # type: ignore[arg-type]
            assert metric_sum(samples, "jouleward_processes") >= 0.5 * host_pids() > 5
            # A host process registered through the control socket's hostPath gets energy.
            burner = start_burner(0.5)
            processes.append(burner)
            status, job = pod.control("POST", "/v1/jobs", {"name": f"burner-{name}", "pids": [burner.pid]})
            assert status == 201, job
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                status, seen = pod.control("GET", f"/v1/jobs/{job['id']}")  # type: ignore[index]
                if status == 200 and seen["energy_j"].get("cpu", 0) > 0 and seen["cpu_s"] > 0.2:  # type: ignore[index]
                    break
                time.sleep(0.5)
            assert seen["processes"] == 1 and seen["cpu_s"] > 0.2, seen  # type: ignore[index]
            assert seen["energy_j"]["cpu"] > 0, seen  # type: ignore[index]
            assert_conserved_in_the_api(pod.get, ATTRIBUTED)
            burner.kill()
        finally:
            pod.running.stop()  # type: ignore[union-attr]
        # The ledger lives on the state hostPath, where the next pod finds it.
        state = pod.host_dirs["/var/lib/jouleward"]
        assert (state / "ledger.sqlite3").is_file()


def test_the_image_runs_the_agent_from_the_locked_venv(image):
    image_config, image_root = image
    assert image_config["Entrypoint"] == ["/opt/jouleward/bin/jouleward"]
    assert image_config["Cmd"] == ["run", "--listen=0.0.0.0:9883"]
    assert "9883/tcp" in image_config["ExposedPorts"]
    lock = (REPO / "requirements" / "runtime.lock").read_text()
    pinned = dict(re.findall(r"^([A-Za-z0-9_.-]+)==([^ \\\n]+)", lock, re.MULTILINE))
    site = next((image_root / "opt/jouleward/lib").glob("python3*/site-packages"))
    installed = {}
    for meta in site.glob("*.dist-info/METADATA"):
        header = meta.read_text(errors="replace").split("\n\n", 1)[0]  # the header ends at its first blank line
        fields = dict(line.split(": ", 1) for line in header.splitlines() if ": " in line)
        installed[fields["Name"].lower().replace("_", "-")] = fields["Version"]
    for name, version in pinned.items():
        assert installed.get(name.lower().replace("_", "-")) == version, name
    assert installed["jouleward"]
    # Nothing of the build stage's sources or caches came along.
    assert not (image_root / "src").exists()


def test_containerfile_takes_its_base_image_as_an_argument():
    lines = (REPO / "Containerfile").read_text().splitlines()
    (arg,) = [line for line in lines if line.startswith("ARG BASE_IMAGE=")]
    assert re.fullmatch(r"ARG BASE_IMAGE=docker\.io/library/python:3\.11-slim-\w+", arg)
    assert [line for line in lines if line.startswith("FROM ")] == ["FROM ${BASE_IMAGE} AS build", "FROM ${BASE_IMAGE}"]
