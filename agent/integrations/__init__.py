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

Under torchrun (``TORCHELASTIC_RUN_ID``) with several local processes the job
is the launcher's process tree, so every local rank's energy is the job's;
otherwise it is the main process and the children it starts (data-loader
workers, Lightning's own DDP processes). Counts are sent at most once per
``report_interval_s`` (1 s) and once more when training ends, when the job
finishes and ``summary`` holds its figures. Neither framework is a
dependency of the agent: ``pip install 'jouleward[hf]'`` or ``'jouleward[lightning]'``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agent.client import Job, JobSummary

LOCAL_WORLD_SIZE_ENV = "LOCAL_WORLD_SIZE"
TORCHELASTIC_ENV = "TORCHELASTIC_RUN_ID"
TOKEN_INPUTS = ("input_ids", "inputs_embeds")


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
    """The part both callbacks share: the job, the counts not yet sent, and when to send them."""

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
        self.summary: JobSummary | None = None
        self.multiplier = 1
        self._samples = 0
        self._tokens = 0
        self._sent_at = 0.0

    @property
    def running(self) -> bool:
        return self.job is not None

    def start(self, world_size: int) -> None:
        local = processes_on_node(world_size)
        self.multiplier = local
        self.summary = None
        self.job = Job(self.name, self.labels, self.socket_path, self.standalone, pids=job_pids(local)).start()
        self._sent_at = time.monotonic()

    def count(self, work: BatchWork) -> None:
        self._samples += work.samples
        if work.tokens is not None:
            self._tokens += work.tokens

    def flush(self, force: bool = False) -> None:
        if self.job is None or not (self._samples or self._tokens):
            return
        now = time.monotonic()
        if not force and now - self._sent_at < self.report_interval_s:
            return
        samples, tokens, self._samples, self._tokens = self._samples, self._tokens, 0, 0
        if samples:
            self.job.add_work("samples", samples * self.multiplier)
        if tokens:
            self.job.add_work("tokens", tokens * self.multiplier)
        self._sent_at = now

    def finish(self) -> JobSummary | None:
        if self.job is None:
            return self.summary
        try:
            self.flush(force=True)
        finally:
            self.summary = self.job.finish()
            self.job = None
        return self.summary
