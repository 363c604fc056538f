"""`ruff check` over the repository finds nothing (rules: pyproject's ``[tool.ruff]``).

Skipped when ruff is not installed (it is in the ``test`` extra: ``pip install -e ".[test]"``).
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _ruff() -> list[str]:
    """The command that runs ruff: this interpreter's module, else a ``ruff`` on PATH; skip when neither."""
    if importlib.util.find_spec("ruff") is not None:
        return [sys.executable, "-m", "ruff"]
    exe = shutil.which("ruff")
    if exe is None:
        pytest.skip("ruff is not installed (pip install ruff)")
    return [exe]


def _check(*paths: str | Path) -> subprocess.CompletedProcess:
    cmd = [*_ruff(), "check", "--no-cache", "--output-format", "concise",
           "--config", str(REPO / "pyproject.toml"), *map(str, paths)]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_ruff_finds_nothing():
    r = _check(".")
    assert r.returncode == 0, f"ruff findings (fix them; see [tool.ruff] in pyproject.toml):\n{r.stdout}{r.stderr}"


def test_the_check_fails_on_a_finding(tmp_path):
    """Test of the test: an unused import, a blind except and a 124-character line are each reported."""
    bad = tmp_path / "bad.py"
    long_line = "y = 1  # " + "long " * 23
    assert len(long_line) == 124
    bad.write_text("import os\n\n\ntry:\n    pass\nexcept Exception:\n    pass\n" + long_line + "\n")
    r = _check(bad)
    assert r.returncode == 1, r.stdout + r.stderr
    for code in ("F401", "BLE001", "E501"):
        assert code in r.stdout, (code, r.stdout)
