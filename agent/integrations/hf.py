"""A Hugging Face ``transformers`` ``TrainerCallback`` that reports samples and tokens to jouleward.

    from agent.integrations.hf import JoulewardCallback

    trainer = Trainer(model, args, train_dataset=data, callbacks=[JoulewardCallback()])
    trainer.train()

Trainer callbacks never see the batch, so the callback counts each training
forward pass of the model (a forward pre-hook that reads its ``input_ids``,
``inputs_embeds`` and ``attention_mask``, see ``agent.integrations``); passes
made in evaluation mode do not count. The job is named after
``TrainingArguments.run_name`` unless ``name`` is given.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from transformers import TrainerCallback

from agent.integrations import TOKEN_INPUTS, WorkReporter, batch_work


class JoulewardCallback(TrainerCallback):
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
        self._hook: Any = None

    @property
    def summary(self) -> Any:
        """The finished job's ``agent.client.JobSummary``, once training has ended."""
        return self.reporter.summary

    def _count(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if module.training:
            # The Trainer calls model(**inputs); a positional call counts its first tensor.
            self.reporter.count(batch_work(kwargs if any(k in kwargs for k in TOKEN_INPUTS) else args))

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if not state.is_local_process_zero or model is None:
            return
        self.reporter.name = self._name or args.run_name or "hf-trainer"
        self.reporter.start(int(args.world_size))
        self._hook = model.register_forward_pre_hook(self._count, with_kwargs=True)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.reporter.flush()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self.reporter.finish()
