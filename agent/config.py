"""The one configuration object, built once from defaults, a TOML file,
``JOULEWARD_*`` environment variables and command-line flags (in rising
precedence). Nothing else in the agent reads the environment."""

from __future__ import annotations

import os
import re
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, get_args
from urllib.parse import urlsplit

from agent.errors import JoulewardError

DEFAULT_PORT = 9883
DEFAULT_LISTEN = f"127.0.0.1:{DEFAULT_PORT}"
# Where the shipped deployments put the control socket (deploy/systemd,
# deploy/kubernetes), then the default state directory's.
DEFAULT_CONTROL_SOCKETS = (Path("/run/jouleward/control.sock"), Path("/var/lib/jouleward/control.sock"))

DEFAULT_KUBELET_URL = "https://127.0.0.1:10250/pods"
DEFAULT_POD_RESOURCES_SOCKET = Path("/var/lib/kubelet/pod-resources/kubelet.sock")
SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
DEFAULT_TOKEN_FILE = SERVICE_ACCOUNT_DIR / "token"
DEFAULT_CA_FILE = SERVICE_ACCOUNT_DIR / "ca.crt"

# Labels the common operators put on the pods of one job, in the order tried.
DEFAULT_JOB_LABELS = (
    "training.kubeflow.org/job-name",  # Kubeflow training operator
    "jobset.sigs.k8s.io/jobset-name",  # JobSet
    "leaderworkerset.sigs.k8s.io/name",  # LeaderWorkerSet
    "volcano.sh/job-name",  # Volcano
    "ray.io/cluster",  # KubeRay
    "batch.kubernetes.io/job-name",  # batch/v1 Job (also set on JobSet's child Jobs)
)


# Where grid intensity comes from: codecarbon's world average, a fixed figure,
# a codecarbon zone, an operator's CSV series, an Electricity Maps style API.
CarbonProvider = Literal["world", "static", "zone", "csv", "http"]


class ConfigError(JoulewardError, ValueError):
    """A configuration value is wrong; the message names the key or flag."""


@dataclass(frozen=True)
class JobRule:
    """Map processes to a job by command line, executable, user or cgroup."""

    name: str
    cmdline: str | None = None  # regular expression searched in the command line
    exe: str | None = None  # regular expression matched against the executable path
    user: str | None = None  # user name or numeric uid
    cgroup: str | None = None  # regular expression searched in the cgroup path


# Serving engines whose /metrics a work source reads (agent/workloads/engines.py).
WORK_ENGINES = ("vllm", "sglang", "tgi", "triton", "llamacpp")


@dataclass(frozen=True)
class WorkSourceRule:
    """Read a job's work units from its serving engine's metrics endpoint."""

    url: str  # http://host:port/path
    job: str | None = None  # regular expression searched in the job name
    cmdline: str | None = None  # regular expression searched in a job's process's command line
    engine: str | None = None  # one of WORK_ENGINES; None: detected from the metric names


@dataclass(frozen=True)
class CarbonConfig:
    """The ``[carbon]`` table: where grid intensity comes from, and the PUE."""

    provider: CarbonProvider = "world"
    intensity_g_per_kwh: float | None = None  # static; also the http fallback
    country: str = ""  # ISO 3166 alpha-3, for zone; also the http fallback
    region: str = ""  # US state, Canadian or Chinese province, Nordic bidding zone
    cloud_provider: str = ""
    cloud_region: str = ""
    csv_path: Path | None = None
    url: str = ""  # Electricity Maps compatible API base
    zone: str = ""  # the API's zone name
    token: str = ""
    timeout_s: float = 5.0
    poll_s: float = 300.0
    pue: float = 1.0


@dataclass(frozen=True)
class Config:
    interval_s: float = 1.0
    listen: str = DEFAULT_LISTEN
    state_dir: Path = Path("/var/lib/jouleward")
    control_socket: Path | None = None  # default: <state_dir>/control.sock
    sysfs: Path = Path("/sys")
    procfs: Path = Path("/proc")
    flush_interval_s: float = 5.0
    # CPU power model, used where no RAPL or hwmon sensor measures the CPU.
    cpu_tdp_w: float | None = None  # default: codecarbon's table, by CPU model
    cpu_idle_w: float | None = None  # default: cpu_idle_fraction * TDP
    cpu_max_w: float | None = None  # default: TDP
    cpu_idle_fraction: float = 0.12
    dram_model_w_per_gib: float = 0.375
    # Static power per domain, when the operator knows it: {"cpu": 40.0}.
    idle_power_w: Mapping[str, float] = field(default_factory=dict)
    max_exported_jobs: int = 500
    finished_job_retention_s: float = 300.0
    # Finished jobs' rows leave the ledger file this long after they finished (0: never).
    ledger_job_retention_s: float = 90 * 86400.0
    # Zone counters recovered after a restart only if this much power could not
    # have wrapped them while the agent was down.
    max_zone_power_w: float = 1000.0
    rules: tuple[JobRule, ...] = ()
    systemd_unit_exclude: tuple[str, ...] = ("init.scope", "session-*.scope", "user@*.service")
    # Kubernetes pod metadata from the local kubelet (docs/jobs.md).
    # None: poll when the agent runs in a pod (a service-account token exists)
    # or when kubelet_url is configured; true/false force it.
    kubelet_enabled: bool | None = None
    kubelet_url: str = DEFAULT_KUBELET_URL
    kubelet_token_file: Path | None = DEFAULT_TOKEN_FILE  # "" in TOML: send no token
    kubelet_ca_file: Path | None = None  # default: the service account's ca.crt when present
    kubelet_insecure_skip_verify: bool = False
    kubelet_poll_s: float = 30.0
    kubelet_timeout_s: float = 5.0
    pod_job_labels: tuple[str, ...] = DEFAULT_JOB_LABELS  # tried in order after the jouleward.io/job annotation
    # GPU allocation from the kubelet's pod-resources API (docs/gpu.md). None:
    # read it when the socket exists; true/false force it.
    pod_resources_enabled: bool | None = None
    pod_resources_socket: Path = DEFAULT_POD_RESOURCES_SOCKET
    pod_resources_poll_s: float = 10.0
    pod_resources_timeout_s: float = 2.0
    # GPU allocation from Slurm: dcgm-exporter's HPC job-mapping directory
    # (one file per GPU listing its job ids); None: not read.
    slurm_gpu_job_map_dir: Path | None = None
    slurm_gpu_job_map_poll_s: float = 5.0
    # Control endpoints on the TCP listener exist only with a token (read once at start).
    control_token_file: Path | None = None
    # Hostile-input limits of both HTTP listeners (docs/jobs.md, "Control API security").
    max_request_body_bytes: int = 16384
    request_timeout_s: float = 5.0  # headers, then the body, must arrive within this
    # /healthz fails once no tick has completed for this long; None: 10 intervals, at least 30 s.
    sampler_stall_s: float | None = None
    carbon: CarbonConfig = field(default_factory=CarbonConfig)
    # NVIDIA GPUs through NVML. Visible devices as in CUDA_VISIBLE_DEVICES
    # (NVML indices or UUIDs; None: all, and CUDA_VISIBLE_DEVICES if set).
    gpu_enabled: bool = True
    gpu_visible_devices: str | None = None
    gpu_power_sample_interval_s: float = 0.1  # where a GPU has no energy counter
    gpu_idle_power_w: float | None = None  # per GPU; default: estimated
    # MIG instance activity from a dcgm-exporter on the node (its /metrics URL); None: not read.
    dcgm_exporter_url: str | None = None
    dcgm_exporter_poll_s: float = 10.0
    # Work units from serving engines' own /metrics (docs/jobs.md, "Work units").
    work_sources: tuple[WorkSourceRule, ...] = ()
    work_source_discovery: bool = True  # probe the listening ports of known engines' processes
    work_source_poll_s: float = 10.0
    work_source_timeout_s: float = 2.0
    work_source_max_body_bytes: int = 4 * 1024 * 1024
    # The node's name on every exported identity (jouleward_node_info{node},
    # the GPUs' Hostname): NODE_NAME as the DaemonSet sets it from
    # spec.nodeName, else the host name.
    node_name: str = ""

    @property
    def hostname(self) -> str:
        return socket.gethostname()

    @property
    def node(self) -> str:
        return self.node_name or self.hostname

    @property
    def kubelet_active(self) -> bool:
        if self.kubelet_enabled is not None:
            return self.kubelet_enabled
        return self.kubelet_url != DEFAULT_KUBELET_URL or DEFAULT_TOKEN_FILE.is_file()

    @property
    def pod_resources_active(self) -> bool:
        if self.pod_resources_enabled is not None:
            return self.pod_resources_enabled
        return self.pod_resources_socket.is_socket()

    @property
    def control_socket_path(self) -> Path:
        return self.control_socket or self.state_dir / "control.sock"

    @property
    def control_socket_candidates(self) -> tuple[Path, ...]:
        """Where a client (wrap, the library) looks for the agent, in order:
        the configured socket; else the state directory's, then where the
        shipped systemd unit and DaemonSet put it."""
        if self.control_socket is not None:
            return (self.control_socket,)
        own = self.state_dir / "control.sock"
        return own, *(path for path in DEFAULT_CONTROL_SOCKETS if path != own)

    @property
    def sampler_stall_after_s(self) -> float:
        return self.sampler_stall_s if self.sampler_stall_s is not None else max(10 * self.interval_s, 30.0)

    @property
    def listen_host_port(self) -> tuple[str, int]:
        return parse_listen(self.listen)


def parse_listen(value: str) -> tuple[str, int]:
    match = re.fullmatch(r"\[?([^\]]*?)\]?:(\d{1,5})", value.strip())
    if not match or not 0 < int(match.group(2)) < 65536:
        raise ConfigError(f"listen: expected host:port, got {value!r}")
    return match.group(1) or "127.0.0.1", int(match.group(2))


_FLOAT_KEYS = {
    "interval_s": (0.05, 3600.0),
    "flush_interval_s": (0.1, 86400.0),
    "cpu_tdp_w": (0.1, 10000.0),
    "cpu_idle_w": (0.0, 10000.0),
    "cpu_max_w": (0.1, 10000.0),
    "cpu_idle_fraction": (0.0, 1.0),
    "dram_model_w_per_gib": (0.0, 100.0),
    "finished_job_retention_s": (0.0, 86400.0 * 30),
    "ledger_job_retention_s": (0.0, 86400.0 * 36500),
    "max_zone_power_w": (1.0, 1e6),
    "kubelet_poll_s": (1.0, 3600.0),
    "kubelet_timeout_s": (0.1, 300.0),
    "pod_resources_poll_s": (0.1, 3600.0),
    "pod_resources_timeout_s": (0.1, 300.0),
    "slurm_gpu_job_map_poll_s": (0.1, 3600.0),
    "dcgm_exporter_poll_s": (0.1, 3600.0),
    "gpu_power_sample_interval_s": (0.01, 10.0),
    "gpu_idle_power_w": (0.0, 5000.0),
    "work_source_poll_s": (0.1, 3600.0),
    "work_source_timeout_s": (0.05, 60.0),
    "request_timeout_s": (0.1, 300.0),
    "sampler_stall_s": (1.0, 86400.0),
}
_INT_KEYS = {"max_exported_jobs": (1, 10**9), "max_request_body_bytes": (1024, 1024 * 1024)}
_PATH_KEYS = {
    "state_dir",
    "control_socket",
    "sysfs",
    "procfs",
    "kubelet_ca_file",
    "control_token_file",
    "pod_resources_socket",
    "slurm_gpu_job_map_dir",
}
_BOOL_KEYS = {
    "kubelet_enabled",
    "kubelet_insecure_skip_verify",
    "gpu_enabled",
    "work_source_discovery",
    "pod_resources_enabled",
}
_BOOL_WORDS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}
# A Kubernetes label key: optional DNS-subdomain prefix and "/", then a name.
_K8S_LABEL_KEY = re.compile(r"(?:[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")
_ENV_PREFIX = "JOULEWARD_"
# Config keys whose command-line flag is spelled differently.
FLAG_NAMES = {"interval_s": "interval"}


def _coerce(key: str, value: Any, origin: str) -> Any:
    where = f"{origin}{key}"
    if key in _FLOAT_KEYS:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        low, high = _FLOAT_KEYS[key]
        if not low <= number <= high:
            raise ConfigError(f"{where}: {number} is outside {low}..{high}")
        return number
    if key in _PATH_KEYS:
        if not isinstance(value, (str, Path)) or not str(value):
            raise ConfigError(f"{where}: expected a path, got {value!r}")
        return Path(value)
    if key in _BOOL_KEYS:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.strip().lower()]
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if key == "kubelet_token_file":
        if value == "":
            return None
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{where}: expected a path (or \"\" for no token), got {value!r}")
        return Path(value)
    if key == "dcgm_exporter_url":
        parts = urlsplit(value) if isinstance(value, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"{where}: expected an http:// or https:// URL, got {value!r}")
        return value
    if key == "kubelet_url":
        parts = urlsplit(value) if isinstance(value, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"{where}: expected an http:// or https:// URL, got {value!r}")
        return value
    if key == "pod_job_labels":
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list of label keys")
        for index, label in enumerate(value):
            if not isinstance(label, str) or not _K8S_LABEL_KEY.fullmatch(label):
                raise ConfigError(f"{where}: entry {index + 1}, {label!r}, is not a Kubernetes label key")
        return tuple(value)
    if key == "gpu_visible_devices":
        if not isinstance(value, (str, int)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a list like \"0,1\" or GPU UUIDs, got {value!r}")
        return str(value)
    if key == "node_name":
        if not isinstance(value, str) or len(value) > 253 or re.search(r"[\x00-\x1f\x7f]", value):
            raise ConfigError(f"{where}: expected a node name (at most 253 printable characters), got {value!r}")
        return value.strip()
    if key == "listen":
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected host:port, got {value!r}")
        try:
            parse_listen(value)
        except ConfigError as exc:
            raise ConfigError(f"{origin}{exc}") from None
        return value
    if key in _INT_KEYS:
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
        low, high = _INT_KEYS[key]
        if (
            isinstance(value, bool)
            or (isinstance(value, float) and not value.is_integer())
            or not low <= number <= high
        ):
            raise ConfigError(f"{where}: expected an integer {low}..{high}, got {value!r}")
        return number
    if key == "idle_power_w":
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a table of domain = watts")
        out = {}
        for domain, watts in value.items():
            if isinstance(watts, bool) or not isinstance(watts, (int, float)) or watts < 0:
                raise ConfigError(f"{where}.{domain}: expected watts >= 0, got {watts!r}")
            out[str(domain)] = float(watts)
        return out
    if key == "rules":
        if value is not None and not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected an array of tables")
        return tuple(_parse_rule(i, rule, where) for i, rule in enumerate(value or []))
    if key == "systemd_unit_exclude":
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: expected a list of unit name patterns")
        return tuple(value)
    if key == "carbon":
        return _parse_carbon(value, where)
    if key == "work_sources":
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected an array of tables")
        return tuple(_parse_work_source(i, rule, where) for i, rule in enumerate(value))
    if key == "work_source_max_body_bytes":
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
        if isinstance(value, bool) or not 1024 <= number <= 256 * 1024 * 1024:
            raise ConfigError(f"{where}: expected bytes in 1024..268435456, got {value!r}")
        return number
    raise ConfigError(f"{where}: unknown key")


_CARBON_PROVIDERS: tuple[str, ...] = get_args(CarbonProvider)
_CARBON_FLOATS = {
    "intensity_g_per_kwh": (0.0, 3000.0),
    "timeout_s": (0.1, 120.0),
    "poll_s": (1.0, 86400.0),
    "pue": (1.0, 5.0),
}


def _parse_carbon(table: Any, where: str) -> CarbonConfig:
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where}: expected a table")
    allowed = {f.name for f in fields(CarbonConfig)}
    values: dict[str, Any] = {}
    for key, value in table.items():
        here = f"{where}.{key}"
        if key not in allowed:
            raise ConfigError(f"{here}: unknown key")
        if key in _CARBON_FLOATS:
            if isinstance(value, str):  # from the environment
                try:
                    value = float(value)
                except ValueError:
                    raise ConfigError(f"{here}: expected a number, got {value!r}") from None
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{here}: expected a number, got {value!r}")
            low, high = _CARBON_FLOATS[key]
            if not low <= value <= high:
                raise ConfigError(f"{here}: {value} is outside {low}..{high}")
            values[key] = float(value)
        elif key == "csv_path":
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{here}: expected a path, got {value!r}")
            values[key] = Path(value)
        elif not isinstance(value, str):
            raise ConfigError(f"{here}: expected a string, got {value!r}")
        else:
            values[key] = value.strip()
    carbon = CarbonConfig(**values)
    if carbon.provider not in _CARBON_PROVIDERS:
        raise ConfigError(f"{where}.provider: expected one of {', '.join(_CARBON_PROVIDERS)}, got {carbon.provider!r}")
    needs = {
        "static": ("intensity_g_per_kwh",),
        "csv": ("csv_path",),
        "http": ("url", "zone"),
    }.get(carbon.provider, ())
    for key in needs:
        if getattr(carbon, key) in (None, ""):
            raise ConfigError(f"{where}.{key}: required by provider = {carbon.provider!r}")
    if carbon.provider == "zone" and not (carbon.country or carbon.cloud_provider):
        raise ConfigError(f"{where}.country: provider = 'zone' needs country (or cloud_provider and cloud_region)")
    if carbon.url and not carbon.url.startswith(("http://", "https://")):
        raise ConfigError(f"{where}.url: expected an http:// or https:// address, got {carbon.url!r}")
    return carbon


def _table_of(rule: Any, here: str, kind: type) -> set[str]:
    """Check that an array-of-tables entry is a table of ``kind``'s fields; its field names."""
    if not isinstance(rule, Mapping):
        raise ConfigError(f"{here}: expected a table")
    allowed = {f.name for f in fields(kind)}
    unknown = set(rule) - allowed
    if unknown:
        raise ConfigError(f"{here}: unknown key {sorted(unknown)[0]!r}")
    return allowed


def _parse_rule(index: int, rule: Any, where: str) -> JobRule:
    here = f"{where}[{index}]"
    _table_of(rule, here, JobRule)
    name = rule.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{here}.name: a rule needs a non-empty name")
    matchers = {k: rule.get(k) for k in ("cmdline", "exe", "user", "cgroup") if rule.get(k) is not None}
    if not matchers:
        raise ConfigError(f"{here}: a rule needs at least one of cmdline, exe, user, cgroup")
    for key, pattern in matchers.items():
        if not isinstance(pattern, (str, int)):
            raise ConfigError(f"{here}.{key}: expected a string")
        if key != "user":
            try:
                re.compile(str(pattern))
            except re.error as exc:
                raise ConfigError(f"{here}.{key}: invalid regular expression: {exc}") from None
    return JobRule(name=name, **{k: str(v) for k, v in matchers.items()})


def _parse_work_source(index: int, rule: Any, where: str) -> WorkSourceRule:
    here = f"{where}[{index}]"
    allowed = _table_of(rule, here, WorkSourceRule)
    for key in allowed:
        if rule.get(key) is not None and not isinstance(rule[key], str):
            raise ConfigError(f"{here}.{key}: expected a string")
    url = rule.get("url")
    parts = urlsplit(url) if isinstance(url, str) else None
    try:
        port = parts.port if parts is not None else None
    except ValueError:
        port = None
    if parts is None or parts.scheme != "http" or not parts.hostname or port is None:
        raise ConfigError(f"{here}.url: expected http://host:port/path, got {url!r}")
    if rule.get("job") is None and rule.get("cmdline") is None:
        raise ConfigError(f"{here}: a work source needs job or cmdline (a regular expression)")
    for key in ("job", "cmdline"):
        if rule.get(key) is not None:
            try:
                re.compile(rule[key])
            except re.error as exc:
                raise ConfigError(f"{here}.{key}: invalid regular expression: {exc}") from None
    engine = rule.get("engine")
    if engine is not None and engine not in WORK_ENGINES:
        raise ConfigError(f"{here}.engine: expected one of {', '.join(WORK_ENGINES)}, got {engine!r}")
    return WorkSourceRule(url=str(url), job=rule.get("job"), cmdline=rule.get("cmdline"), engine=engine)


def _flatten_toml(data: Mapping[str, Any]) -> dict[str, Any]:
    """Accept both top-level keys and an ``[agent]`` table."""
    flat = dict(data)
    agent = flat.pop("agent", None)
    if agent is not None:
        if not isinstance(agent, Mapping):
            raise ConfigError("[agent]: expected a table")
        flat.update(agent)
    return flat


def load_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"--config: cannot read {path}: {exc.strerror}") from None
    try:
        data = tomllib.loads(text.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--config {path}: not valid TOML: {exc}") from None
    try:
        return _flatten_toml(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def from_environ(environ: Mapping[str, str]) -> dict[str, Any]:
    known = {f.name for f in fields(Config)} - {
        "rules",
        "idle_power_w",
        "systemd_unit_exclude",
        "carbon",
        "pod_job_labels",
        "work_sources",
    }
    out: dict[str, Any] = {}
    carbon: dict[str, str] = {}
    for name, value in environ.items():
        if not name.startswith(_ENV_PREFIX):
            continue
        key = name[len(_ENV_PREFIX) :].lower()
        if key in known:
            out[key] = value
        elif key.startswith("carbon_"):  # JOULEWARD_CARBON_PUE=1.2 sets [carbon] pue
            carbon[key[len("carbon_") :]] = value
    if carbon:
        out["carbon"] = carbon
    # The operator's CUDA device restriction applies to the agent's view too.
    if "gpu_visible_devices" not in out and "CUDA_VISIBLE_DEVICES" in environ:
        out["gpu_visible_devices"] = environ["CUDA_VISIBLE_DEVICES"]
    # Kubernetes' downward API names the node NODE_NAME (as the DaemonSet does).
    if "node_name" not in out and environ.get("NODE_NAME", "").strip():
        out["node_name"] = environ["NODE_NAME"]
    return out


def build(
    file_path: Path | None = None,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> Config:
    """Defaults < TOML file < environment < flags. Raises ConfigError."""
    layers: list[tuple[str, Mapping[str, Any]]] = []
    if file_path is not None:
        layers.append((f"{file_path}: ", load_file(file_path)))
    layers.append(("environment JOULEWARD_", from_environ(os.environ if environ is None else environ)))
    layers.append(("--", {k: v for k, v in (flags or {}).items() if v is not None}))
    values: dict[str, Any] = {}
    carbon_table: dict[str, Any] = {}  # [carbon] keys merge across layers rather than replace
    for origin, layer in layers:
        for key, value in layer.items():
            if key == "carbon" and isinstance(value, Mapping):
                carbon_table.update(value)
                value = dict(carbon_table)
            shown = (
                FLAG_NAMES.get(key, key.replace("_", "-"))
                if origin == "--"
                else key.upper()
                if origin.startswith("env")
                else key
                if re.fullmatch(r"\w+", key)
                else repr(key)
            )
            try:
                values[key] = _coerce(key, value, "")
            except ConfigError as exc:
                # Keep what follows the key itself, so a nested key ([carbon] pue, rules[0].cmdline) stays named.
                message = str(exc)
                rest = message[len(key) :] if key and message.startswith(key) else f": {message}"
                if origin.startswith("env") and key == "carbon" and rest.startswith("."):
                    sub, _, tail = rest[1:].partition(":")  # name the variable: JOULEWARD_CARBON_PUE
                    rest = f"_{sub.upper()}:{tail}"
                raise ConfigError(f"{origin}{shown}{rest}") from None
    config = replace(Config(), **values)
    if config.cpu_idle_w is not None and config.cpu_max_w is not None and config.cpu_idle_w > config.cpu_max_w:
        raise ConfigError("cpu_idle_w must not exceed cpu_max_w")
    if config.kubelet_insecure_skip_verify and config.kubelet_ca_file is not None:
        raise ConfigError("kubelet_ca_file and kubelet_insecure_skip_verify exclude each other")
    return config
