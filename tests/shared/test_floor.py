"""``shared/`` is the floor: it imports nothing above it, not even by a string naming a module."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO / "shared"
ABOVE = ("router", "incident_writer", "ingest", "admin", "cli", "replay")
# "ingest.app:create_app", "router.consumer": a module path or import string (a bare "ingest" is a word).
MODULE_STRING = re.compile(rf"^({'|'.join(ABOVE)})[.:]\w[\w.:]*$")
DYNAMIC_IMPORTS = {"import_module", "__import__", "find_spec"}


def _above(module: str) -> bool:
    return module.split(".", 1)[0] in ABOVE


def violations(source: str, filename: str = "<source>") -> list[str]:
    """Each ``line: what`` in ``source`` that reaches above the floor."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            found += [f"{node.lineno}: import {a.name}" for a in node.names if _above(a.name)]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and _above(node.module):
            found.append(f"{node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            target = node.args[0].value
            if name in DYNAMIC_IMPORTS and isinstance(target, str) and _above(target):
                found.append(f"{node.lineno}: {name}({target!r})")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and MODULE_STRING.match(node.value):
            found.append(f"{node.lineno}: names {node.value!r}")
    return sorted(set(found), key=lambda v: int(v.split(":", 1)[0]))


def test_shared_imports_nothing_above_it() -> None:
    files = sorted(SHARED.rglob("*.py"))
    assert files, "no shared/**/*.py found"
    bad = {
        str(path.relative_to(REPO)): found
        for path in files
        if (found := violations(path.read_text(encoding="utf-8"), str(path)))
    }
    assert not bad, f"shared/ reaches above the floor ({', '.join(ABOVE)}): {bad}"


@pytest.mark.parametrize(
    "source",
    [
        "import router.consumer",
        "import admin",
        "from incident_writer.consumer import IncidentWriter",
        "def run():\n    from cli.main import main\n",
        "import importlib\nimportlib.import_module('ingest.app')",
        "__import__('router')",
        "APP = 'admin.app:create_app'",
    ],
)
def test_the_check_catches_each_way_up(source: str) -> None:
    assert violations(source)


@pytest.mark.parametrize(
    "source",
    [
        "from shared.settings import Settings",
        "from . import topics",
        "import routers",
        "SERVICE = 'ingest'",
        "LABEL = 'admin_port'",
        "URL = 'http://admin:8001/'",
    ],
)
def test_the_check_passes_the_floor_itself(source: str) -> None:
    assert not violations(source)
