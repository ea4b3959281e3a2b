"""A real gRPC server for the kubelet's pod-resources API v1 on a Unix socket.

Run as a child process (``python -m tests.support.podresources_server STUBS
SOCKET STATE``) with stubs that the test setup generated from the vendored
proto with grpcio-tools into STUBS: the server shares no code with the agent's
committed stubs. Every call re-reads STATE, a JSON file holding
``{"list": <ListPodResourcesResponse>, "allocatable": <AllocatableResourcesResponse>}``
in protobuf's JSON mapping, so a test changes allocations by rewriting it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
PROTO = REPO / "agent" / "workloads" / "podresources_v1" / "api.proto"


def generate_stubs(directory: Path) -> Path:
    """Compile the vendored proto with grpcio-tools into ``directory`` (api_pb2, api_pb2_grpc)."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(PROTO, directory / "api.proto")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{directory}",
            f"--python_out={directory}",
            f"--grpc_python_out={directory}",
            str(directory / "api.proto"),
        ],
        check=True,
        capture_output=True,
    )
    return directory


def write_state(path: Path, pods: list[dict[str, Any]], allocatable: list[dict[str, Any]] | None = None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"list": {"pod_resources": pods}, "allocatable": {"devices": allocatable or []}}))
    os.replace(tmp, path)


def gpu_pod(name: str, namespace: str, *device_ids: str, resource: str = "nvidia.com/gpu") -> dict[str, Any]:
    return {
        "name": name,
        "namespace": namespace,
        "containers": [{"name": "main", "devices": [{"resource_name": resource, "device_ids": list(device_ids)}]}],
    }


class Server:
    """The server child process, started and stopped by a test."""

    def __init__(self, stubs: Path, socket: Path, state: Path) -> None:
        self.socket = socket
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.support.podresources_server", str(stubs), str(socket), str(state)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.monotonic() + 30
        while not socket.is_socket():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"pod-resources server did not start: {self.process.stdout.read()}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.socket.unlink(missing_ok=True)


def main(stubs: str, socket: str, state: str) -> None:
    sys.path.insert(0, stubs)
    import api_pb2  # type: ignore[import-not-found]
    import api_pb2_grpc  # type: ignore[import-not-found]
    import grpc
    from google.protobuf import json_format

    def read() -> dict[str, Any]:
        return json.loads(Path(state).read_text())

    class Lister(api_pb2_grpc.PodResourcesListerServicer):
        def List(self, request, context):  # noqa: N802
            return json_format.ParseDict(read()["list"], api_pb2.ListPodResourcesResponse())

        def GetAllocatableResources(self, request, context):  # noqa: N802
            return json_format.ParseDict(read()["allocatable"], api_pb2.AllocatableResourcesResponse())

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    api_pb2_grpc.add_PodResourcesListerServicer_to_server(Lister(), server)
    server.add_insecure_port(f"unix://{socket}")
    server.start()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    done.wait()
    server.stop(grace=None).wait()


if __name__ == "__main__":
    main(*sys.argv[1:4])
