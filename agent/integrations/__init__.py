"""Training frameworks report their work to jouleward with no change to the training loop.

    from agent.integrations.hf import JoulewardCallback          # transformers.Trainer
    from agent.integrations.lightning import JoulewardCallback   # lightning.Trainer

Each callback registers the run as a job through the agent when one listens
(else measures it standalone, as ``agent.client.Job`` does) and reports
``samples`` and ``tokens`` as its work. What a step counts, exactly:

- **samples**: the first dimension of the batch's inputs (``input_ids``, else
  ``inputs_embeds``, else the first tensor of the batch), for every training
  forward pass (every micro-batch of a gradient-accumulation step);
- **tokens**: where the batch has ``input_ids`` (or ``inputs_embeds``) and an
  ``attention_mask``, the mask's sum, the non-padding tokens; without a mask,
  batch size x sequence length. A batch without token inputs (images, tabular
  rows) reports samples only, except a plain integer tensor of two
  dimensions, read as token ids (batch x sequence length);
- with several processes on the node (``LOCAL_WORLD_SIZE``, which torchrun and
  ``accelerate launch`` set, else the framework's world size), only the local
  main process registers and reports, and it multiplies its own counts by the
  number of processes on the node: every rank draws equally sized batches from
  a distributed sampler, so samples are exact, and tokens are exact where the
  ranks' padding is alike (packed or fixed-length sequences) and an estimate
  otherwise. Each node's job then holds that node's energy and that node's
  work, and the run sums by ``job_name``.

Under ``jouleward wrap`` (``JOULEWARD_JOB_ID``) the work goes to wrap's job,
which wrap finishes; inside another registered job (a Slurm prolog's) the
agent already books the process there, so the run is measured standalone.
Under torchrun (``TORCHELASTIC_RUN_ID``) with several local processes the job
is the launcher's process tree, so every local rank's energy is the job's;
otherwise it is the main process and the children it starts (data-loader
workers, Lightning's own DDP processes). Counts are sent at most once per
``report_interval_s`` (1 s) and once more when training ends, when the job
finishes and ``summary`` holds its figures. Neither framework is a
dependency of the agent: ``pip install 'jouleward[hf]'`` or ``'jouleward[lightning]'``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agent.client import JOB_ID_ENV, AgentError, AgentUnavailable, ControlClient, Job, JobSummary

LOCAL_WORLD_SIZE_ENV = "LOCAL_WORLD_SIZE"
TORCHELASTIC_ENV = "TORCHELASTIC_RUN_ID"
TOKEN_INPUTS = ("input_ids", "inputs_embeds")
logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class BatchWork:
    """What one forward pass of one process consumed."""

    samples: int
    tokens: int | None  # None: the batch holds no token inputs


def _first_tensor(batch: Any) -> Any:
    if hasattr(batch, "shape"):
        return batch
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else ()
    return next((value for value in values if hasattr(value, "shape")), None)


def _field(batch: Any, name: str) -> Any:
    if isinstance(batch, Mapping):
        return batch.get(name)
    return getattr(batch, name, None) if not isinstance(batch, (list, tuple)) else None


def _is_integer(tensor: Any) -> bool:
    """A torch integer tensor (token ids), told apart without importing torch."""
    dtype = getattr(tensor, "dtype", None)
    return (
        dtype is not None
        and not getattr(dtype, "is_floating_point", True)
        and not getattr(dtype, "is_complex", True)
        and str(dtype) != "torch.bool"
    )


def batch_work(batch: Any) -> BatchWork:
    """Samples and tokens of one batch: a mapping (``input_ids``, ``attention_mask``, ...),
    an object with those attributes, a tuple or list of tensors, or a tensor."""
    inputs = next((_field(batch, name) for name in TOKEN_INPUTS if _field(batch, name) is not None), None)
    if inputs is None:
        first = _first_tensor(batch)
        if first is None or len(first.shape) == 0:
            return BatchWork(0, None)
        if len(first.shape) == 2 and _is_integer(first):
            return BatchWork(int(first.shape[0]), int(first.shape[0]) * int(first.shape[1]))
        return BatchWork(int(first.shape[0]), None)
    samples = int(inputs.shape[0]) if len(inputs.shape) else 0
    mask = _field(batch, "attention_mask")
    if mask is not None:
        return BatchWork(samples, int(mask.sum()))
    length = int(inputs.shape[1]) if len(inputs.shape) > 1 else 1
    return BatchWork(samples, samples * length)


def processes_on_node(world_size: int) -> int:
    """How many training processes share this node: ``LOCAL_WORLD_SIZE``, else the world size."""
    try:
        local = int(os.environ.get(LOCAL_WORLD_SIZE_ENV, ""))
    except ValueError:
        local = 0
    return max(local if local > 0 else world_size, 1)


def job_pids(local_processes: int) -> list[int]:
    """The processes the job is: torchrun's launcher (every local rank), else this process."""
    if local_processes > 1 and os.environ.get(TORCHELASTIC_ENV):
        return [os.getppid()]
    return [os.getpid()]


class WorkReporter:
    """The part both callbacks share: the job, the counts not yet sent, and when to send them.

    Telemetry never stops a training run: counts the agent cannot take (it
    went away, it refused) stay pending and go with the next report, and a
    warning says so once.
    """

    def __init__(
        self,
        name: str,
        labels: Mapping[str, str] | None = None,
        socket_path: str | os.PathLike[str] | None = None,
        standalone: bool | None = None,
        report_interval_s: float = 1.0,
    ) -> None:
        self.name = name
        self.labels = dict(labels or {})
        self.socket_path = socket_path
        self.standalone = standalone
        self.report_interval_s = report_interval_s
        self.job: Job | None = None
        # Under `jouleward wrap` the job is wrap's: work goes there, wrap finishes it.
        self.outer_job_id = ""
        self.summary: JobSummary | None = None
        self.multiplier = 1
        self._pending = {"samples": 0, "tokens": 0}
        self._sent_at = 0.0
        self._warned = False
        self._client: ControlClient | None = None

    @property
    def running(self) -> bool:
        return self.job is not None or bool(self.outer_job_id)

    def start(self, world_size: int) -> None:
        local = processes_on_node(world_size)
        self.multiplier = local
        self.summary = None
        self._sent_at = time.monotonic()
        outer = os.environ.get(JOB_ID_ENV, "")
        if outer and self.standalone is not True:
            self.outer_job_id = outer
            self._client = ControlClient(self.socket_path)
            return
        pids = job_pids(local)
        try:
            self.job = Job(self.name, self.labels, self.socket_path, self.standalone, pids=pids).start()
        except AgentError as exc:
            if exc.status != 409 or self.standalone is False:
                raise
            # Already inside a registered job (a Slurm prolog's): the agent books
            # this process there; measure it here too, for the summary.
            self._warn(f"{exc.message}; measuring standalone")
            self.job = Job(self.name, self.labels, self.socket_path, True, pids=pids).start()

    def count(self, work: BatchWork) -> None:
        self._pending["samples"] += work.samples
        if work.tokens is not None:
            self._pending["tokens"] += work.tokens

    def _warn(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            logger.warning("jouleward: %s", message)

    def flush(self, force: bool = False) -> None:
        if not self.running or not any(self._pending.values()):
            return
        now = time.monotonic()
        if not force and now - self._sent_at < self.report_interval_s:
            return
        self._sent_at = now
        for unit, count in self._pending.items():
            if not count:
                continue
            try:
                if self.outer_job_id and self._client is not None:
                    self._client.add_work(self.outer_job_id, unit, count * self.multiplier)
                elif self.job is not None:
                    self.job.add_work(unit, count * self.multiplier)
            except (AgentUnavailable, AgentError) as exc:
                self._warn(f"cannot report work ({exc}); keeping it for the next report")
                return
            self._pending[unit] = 0

    def finish(self) -> JobSummary | None:
        """Send what is pending and finish the job (not wrap's); the summary, None if the agent went away."""
        self.flush(force=True)
        if self.outer_job_id:
            self.outer_job_id, self._client = "", None
            return self.summary
        if self.job is None:
            return self.summary
        job, self.job = self.job, None
        try:
            self.summary = job.finish()
        except (AgentUnavailable, AgentError) as exc:
            self._warn(f"cannot finish job {job.job_id} ({exc})")
        return self.summary
