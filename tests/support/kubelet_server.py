"""A real HTTP server on loopback that answers like a kubelet's ``/pods``."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def pod_item(
    uid: str,
    name: str,
    namespace: str = "default",
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    node: str = "node-a",
    owner: tuple[str, str] | tuple[str, str, str] | None = None,
    container_ids: tuple[str, ...] = (),
) -> dict[str, Any]:
    meta: dict[str, Any] = {"uid": uid, "name": name, "namespace": namespace}
    if labels:
        meta["labels"] = labels
    if annotations:
        meta["annotations"] = annotations
    if owner:
        uid_of_owner = owner[2] if len(owner) > 2 else "x"  # type: ignore[misc]
        meta["ownerReferences"] = [{"kind": owner[0], "name": owner[1], "uid": uid_of_owner, "controller": True}]
    return {
        "metadata": meta,
        "spec": {"nodeName": node},
        "status": {
            "containerStatuses": [
                {"name": f"c{i}", "containerID": f"containerd://{cid}"} for i, cid in enumerate(container_ids)
            ]
        },
    }


class FakeKubelet:
    """Serves ``{"kind": "PodList", "items": pods}`` to callers with the token."""

    def __init__(self, token: str, pods: list[dict[str, Any]] | None = None) -> None:
        self.token = token
        self.pods = list(pods or [])
        self.requests = 0
        self.unauthorized = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                outer.requests += 1
                if self.headers.get("Authorization") != f"Bearer {outer.token}":
                    outer.unauthorized += 1
                    self.send_response(401)
                    self.end_headers()
                    return
                if self.path != "/pods":
                    self.send_response(404)
                    self.end_headers()
                    return
                body = json.dumps({"kind": "PodList", "apiVersion": "v1", "items": outer.pods}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/pods"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)
