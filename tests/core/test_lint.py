"""The tree is ruff-clean under pyproject.toml's rules (what .pre-commit-config.yaml runs on each commit)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_ruff_check_passes_on_the_whole_tree():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    assert ruff, "ruff is in the dev extra: pip install -e '.[dev]'"
    proc = subprocess.run([ruff, "check", "--no-cache", "mlc", "tests", "benchmarks", "plugins", "examples"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
