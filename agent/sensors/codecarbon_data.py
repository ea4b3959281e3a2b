"""Locates the data files codecarbon ships, without importing codecarbon
(its package imports pandas, which the daemon must not load)."""
from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path


class DataFileMissing(FileNotFoundError):
    pass


@lru_cache(maxsize=1)
def data_root() -> Path:
    spec = importlib.util.find_spec("codecarbon")
    if spec is None or not spec.submodule_search_locations:
        raise DataFileMissing("codecarbon is not installed: its data tables are needed")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def data_file(*parts: str) -> Path:
    path = data_root().joinpath(*parts)
    if not path.is_file():
        raise DataFileMissing(f"codecarbon data file not found: {'/'.join(parts)}")
    return path
