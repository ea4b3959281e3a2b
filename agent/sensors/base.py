"""The interface every sensor implements."""

from __future__ import annotations

from typing import Protocol

from agent.model import DeviceEnergy, SensorStatus, TickContext


class Sensor(Protocol):
    """Reads one kind of hardware. Knows nothing about jobs or Prometheus.

    ``sample`` is called once per tick and returns the energy each device used
    since the previous call; the first call only takes a baseline and may
    return an empty list. A device that fails is left out of the result and
    reported down in ``status``: a sensor never raises out of ``sample``.
    """

    name: str

    def sample(self, ctx: TickContext) -> list[DeviceEnergy]: ...

    def status(self) -> list[SensorStatus]: ...

    def close(self) -> None: ...
