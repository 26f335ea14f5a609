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
STAGES = ("env", "pytest_cuda", "inference_v2", "inference_hae_v2", "profile", "train", "translation",
          "bench_models")


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
    stages = {name: report["stages"][name]["result"] for name in STAGES if name != "pytest_cuda"}
    assert set(stages["translation"]["models"]) == {"v2", "hae_v2"}
    assert all(m["slices_per_s_at_600"] > 0 for m in stages["translation"]["models"].values())
    assert "v2" in stages["bench_models"]["time_s"]
    modes = stages["inference_v2"]["modes"]
    assert set(modes) == {"faithful", "bf16", "fp16", "early_stop"}
    assert modes["faithful"]["same_end_step_fraction"] == 1.0 and modes["bf16"]["speedup_vs_faithful"] > 0
    assert set(stages["inference_hae_v2"]["modes"]) == {"faithful", "bf16"}
    rows = stages["train"]["train"]
    assert [(r["model"], r["mode"]) for r in rows] == [(m, x) for m in ("v2", "hae_v2")
                                                       for x in ("bf16", "bf16+channels_last",
                                                                 "bf16+channels_last+loop")]
    assert stages["train"]["loader"]["images_per_s"] > 0
    # every target is computed from the stages (the dry run judges bf16 on tiny CPU configs)
    assert report["fast_mode"] == "bf16"
    targets = report["targets"]
    assert set(targets) == {"v2_fast_slices_per_s_at_600", "v2_fast_same_mask_pixel_fraction",
                            "hae_v2_over_v2_time_fast", "train_speedup_v2", "train_speedup_hae_v2",
                            "loader_over_fastest_train_step"}
    for name, t in targets.items():
        assert t["value"] is not None and t["value"] > 0 and t["met"] in (True, False), name
    s = modes["bf16"]["s_per_slice"]
    want = 1 / (s * 600 / stages["inference_v2"]["forward_steps"])
    assert abs(targets["v2_fast_slices_per_s_at_600"]["value"] - want) < 1e-9 * want
    assert targets["v2_fast_same_mask_pixel_fraction"]["value"] == modes["bf16"]["same_mask_pixel_fraction"]
    assert targets["train_speedup_v2"]["value"] >= 1.0  # the best mode includes the base itself
    figures = report["figures"]
    assert figures["inference_v2_complete"] is True
    assert set(figures["inference_v2_warmup_s"]) == set(modes) and all(
        v > 0 for v in figures["inference_v2_warmup_s"].values())
    assert "stage" in res.stdout and "targets (bf16)" in res.stdout and "gpu_check.json" in res.stdout
    profile = stages["profile"]
    assert [(r["model"], r["variant"]) for r in profile["rows"]] == [
        (m, v) for m in ("v2", "hae_v2") for v in ("fp32", "bf16", "bf16_cl")]
    for row in profile["rows"]:
        assert row["seconds_per_call"] > 0 and row["gflops_per_image"] > 0 and row["top_kernels"]
        assert abs(sum(row["share_by_kind"].values()) - 1.0) < 1e-3


def test_only_reruns_the_named_stages(tmp_path):
    """GPU_CHECK_ONLY runs the stages named; the others are recorded as skipped and do not fail "ok"."""
    res = subprocess.run(["bash", str(SCRIPT)], env=_env(tmp_path, GPU_CHECK_ONLY="env"), capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["ok"] is True and report["only"] == ["env"]
    assert report["stages"]["env"]["rc"] == 0 and "skipped" not in report["stages"]["env"]
    assert all(report["stages"][s].get("skipped") and report["stages"][s]["rc"] is None
               for s in STAGES if s != "env")
