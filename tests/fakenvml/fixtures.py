"""Pytest fixtures around the fake NVML library; import them into a test module.

``fake_nvml`` gives an in-process fake: the library is compiled once per test
session and loaded before the bindings first initialise, and each test gets
its own state file (``FAKENVML_STATE``). Tests skip where no C compiler is
available.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fakenvml.build import BuildError, FakeState, build, preload

_loaded: Path | None = None


@dataclass
class FakeNvml:
    library: Path
    state_path: Path
    state: FakeState

    def write(self) -> None:
        self.state.write(self.state_path)


@pytest.fixture(scope="session")
def fake_nvml_library(tmp_path_factory) -> Path:
    try:
        return build(tmp_path_factory.mktemp("fakenvml"))
    except BuildError as exc:
        pytest.skip(f"fake NVML library cannot be built: {exc}")


@pytest.fixture
def fake_nvml(fake_nvml_library, tmp_path, monkeypatch) -> FakeNvml:
    global _loaded
    if _loaded is None:
        preload(fake_nvml_library)
        _loaded = fake_nvml_library
    state_path = tmp_path / "nvml-state"
    monkeypatch.setenv("FAKENVML_STATE", str(state_path))
    fake = FakeNvml(library=fake_nvml_library, state_path=state_path, state=FakeState())
    fake.write()
    return fake
