"""The package layout and its layers (DESIGN.md §8): what may import what, and what is installed.

Layers, lowest first: ``cbmir.core`` < ``cbmir.search`` < ``cbmir.ingest`` / ``cbmir.evaluation`` <
``cbmir.app`` < entry points (``cbmir.cli``, ``cbmir.client``, ``cbmir.grid``, ``cbmir.service``,
``cbmir.benchmarks``). Every import is read from the source (AST), lazy imports inside functions too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: installed package -> folder (pyproject's package-dir mapping)
ROOTS = {"cbmir.ingest": "ingest", "cbmir.search": "search", "cbmir.evaluation": "evaluation",
         "cbmir.benchmarks": "benchmarks", "cbmir": "cbmir"}
#: layer of each top unit; a unit may import units of a lower or equal... strictly lower layer only
LAYER = {"cbmir.core": 0, "cbmir.search": 1, "cbmir.ingest": 2, "cbmir.evaluation": 3, "cbmir.app": 4}
ENTRY = 5  # everything else under cbmir (cli, client, grid, service, benchmarks)


def _modules() -> dict[str, Path]:
    """Installed module name -> source file, for every .py file of the mapped folders."""
    out = {}
    for pkg, folder in ROOTS.items():
        for f in (REPO / folder).rglob("*.py"):
            rel = f.relative_to(REPO / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([pkg, *parts])] = f
    return out


def _unit(module: str) -> str:
    """The layer unit of a module: ``cbmir.search.store`` -> ``cbmir.search``; ``cbmir.cli`` -> itself."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def _imports(path: Path, module: str) -> set[str]:
    """cbmir modules imported anywhere in ``path`` (top level and inside functions)."""
    tree = ast.parse(path.read_text(), str(path))
    pkg = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                found.add(".".join(base + ([node.module] if node.module else [])))
            elif node.module:
                found.add(node.module)
    return {m for m in found if m == "cbmir" or m.startswith("cbmir.")}


def _edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for mod, path in _modules().items():
        src = _unit(mod)
        for imp in _imports(path, mod):
            dst = _unit(imp)
            if dst != src and dst != "cbmir":
                edges.setdefault(src, set()).add(dst)
    return edges


def test_every_package_folder_is_installed():
    """A folder with an ``__init__.py`` missing from pyproject's package list would not be installed."""
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    assert cfg["package-dir"] == {k: v for k, v in ROOTS.items()}
    found = {m for m, f in _modules().items() if f.name == "__init__.py"}
    assert found == listed, f"not listed: {sorted(found - listed)}; listed but missing: {sorted(listed - found)}"


def test_search_imports_neither_ingest_nor_evaluation():
    bad = [(m, i) for m, f in _modules().items() if m.startswith("cbmir.search")
           for i in _imports(f, m) if _unit(i) not in ("cbmir.core", "cbmir.search")]
    assert not bad, f"search must import only cbmir.core and itself: {bad}"


def test_layers_import_downwards_only():
    bad = []
    for src, dsts in _edges().items():
        for dst in dsts:
            if LAYER.get(dst, ENTRY) >= LAYER.get(src, ENTRY) and not (src not in LAYER and dst not in LAYER):
                bad.append((src, dst))
    assert not bad, f"upward or sideways imports between layers: {sorted(bad)}"


def test_no_import_cycle_between_packages():
    edges = _edges()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(u: str) -> None:
        state[u] = 1
        stack.append(u)
        for v in sorted(edges.get(u, ())):
            if state.get(v) == 1:
                raise AssertionError(f"import cycle: {' -> '.join(stack[stack.index(v):] + [v])}")
            if v not in state:
                visit(v)
        stack.pop()
        state[u] = 2

    for u in sorted(edges):
        if u not in state:
            visit(u)


def test_the_check_fails_on_a_cycle(tmp_path, monkeypatch):
    """Test of the test: an upward import (search -> ingest) is caught."""
    fake = tmp_path / "search"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "bad.py").write_text("def f():\n    from cbmir.ingest.job import ingest\n")
    monkeypatch.setitem(ROOTS, "cbmir.search", str(fake))
    with pytest.raises(AssertionError):
        test_search_imports_neither_ingest_nor_evaluation()


def test_installed_names(tmp_path):
    """``cbmir.*`` imports from any folder; the bare folder names do not (nothing else is installed)."""
    ok = subprocess.run([sys.executable, "-c", "import cbmir.search, cbmir.ingest, cbmir.evaluation"],
                        cwd=tmp_path, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    for bare in ("search", "ingest", "evaluation", "benchmarks"):
        r = subprocess.run([sys.executable, "-c", f"import {bare}"], cwd=tmp_path, capture_output=True, text=True)
        assert r.returncode != 0 and "ModuleNotFoundError" in r.stderr, bare
