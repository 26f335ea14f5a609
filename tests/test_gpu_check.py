"""scripts/gpu_check.sh: bash syntax, its CPU dry run (tiny configs) and its failure path."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.sh"
STAGES = ("env", "pytest_cuda", "bench_models", "train_step", "translation", "inference_modes")


def _env(out: Path, **extra: str) -> dict:
    env = dict(os.environ, OUT=str(out), GPU_CHECK_DRY_RUN="1", PYTHON=sys.executable)
    env.update(extra)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def test_syntax_and_failure_path(tmp_path):
    bash = shutil.which("bash")
    assert bash is not None
    assert subprocess.run([bash, "-n", str(SCRIPT)], capture_output=True).returncode == 0
    # an interpreter that fails everything: every stage is recorded, a JSON is still written, exit 2
    res = subprocess.run([bash, str(SCRIPT)], env=_env(tmp_path, PYTHON="false"), capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["ok"] is False and "summary step failed" in report["error"]
    for name in STAGES:
        assert json.loads((tmp_path / "stages" / f"{name}.status").read_text())["rc"] != 0, name


@pytest.mark.slow
def test_dry_run_writes_one_json(tmp_path):
    res = subprocess.run(["bash", str(SCRIPT)], env=_env(tmp_path), capture_output=True, text=True,
                         timeout=240)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["dry_run"] is True and report["ok"] is True
    assert list(report["stages"]) == list(STAGES)
    assert all(report["stages"][s]["rc"] == 0 for s in STAGES)
    assert isinstance(report["stages"]["env"]["result"]["missing_imports"], list)
    for stage, key in (("train_step", "images_per_s"), ("translation", "slices_per_s_at_600")):
        models = report["stages"][stage]["result"]["models"]
        assert set(models) == {"v2", "hae_v2"} and all(m[key] > 0 for m in models.values()), stage
    assert "v2" in report["stages"]["bench_models"]["result"]["time_s"]
    modes = report["stages"]["inference_modes"]["result"]["modes"]
    assert set(modes) == {"faithful", "bf16", "fp16", "early_stop"}
    assert modes["faithful"]["same_end_step_fraction"] == 1.0 and modes["bf16"]["speedup_vs_faithful"] > 0
    assert "stage" in res.stdout and "gpu_check.json" in res.stdout  # the summary table was printed
