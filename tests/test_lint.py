"""The code base stays ruff clean (the configuration lives in pyproject.toml)."""

import shutil
import subprocess
import sys

import pytest
from conftest import REPO


def test_ruff_clean():
    ruff = shutil.which("ruff")
    cmd = [ruff] if ruff else [sys.executable, "-m", "ruff"]
    try:
        result = subprocess.run([*cmd, "check", "."], cwd=REPO, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        pytest.fail("ruff is not installed: pip install -r requirements.txt")
    assert result.returncode == 0, f"ruff findings:\n{result.stdout}\n{result.stderr}"
