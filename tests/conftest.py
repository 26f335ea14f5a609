"""Shared test setup: small thread counts so the suite behaves on 2-core CI machines."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(config, items):
    """Skip CUDA-marked tests cleanly when no CUDA device is present."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def script_env() -> dict:
    """Environment for running a script of this checkout in a subprocess (its package first)."""
    path = os.pathsep.join(filter(None, [str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)


@pytest.fixture(scope="session")
def run_script():
    """``run_script("scripts/x.py", *args, check=True)``: run a script of the repo as a user would
    (a fresh interpreter) and return the CompletedProcess (text output); ``check`` asserts exit 0."""

    def run(
        rel: str, *args: object, check: bool = True, timeout: float = 300
            ) -> subprocess.CompletedProcess:
        res = subprocess.run([sys.executable, str(REPO / rel), *map(str, args)], env=script_env(),
                             capture_output=True, text=True, timeout=timeout)
        if check:
            assert res.returncode == 0, res.stderr[-3000:]
        return res

    return run


@pytest.fixture
def make_read_only(monkeypatch):
    """``make_read_only(folder)``: every ``os.open`` below ``folder`` fails with EROFS from now on (a
    read-only file system, simulated: the tests may run as root, for whom chmod does not stop writes)."""
    import errno

    real_open = os.open
    folders: list[str] = []

    def read_only(path, *a, **k):
        if any(str(path).startswith(f) for f in folders):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(os, "open", read_only)
    return lambda folder: folders.append(str(folder))
