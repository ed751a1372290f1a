"""Import direction: `peer` and `client` never import each other, `protos` imports neither. Only import
statements count (anywhere in a module, `TYPE_CHECKING` blocks included); the string-based lazy dispatch of
`protos/cli.py` is not an import."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {"peer": {"client"}, "client": {"peer"}, "protos": {"peer", "client"}}


def imported_packages(source: str, module: str) -> list[tuple[int, str]]:
    """(line, top-level package) of every import statement in `source`, the module named `module`
    (dotted), relative imports resolved against it."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.partition(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: `from . import x` inside package a.b resolves to a
                parts = module.split(".")[: -node.level]
                target = ".".join([*parts, node.module or ""]).strip(".")
            else:
                target = node.module or ""
            found.append((node.lineno, target.partition(".")[0]))
    return found


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_import_direction(package: str) -> None:
    modules = _modules(package)
    assert modules, f"no modules found under {package}/"
    violations = []
    for path in modules:
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for line, imported in imported_packages(path.read_text(), module):
            if imported in FORBIDDEN[package]:
                violations.append(f"{path.relative_to(ROOT)}:{line} imports {imported}")
    assert not violations, "\n".join(violations)


@pytest.mark.parametrize(
    ("source", "module", "expected"),
    [
        ("import client.session", "peer.x", [(1, "client")]),
        ("from client.route import Hop", "peer.x", [(1, "client")]),
        ("def f():\n    from peer import blocks", "client.x", [(2, "peer")]),
        (
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import peer",
            "protos.x",
            [(1, "typing"), (3, "peer")],
        ),
        ("from . import records", "protos.cli", [(1, "protos")]),
        ("from .. import y", "peer.sub.x", [(1, "peer")]),
        ("importlib.import_module('peer.main')", "protos.cli", []),
    ],
)
def test_imported_packages_sees_every_import_statement(source: str, module: str, expected) -> None:
    assert imported_packages(source, module) == expected
