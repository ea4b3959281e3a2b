"""Compile the fake NVML library and write its state file.

The library is built with the system C compiler into a directory of the
caller's choosing and named ``libnvidia-ml.so.1`` (also its SONAME), so the
real bindings find it through ``LD_LIBRARY_PATH`` in a child process, or,
inside the test process, once it has been loaded by path (the dynamic loader
then resolves the bindings' ``CDLL("libnvidia-ml.so.1")`` to the loaded copy).
"""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

SOURCE = Path(__file__).with_name("fakenvml.c")
LIBRARY_NAME = "libnvidia-ml.so.1"


class BuildError(RuntimeError):
    """The fake library could not be compiled here."""


def compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "gcc")) or shutil.which("cc")


def build(directory: Path, without_process_v3: bool = False) -> Path:
    """Compile the fake into ``directory``; return the library's path."""
    cc = compiler()
    if cc is None:
        raise BuildError("no C compiler (gcc) on PATH")
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / LIBRARY_NAME
    command = [
        cc, "-shared", "-fPIC", "-O1", "-Wall", "-Wextra", "-Werror",
        f"-Wl,-soname,{LIBRARY_NAME}", "-o", str(target), str(SOURCE), "-lm", "-lpthread",
    ]
    if without_process_v3:
        command.insert(1, "-DFAKENVML_NO_PROCESS_V3")
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise BuildError(f"{' '.join(command)} failed:\n{result.stderr}")
    return target


def preload(library: Path) -> None:
    """Make the bindings in this process use ``library``.

    Must run before the first ``pynvml.nvmlInit()`` of the process.
    """
    ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL)


@dataclass
class FakeDevice:
    index: int
    uuid: str
    name: str = "NVIDIA Fake A100-SXM4-80GB"
    energy_mj: float = 0.0
    epoch_s: float = 0.0  # CLOCK_MONOTONIC seconds; > 0 makes the counter run
    power_mw: float = 100_000.0
    wave_mw: float = 0.0
    wave_period_s: float = 1.0
    util_gpu: int = 0
    util_mem: int = 0
    mem_total: int = 80 * 2**30
    mem_used: int = 0
    power_limit_mw: int = 400_000
    mig: int = 0
    lost: int = 0
    unsupported: tuple[str, ...] = ()


@dataclass
class FakeProcess:
    gpu: int
    pid: int
    mem: int = 0
    sm: int | None = None
    memutil: int = 0
    gi: int | None = None
    ci: int | None = None


@dataclass
class FakeMig:
    gpu: int  # the parent's slot
    uuid: str
    gi: int
    ci: int = 0
    slices: int = 1
    util: int | None = None  # utilisation percent; None: NVML does not say


@dataclass
class FakeState:
    devices: list[FakeDevice] = field(default_factory=list)
    processes: list[FakeProcess] = field(default_factory=list)
    samples: list[tuple[int, int, int, int]] = field(default_factory=list)  # gpu, pid, ts_us, sm
    migs: list[FakeMig] = field(default_factory=list)
    init: str = "ok"
    driver: str = "550.54.15"

    def render(self) -> str:
        lines = [f"init {self.init}", f"driver {self.driver}"]
        for slot, d in enumerate(self.devices):
            fields = (
                f"index={d.index} uuid={d.uuid} energy_mj={d.energy_mj!r} epoch_s={d.epoch_s!r}"
                f" power_mw={d.power_mw!r} wave_mw={d.wave_mw!r} wave_period_s={d.wave_period_s!r}"
                f" util_gpu={d.util_gpu} util_mem={d.util_mem} mem_total={d.mem_total}"
                f" mem_used={d.mem_used} power_limit_mw={d.power_limit_mw} mig={d.mig} lost={d.lost}"
            )
            if d.unsupported:
                fields += f" unsupported={','.join(d.unsupported)}"
            lines += [f"device {fields}", f"name {slot} {d.name}"]
        for p in self.processes:
            line = f"process gpu={p.gpu} pid={p.pid} mem={p.mem} memutil={p.memutil}"
            if p.sm is not None:
                line += f" sm={p.sm}"
            if p.gi is not None:
                line += f" gi={p.gi} ci={p.ci or 0}"
            lines.append(line)
        for gpu, pid, ts, sm in self.samples:
            lines.append(f"sample gpu={gpu} pid={pid} ts={ts} sm={sm}")
        for m in self.migs:
            line = f"mig gpu={m.gpu} uuid={m.uuid} gi={m.gi} ci={m.ci} slices={m.slices}"
            if m.util is not None:
                line += f" util={m.util}"
            lines.append(line)
        return "\n".join(lines) + "\n"

    def write(self, path: Path) -> None:
        """Replace the state file in one step, so a reader never sees half of it."""
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.render())
        os.replace(tmp, path)
