"""The package's own static checks, so that a change which breaks them fails the suite like any other test."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp), "MYPY_CACHE_DIR": str(tmp / "mypy")})


def test_node_type_checks_clean(tmp_path: Path) -> None:
    pytest.importorskip("mypy", reason="mypy is in the dev extra (pip install -e .[dev])")
    done = _run("mypy", "node", tmp=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


def test_lint_clean(tmp_path: Path) -> None:
    pytest.importorskip("ruff", reason="ruff is in the dev extra (pip install -e .[dev])")
    done = _run("ruff", "check", "node", "models", "bench", "tests", tmp=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
