"""Reading sysfs attributes: one short ASCII value per file."""

from __future__ import annotations

from pathlib import Path


def read_attribute(path: Path) -> str:
    """The file's value, stripped. Raises OSError like any read."""
    with open(path, "rb") as handle:
        return handle.read().decode("ascii", "replace").strip()
