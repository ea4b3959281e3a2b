"""A PyTorch Lightning ``Callback`` that reports samples and tokens to jouleward.

    from agent.integrations.lightning import JoulewardCallback

    trainer = lightning.Trainer(max_epochs=3, callbacks=[JoulewardCallback("resnet-ft")])
    trainer.fit(model, loader)

Every training batch counts when it ends (``on_train_batch_end`` sees the
batch itself; see ``agent.integrations`` for what a batch counts as). The job
is named after the LightningModule's class unless ``name`` is given. Works
with the ``lightning`` package and with the older ``pytorch_lightning``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # the standalone pytorch_lightning distribution
    from pytorch_lightning.callbacks import Callback

from agent.integrations import WorkReporter, batch_work


class JoulewardCallback(Callback):
    def __init__(
        self,
        name: str | None = None,
        labels: Mapping[str, str] | None = None,
        socket_path: str | os.PathLike[str] | None = None,
        standalone: bool | None = None,
        report_interval_s: float = 1.0,
    ) -> None:
        self.reporter = WorkReporter(name or "", labels, socket_path, standalone, report_interval_s)
        self._name = name

    @property
    def summary(self) -> Any:
        """The finished job's ``agent.client.JobSummary``, once training has ended."""
        return self.reporter.summary

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if trainer.local_rank != 0:
            return
        self.reporter.name = self._name or type(pl_module).__name__
        self.reporter.start(int(trainer.world_size) // max(int(trainer.num_nodes), 1))

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.reporter.running:
            self.reporter.count(batch_work(batch))
            self.reporter.flush()

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.reporter.finish()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self.reporter.finish()
