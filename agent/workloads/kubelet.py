"""Pod metadata from the local kubelet's ``/pods`` endpoint.

Polled from a background thread, never on the tick path. The API server is
deliberately not watched: one watch per node costs the control plane memory
in proportion to the cluster, while the kubelet only knows its own pods.
When the kubelet is down or slow the last known metadata stays in place and
the poller reports itself stale; attribution by pod UID carries on.
"""

from __future__ import annotations

import json
import logging
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.config import DEFAULT_CA_FILE, DEFAULT_KUBELET_URL, DEFAULT_TOKEN_FILE

log = logging.getLogger(__name__)

# A pod list of a few hundred pods is a few MB; this only guards against a
# misconfigured URL streaming something endless into memory.
MAX_RESPONSE_BYTES = 256 * 1024 * 1024
# A pod the node runs but the metadata lacks triggers an early poll, at most
# this often, so a new pod's first ticks are booked under its ML job quickly.
MIN_EARLY_POLL_S = 1.0
MAX_WANTED = 10_000


class KubeletError(RuntimeError):
    """The kubelet could not be reached or answered something unusable."""


@dataclass(frozen=True)
class PodMeta:
    uid: str
    name: str
    namespace: str
    node: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    owner_kind: str = ""
    owner_name: str = ""
    owner_uid: str = ""  # the controlling owner's UID: new for every re-created object
    container_ids: tuple[str, ...] = ()
    pod_ip: str = ""  # status.podIP: where the pod's own endpoints answer


@dataclass(frozen=True)
class KubeletSettings:
    url: str = DEFAULT_KUBELET_URL
    token_file: Path | None = DEFAULT_TOKEN_FILE
    ca_file: Path | None = None
    insecure_skip_verify: bool = False
    poll_s: float = 30.0
    timeout_s: float = 5.0
    # Pods the kubelet no longer lists keep their metadata this long, so the
    # last ticks of a terminating pod still resolve to its job.
    gone_retention_s: float = 600.0


@dataclass(frozen=True)
class KubeletHealth:
    up: bool  # the last poll succeeded
    stale: bool  # metadata may be out of date: last poll failed or is overdue
    errors_total: int
    last_success_unix_s: float  # 0 before the first success
    pods: int


def normalize_pod_uid(uid: str) -> str:
    """The systemd cgroup driver writes pod UIDs with ``_`` for ``-``."""
    return uid.strip().lower().replace("_", "-")


def _str_map(value: Any) -> dict[str, str]:
    if not isinstance(value, Mapping):
        return {}
    return {str(k): str(v) for k, v in value.items() if isinstance(k, str) and isinstance(v, (str, int, float))}


def _container_id(raw: Any) -> str | None:
    # "containerd://<64 hex>", "cri-o://...", "docker://..."
    if not isinstance(raw, str) or not raw:
        return None
    return raw.rsplit("://", 1)[-1] or None


def parse_pod(item: Any) -> PodMeta | None:
    """One item of a PodList, or None when it lacks a uid, name or namespace."""
    if not isinstance(item, Mapping):
        return None
    meta = item.get("metadata")
    if not isinstance(meta, Mapping):
        return None
    uid, name, namespace = meta.get("uid"), meta.get("name"), meta.get("namespace")
    if not all(isinstance(v, str) and v for v in (uid, name, namespace)):
        return None
    spec = item.get("spec") if isinstance(item.get("spec"), Mapping) else {}
    status = item.get("status") if isinstance(item.get("status"), Mapping) else {}
    owner_kind = owner_name = owner_uid = ""
    owners = meta.get("ownerReferences")
    if isinstance(owners, list):
        refs = [o for o in owners if isinstance(o, Mapping)]
        chosen = next((o for o in refs if o.get("controller") is True), refs[0] if refs else None)
        if chosen is not None:
            owner_kind, owner_name = str(chosen.get("kind", "")), str(chosen.get("name", ""))
            owner_uid = str(chosen.get("uid", "") or "")
    ids: list[str] = []
    for key in ("initContainerStatuses", "containerStatuses", "ephemeralContainerStatuses"):
        statuses = status.get(key)
        if isinstance(statuses, list):
            for entry in statuses:
                if isinstance(entry, Mapping) and (cid := _container_id(entry.get("containerID"))):
                    ids.append(cid)
    return PodMeta(
        uid=normalize_pod_uid(uid),
        name=name,
        namespace=namespace,
        node=str(spec.get("nodeName", "") or ""),
        labels=_str_map(meta.get("labels")),
        annotations=_str_map(meta.get("annotations")),
        owner_kind=owner_kind,
        owner_name=owner_name,
        owner_uid=owner_uid,
        container_ids=tuple(ids),
        pod_ip=str(status.get("podIP", "") or ""),
    )


def parse_pod_list(data: Any) -> dict[str, PodMeta]:
    """A kubelet ``/pods`` document to pods by UID; malformed items are skipped."""
    if not isinstance(data, Mapping) or not isinstance(data.get("items"), list):
        raise KubeletError("kubelet answered something that is not a PodList")
    pods = {}
    for item in data["items"]:
        pod = parse_pod(item)
        if pod is not None:
            pods[pod.uid] = pod
    return pods


def _ssl_context(settings: KubeletSettings) -> ssl.SSLContext:
    if settings.insecure_skip_verify:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    ca = settings.ca_file
    if ca is None and DEFAULT_CA_FILE.is_file():
        ca = DEFAULT_CA_FILE
    return ssl.create_default_context(cafile=str(ca) if ca is not None else None)


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is never followed: it would carry the bearer token to
    wherever the Location points (urllib forwards the Authorization header)."""

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> None:
        raise KubeletError(
            f"kubelet answered HTTP {code}, a redirect to {newurl}; not followed, "
            f"so the token stays with {_host(req.full_url)}"
        )


def _host(url: str) -> str:
    return urllib.parse.urlsplit(url).netloc


def fetch_pods(settings: KubeletSettings) -> dict[str, PodMeta]:
    """One GET of the kubelet's pod list. Raises KubeletError.

    The bearer token goes only over https:// and only to the configured
    host: over plain http:// (a read-only port) none is sent, and redirects
    are refused."""
    headers = {"Accept": "application/json"}
    if settings.token_file is not None and settings.url.startswith("https:"):
        # Re-read every poll: projected service-account tokens rotate.
        try:
            token = settings.token_file.read_text().strip()
        except OSError as exc:
            raise KubeletError(f"cannot read token file {settings.token_file}: {exc.strerror}") from None
        if token:
            headers["Authorization"] = f"Bearer {token}"
    handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({}), _NoRedirects()]
    if settings.url.startswith("https:"):
        try:
            handlers.append(urllib.request.HTTPSHandler(context=_ssl_context(settings)))
        except (OSError, ssl.SSLError) as exc:
            raise KubeletError(f"cannot load kubelet CA: {exc}") from None
    opener = urllib.request.build_opener(*handlers)
    request = urllib.request.Request(settings.url, headers=headers)
    try:
        with opener.open(request, timeout=settings.timeout_s) as response:
            body = response.read(MAX_RESPONSE_BYTES + 1)
    except urllib.error.HTTPError as exc:
        raise KubeletError(f"kubelet answered HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise KubeletError(f"kubelet unreachable: {reason}") from None
    if len(body) > MAX_RESPONSE_BYTES:
        raise KubeletError("kubelet pod list is larger than the agent accepts")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise KubeletError(f"kubelet answered invalid JSON: {exc}") from None
    return parse_pod_list(data)


class KubeletPoller:
    """Keeps the last known pod metadata, refreshed by a daemon thread."""

    def __init__(
        self,
        settings: KubeletSettings,
        fetch: Callable[[KubeletSettings], dict[str, PodMeta]] = fetch_pods,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self._fetch = fetch
        self._monotonic = monotonic
        self._wall = wall
        self._lock = threading.Lock()
        self._pods: dict[str, PodMeta] = {}
        self._gone_since: dict[str, float] = {}
        self._by_container: dict[str, str] = {}
        self._up = False
        self._errors = 0
        self._last_success_wall = 0.0
        self._last_success_mono: float | None = None
        self._last_error = ""
        self._wanted: set[str] = set()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self.first_poll = threading.Event()  # set once the first poll has answered or failed
        self._thread: threading.Thread | None = None

    def poll_once(self) -> bool:
        try:
            fresh = self._fetch(self.settings)
        except KubeletError as exc:
            with self._lock:
                self._up = False
                self._errors += 1
                if str(exc) != self._last_error:
                    log.warning("%s; keeping the last known pod metadata", exc)
                self._last_error = str(exc)
            return False
        now = self._monotonic()
        with self._lock:
            for uid in self._pods.keys() - fresh.keys():
                self._gone_since.setdefault(uid, now)
            for uid in fresh:
                self._gone_since.pop(uid, None)
            keep = {
                uid: pod
                for uid, pod in self._pods.items()
                if uid in self._gone_since and now - self._gone_since[uid] < self.settings.gone_retention_s
            }
            self._gone_since = {uid: t for uid, t in self._gone_since.items() if uid in keep}
            self._pods = {**keep, **fresh}
            self._by_container = {cid: uid for uid, pod in self._pods.items() for cid in pod.container_ids}
            self._wanted -= fresh.keys()
            self._up = True
            self._last_error = ""
            self._last_success_wall = self._wall()
            self._last_success_mono = now
        return True

    def pod(self, uid: str) -> PodMeta | None:
        with self._lock:
            return self._pods.get(normalize_pod_uid(uid))

    def want(self, uid: str) -> None:
        """A running pod without metadata: poll early, once per unknown UID."""
        with self._lock:
            if uid in self._wanted:
                return
            if len(self._wanted) >= MAX_WANTED:
                self._wanted.clear()
            self._wanted.add(uid)
        self._wake.set()

    def pod_for_container(self, container_id: str) -> PodMeta | None:
        with self._lock:
            uid = self._by_container.get(container_id)
            return self._pods.get(uid) if uid else None

    def pods(self) -> dict[str, PodMeta]:
        with self._lock:
            return dict(self._pods)

    def health(self) -> KubeletHealth:
        with self._lock:
            overdue = (
                self._last_success_mono is None
                or self._monotonic() - self._last_success_mono > 2 * self.settings.poll_s + self.settings.timeout_s
            )
            return KubeletHealth(
                up=self._up,
                stale=not self._up or overdue,
                errors_total=self._errors,
                last_success_unix_s=self._last_success_wall,
                pods=len(self._pods),
            )

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()  # before polling: a pod wanted during the poll wakes the next one
            started = time.monotonic()
            self.poll_once()
            self.first_poll.set()
            if self._wake.wait(self.settings.poll_s):  # woken early by want() or stop()
                self._stop.wait(max(0.0, MIN_EARLY_POLL_S - (time.monotonic() - started)))

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="jouleward-kubelet", daemon=True)
            self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
