"""Layers point one way: schemas (pure data) <- nlsflow (the library) <- stages <- flows and bench."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import REPO

# package -> the packages of ours it may import
ALLOWED = {
    "schemas": {"schemas"},
    "nlsflow": {"schemas", "nlsflow"},
    "stages": {"schemas", "nlsflow", "stages"},
    "flows": {"schemas", "nlsflow", "flows"},  # stages run as processes, never imported
    "bench": {"schemas", "nlsflow", "stages", "bench"},  # it times what the stages run
}


def imported_packages(path: Path) -> set[str]:
    """The top-level packages a module imports, at module level or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names & set(ALLOWED)


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_a_package_imports_only_the_layers_below_it(package):
    wrong = {
        str(path.relative_to(REPO)): sorted(imported_packages(path) - ALLOWED[package])
        for path in sorted((REPO / package).rglob("*.py"))
    }
    assert not {k: v for k, v in wrong.items() if v}


def test_the_scan_sees_a_forbidden_import(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from nlsflow.methods import method_for\n")
    assert imported_packages(module) - ALLOWED["schemas"] == {"nlsflow"}
