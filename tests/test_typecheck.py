"""The core layer type-checks: the same ``python -m mypy`` that ``.ci/run`` runs (which files, and how strictly:
``[tool.mypy]`` in pyproject.toml). Required under CI, skipped where mypy is not installed (``pip install -e ".[dev]"``).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.peers import need

ROOT = Path(__file__).resolve().parent.parent


def test_core_layer_typechecks() -> None:
    need("mypy")
    r = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"mypy found errors in the core layer:\n{r.stdout}{r.stderr}"
    assert "Success" in r.stdout, r.stdout + r.stderr
