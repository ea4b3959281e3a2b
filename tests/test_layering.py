"""The tree reads like the data flow, and the toolchain holds it there.

A stage imports only from stages to its left and from the base (model,
config, errors); nothing outside the ledger touches the ledger's private
fields; ruff (lint and format) and mypy pass on the tree.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Left to right. Each entry is one stage: a module or package prefix.
STAGES: list[tuple[str, ...]] = [
    ("agent", "agent.model", "agent.config", "agent.errors"),  # the base: seams and configuration
    ("agent.carbon",),  # reference data: codecarbon's tables, grid intensity
    ("agent.sensors",),
    ("agent.workloads",),
    ("agent.attribution",),
    ("agent.ledger",),
    ("agent.pipeline",),
    ("exporters",),
    ("agent.api",),
    ("agent.client",),
    ("agent.integrations",),  # training frameworks' callbacks, over the client
    ("agent.cli",),
]


def stage_of(module: str) -> int | None:
    """Index of the stage a module belongs to: the longest matching prefix."""
    best: tuple[int, int] | None = None
    for index, prefixes in enumerate(STAGES):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if prefix == "agent" and module != "agent":
                    continue  # the package itself only: its submodules have their own stage
                if best is None or len(prefix) > best[0]:
                    best = (len(prefix), index)
    return None if best is None else best[1]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> set[str]:
    return {module_name(path) for path in sources()}


def imports_of(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, imported module) for every import, also inside functions and TYPE_CHECKING."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                # ``from agent import config`` imports the module agent.config;
                # ``from agent import __version__`` imports from agent itself.
                sub = f"{target}.{alias.name}"
                found.append((node.lineno, sub if sub in _modules() else target))
    return found


def violations(source: str, module: str, is_package: bool = False) -> list[str]:
    own = stage_of(module)
    assert own is not None, f"{module} is in no stage: add it to STAGES"
    out = []
    for line, target in imports_of(source, module, is_package):
        if not (target == "agent" or target.startswith(("agent.", "exporters"))):
            continue
        theirs = stage_of(target)
        if theirs is None:
            out.append(f"{module}:{line} imports {target}, which is in no stage")
        elif theirs > own:
            out.append(f"{module}:{line} imports {target}, a stage to its right")
    return out


def ledger_internals(source: str, module: str) -> list[str]:
    """Private attributes read through anything named ``ledger``."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            owner = node.value
            name = owner.attr if isinstance(owner, ast.Attribute) else owner.id if isinstance(owner, ast.Name) else ""
            if name == "ledger" or name.endswith("_ledger"):
                out.append(f"{module}:{node.lineno} reads ledger.{node.attr}")
    return out


def sources() -> list[Path]:
    files = sorted([*(ROOT / "agent").rglob("*.py"), *(ROOT / "exporters").rglob("*.py")])
    return [f for f in files if "__pycache__" not in f.parts]


def test_every_stage_exists_and_every_module_has_a_stage():
    modules = {module_name(path) for path in sources()}
    for prefixes in STAGES:
        for prefix in prefixes:
            assert any(m == prefix or m.startswith(prefix + ".") for m in modules), f"stage {prefix} is gone"
    assert len(modules) > 40
    assert all(stage_of(m) is not None for m in modules), sorted(m for m in modules if stage_of(m) is None)


def test_imports_run_one_way():
    problems = []
    for path in sources():
        problems += violations(path.read_text(), module_name(path), path.name == "__init__.py")
    assert problems == []


def test_the_check_catches_a_backward_import():
    # A sensor reaching into the API, lazily inside a function, and the config
    # importing a stage: both must be caught, as they once were in this tree.
    sensor = "def f():\n    from agent.api.read import create_read_app\n"
    assert violations(sensor, "agent.sensors.powercap") == [
        "agent.sensors.powercap:2 imports agent.api.read, a stage to its right"
    ]
    config = "from agent.workloads.kubelet import DEFAULT_KUBELET_URL\n"
    assert len(violations(config, "agent.config")) == 1
    relative = "from ..pipeline import snapshot\n"
    assert len(violations(relative, "agent.ledger.totals")) == 1
    assert violations("from agent import config\nfrom agent.model import JobRef\n", "agent.sensors.hwmon") == []
    assert violations("from exporters import report\n", "agent.api.read") == []


def test_agent_has_few_top_level_modules():
    top = sorted(p.name for p in (ROOT / "agent").glob("*.py") if p.name != "__init__.py")
    assert len(top) <= 6, top


def test_nothing_outside_the_ledger_touches_its_internals():
    problems = []
    for path in sources():
        if "ledger" in path.relative_to(ROOT).parts:
            continue
        problems += ledger_internals(path.read_text(), module_name(path))
    assert problems == []
    assert ledger_internals("x = agent.ledger._lock\n", "agent.pipeline.daemon") == [
        "agent.pipeline.daemon:1 reads ledger._lock"
    ]


def _tool(name: str) -> str:
    tool = Path(sys.executable).parent / name
    assert tool.is_file(), f"{name} is not installed next to {sys.executable}: run scripts/venv.sh test"
    return str(tool)


@pytest.mark.parametrize(
    "args",
    [
        ("ruff", "check", "."),
        ("ruff", "format", "--check", "."),
        ("mypy",),
    ],
    ids=["ruff-check", "ruff-format", "mypy"],
)
def test_toolchain_is_clean(args):
    result = subprocess.run([_tool(args[0]), *args[1:]], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
