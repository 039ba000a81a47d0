"""Layers point down: a package imports only from its own layer's package or from below.

The table is the drawing in docs/architecture.md; a change that needs an import against
it changes the drawing first.
"""

from __future__ import annotations

import ast
from pathlib import Path

import esb

# Lowest first. A package may import from any package of a lower layer, never from a
# package of its own layer other than itself, never from above.
LAYERS: list[set[str]] = [
    {"errors", "imports"},
    {"observe"},
    {"config"},
    {"bus", "odb", "security"},
    {"service", "notification"},
    {"deploy", "outgoing", "scheduler"},
    {"status"},
    {"server", "launcher"},
    {"cli"},
]
LAYER_OF = {package: index for index, packages in enumerate(LAYERS) for package in packages}
ROOT = Path(esb.__file__).parent


def _package_of(path: Path) -> str:
    relative = path.relative_to(ROOT)
    return relative.parts[0].removesuffix(".py")


def _esb_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "esb" and len(parts) > 1:
                found.add(parts[1])
    return found


def test_every_package_has_a_layer():
    packages = {_package_of(p) for p in ROOT.rglob("*.py")} - {"__init__"}
    assert packages <= set(LAYER_OF), f"add these to LAYERS: {sorted(packages - set(LAYER_OF))}"


def test_imports_point_down():
    wrong = []
    for path in sorted(ROOT.rglob("*.py")):
        package = _package_of(path)
        if package == "__init__":
            continue
        for imported in _esb_imports(path) - {package}:
            if LAYER_OF.get(imported, -1) >= LAYER_OF[package]:
                wrong.append(f"{path.relative_to(ROOT.parent)} imports esb.{imported}")
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)
