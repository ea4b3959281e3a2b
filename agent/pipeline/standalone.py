"""Measure one process tree in-process, for when no agent is running.

It is the agent itself, private to the caller: the sensors the host offers,
the process scan, the resolver and the attribution split, with a throwaway
state directory. Only the measured tree is registered; the figures read back
are that registered job's.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path

from agent.config import Config
from agent.pipeline.daemon import Agent


@dataclass
class TreeTotals:
    energy_j: dict[str, float] = field(default_factory=dict)  # by domain
    sources: dict[str, str] = field(default_factory=dict)  # domain -> source
    cpu_s: float = 0.0
    emissions_g: float = 0.0


class StandaloneMeter:
    """Samples in a background thread; ``stop`` returns the tree's totals."""

    def __init__(self, interval_s: float = 1.0, config: Config | None = None, name: str = "standalone") -> None:
        self._state_dir = Path(tempfile.mkdtemp(prefix="jouleward-standalone-"))
        base = config or Config()
        # Rules, systemd units and the rest stay out: this meter answers for one tree only.
        self.config = replace(
            base,
            state_dir=self._state_dir,
            control_socket=None,
            interval_s=interval_s,
            rules=(),
            flush_interval_s=86400.0,
        )
        self.agent = Agent(self.config)
        self.name = name
        self.job_id = ""
        self._primed = False
        self._thread: threading.Thread | None = None

    def prime(self) -> None:
        """Take the baseline now: processes started after this count from their first instruction."""
        if not self._primed:
            self.agent.tick()
            self._primed = True

    def start(self, root_pids: list[int]) -> None:
        self.prime()
        self.job_id = self.agent.register_job(self.name, root_pids, {}).ref.id
        self._thread = threading.Thread(target=self.agent.run, name="jouleward-standalone", daemon=True)
        self._thread.start()

    def stop(self) -> TreeTotals:
        self.agent.stop()
        if self._thread is not None:
            self._thread.join(30)
            self._thread = None
        snapshot = self.agent.tick()  # the last partial interval counts too
        record = self.agent.ledger.job(self.job_id)
        sources: dict[str, str] = {}
        for device in snapshot.devices:
            if device.domain in (record.energy_j if record else {}):
                sources.setdefault(device.domain, device.source)
        totals = TreeTotals(
            dict(record.energy_j) if record else {},
            sources,
            record.cpu_s if record else 0.0,
            record.emissions_g if record else 0.0,
        )
        try:
            self.agent.close()
        finally:
            shutil.rmtree(self._state_dir, ignore_errors=True)
        return totals
