"""The package rule of the layout: core imports neither model package, and ldm and blip2 never import
each other (nor the toy world or the scripts built on them)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"core": {"ldm", "blip2", "toy", "scripts"}, "ldm": {"blip2", "toy", "scripts"},
             "blip2": {"ldm", "toy", "scripts"}}


def imported_packages(path: Path) -> set[str]:
    """Top-level packages a file imports (anywhere in it, also inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_follow_the_layout(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files
    wrong = {str(p.relative_to(ROOT)): sorted(imported_packages(p) & FORBIDDEN[package]) for p in files}
    assert not {k: v for k, v in wrong.items() if v}
