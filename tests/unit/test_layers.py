"""Imports point one way (DESIGN.md): checked on the source, not by memory."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "service"

# layer -> packages it must never import
FORBIDDEN = {
    "registry": {"api", "routing", "backends", "jobs", "fastapi", "starlette", "torch"},
    "monitoring": {"api", "routing", "backends", "jobs", "fastapi", "starlette", "torch"},
    "backends": {"api", "routing", "jobs", "fastapi", "starlette", "torch"},
    "routing": {"api", "fastapi", "starlette", "torch"},
    "persistence": {"api", "routing", "fastapi", "starlette", "torch"},
    "api": {"torch", "training", "demo"},
}


def imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    roots: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            roots.add(parts[1] if parts[0] == "service" and len(parts) > 1 else parts[0])
    return roots


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_point_downward(layer: str) -> None:
    for path in (PACKAGE / layer).rglob("*.py"):
        bad = imported_roots(path) & FORBIDDEN[layer]
        assert not bad, f"{path.relative_to(PACKAGE)} imports {sorted(bad)}"


def test_the_serving_path_never_imports_torch() -> None:
    serving = [PACKAGE / "app.py", *(PACKAGE / "api").rglob("*.py")]
    for path in serving:
        assert "torch" not in imported_roots(path), path
