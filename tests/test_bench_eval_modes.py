"""benchmarks/bench_eval_modes.py on the tiny seeded run of tiny_eval (16 px, 7 test slices, 19 forward
steps): the fp32 rerun agrees exactly with the reference, bf16 changes M_t, an early stop with patience >=
the step count never triggers (identical results) while patience 1 stops early, every mode reuses the
reference calibration, and fp16 is a skipped row on CPU."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_eval import MODEL_FLAGS, make_run

ROOT = Path(__file__).resolve().parents[1]
STEPS = 19  # of a 20-step respaced chain: long enough for the tiny model's M_t to peak before the end
FRACTIONS = ("same_t_e", "same_mask_slices", "same_mask_pixels", "same_mask_all_pixels", "same_pred_label")


def _bench():
    path = ROOT / "benchmarks" / "bench_eval_modes.py"
    spec = importlib.util.spec_from_file_location("bench_eval_modes", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _eval_flags() -> list[str]:
    return [*MODEL_FLAGS, "--w", "1", "3", "--forward_steps", str(STEPS), "--timestep_respacing", "20",
            "--modality", "0", "3", "--batch_size", "3", "--batch_size_val", "4", "--seed", "5",
            "--progress", "False", "--num_panels", "0"]


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_eval_modes")
    data, mdir = make_run(root)
    out_json = root / "res.json"
    res = _bench().main(["--model_dir", str(mdir), "--data_dir", str(data), *_eval_flags(),
                         "--modes", "bf16,fp16,early_stop", "--patience", f"1,{STEPS}", "--threads", "1",
                         "--out", str(root / "runs"), "--json", str(out_json)])
    return res, root, out_json


def _identical(row: dict) -> None:
    for key in FRACTIONS:
        assert row[key] == 1.0, key
    assert row["max_abs_map_diff"] == 0.0 and row["max_abs_div_diff"] == 0.0
    deltas = [v for k, v in row.items() if k.startswith("delta_") and not math.isnan(v)]
    assert len(deltas) >= 5 and all(d == 0.0 for d in deltas)


def test_modes_and_recorded_settings(result):
    res, _root, out_json = result
    assert list(res["modes"]) == ["fp32", "bf16", "fp16", "early_stop_1", f"early_stop_{STEPS}"]
    assert res["primary_setting"].startswith("w=") and res["reference"]["n_test"] == 7
    assert len(res["checkpoint_sha256"]) == 64 and res["checkpoint_step"] == 10
    assert res["torch"] == torch.__version__ and res["threads"] == 1 and res["device"] in ("cpu", "cuda")
    assert res["settings"]["forward"]["forward_steps"] == STEPS
    saved = json.loads(out_json.read_text())
    assert saved["mode_order"] == list(res["modes"]) and set(saved["modes"]) == set(res["modes"])
    assert saved["modes"]["bf16"]["max_abs_div_diff"] == res["modes"]["bf16"]["max_abs_div_diff"]


def test_every_run_row_is_finite_and_fractions_in_range(result):
    res, _root, _ = result
    for mode, row in res["modes"].items():
        if "skipped" in row:
            continue
        for key in FRACTIONS:
            assert 0.0 <= row[key] <= 1.0, (mode, key)
        assert row["s_per_slice"] > 0 and math.isfinite(row["speedup_vs_fp32"]), mode
        assert math.isfinite(row["max_abs_map_diff"]) and math.isfinite(row["max_abs_div_diff"]), mode
        for key in ("mixed_dice", "unhealthy_dice", "image_accuracy", "delta_unhealthy_dice"):
            assert math.isfinite(row[key]), (mode, key)


def test_fp32_rerun_is_identical_to_the_reference(result):
    row = result[0]["modes"]["fp32"]
    _identical(row)
    assert row["speedup_vs_fp32"] == 1.0 and row["steps_run_mean"] is None
    assert row["unhealthy_dice"] == result[0]["reference"]["unhealthy_dice"]


def test_patience_of_all_steps_never_stops_and_matches_fp32(result):
    row = result[0]["modes"][f"early_stop_{STEPS}"]
    assert row["steps_run_mean"] == STEPS
    _identical(row)


def test_patience_one_stops_early_and_the_difference_is_measured(result):
    row = result[0]["modes"]["early_stop_1"]
    assert row["steps_run_mean"] < STEPS
    assert row["max_abs_div_diff"] > 0  # the held tail after the stop differs from the full curves
    assert row["same_t_e"] < 1.0  # this seeded run has later, higher peaks than the first local one


def test_early_stop_outlook_predicts_the_steps_each_early_stop_ran(result):
    res = result[0]
    outlook = res["reference"]["early_stop_outlook"]
    assert outlook["forward_steps"] == STEPS and set(outlook["patience"]) == {"1", str(STEPS)}
    assert 0.0 <= outlook["peak_at_last_step"] <= 1.0
    assert outlook["latest_t_e"]["min"] <= outlook["latest_t_e"]["median"] <= outlook["latest_t_e"]["max"]
    for k in (1, STEPS):
        row, pred = res["modes"][f"early_stop_{k}"], outlook["patience"][str(k)]
        assert row["predicted_steps_run_mean"] == row["steps_run_mean"], k
        assert pred["solo_steps_mean"] <= pred["batched_steps_mean"]
    assert outlook["patience"][str(STEPS)]["solo_steps_mean"] == STEPS


def test_early_stop_outlook_on_known_curves():
    steps, peaks = 10, np.array([0, 9, 0, 0, 3])  # slice i's M_t rises to step peaks[i], then falls
    t = np.arange(steps)
    div = np.zeros((5, 1, steps, 2), dtype=np.float32)
    div[:, 0, :, 0] = -t  # modality 0 peaks at step 0
    div[:, 0, :, 1] = -np.abs(t[None] - peaks[:, None])
    perm = np.array([3, 0, 4, 1, 2])  # the arrays' row order does not matter, only their index
    outlook = _bench().early_stop_outlook
    out = outlook(perm, div[perm], [2], batch_size=3, world_size=1)
    assert out["forward_steps"] == steps and out["peak_at_last_step"] == 0.2
    assert out["latest_t_e"] == {"min": 0, "median": 0.0, "max": 9}
    # K = 2: a slice peaking at p stops after the first check t >= p + 2 with (t + 1) even: 4, 10, 4, 4, 6
    assert out["patience"]["2"]["solo_steps_mean"] == 5.6
    assert out["patience"]["2"]["batched_steps_mean"] == (3 * 10 + 2 * 6) / 5  # batches {0, 1, 2}, {3, 4}
    two = outlook(perm, div[perm], [2], batch_size=3, world_size=2)  # ranks: {0, 2, 4} and {1, 3}
    assert two["patience"]["2"]["batched_steps_mean"] == (3 * 6 + 2 * 10) / 5
    with pytest.raises(ValueError, match="each test slice"):
        outlook(perm + 1, div[perm], [2], batch_size=3)


def test_early_stop_outlook_stops_at_a_plateau_before_a_later_peak():
    curve = np.array([1.0, 0.5, 0.5, 0.5, 2.0, 0.0, 0.0, 0.0], dtype=np.float32)  # peak 4, plateau before
    div = curve[None, None, :, None]
    ends = _bench().running_end_steps(div)
    assert ends.tolist() == [[[0, 0, 0, 0, 4, 4, 4, 4]]]
    out = _bench().early_stop_outlook(np.array([0]), div, [2, 5], batch_size=1)
    assert out["latest_t_e"]["max"] == 4 and out["peak_at_last_step"] == 0.0
    assert out["patience"]["2"]["solo_steps_mean"] == 4  # settled at t = 3 (3 steps past t = 0): t_e lost
    assert out["patience"]["5"]["solo_steps_mean"] == 8  # the check at t = 4 sees the new peak


def test_bf16_runs_in_bf16_with_the_reference_calibration(result):
    res, root, _ = result
    row = res["modes"]["bf16"]
    assert "skipped" not in row and 0 < row["max_abs_div_diff"] < 1.0
    metrics = json.loads((root / "runs" / "bf16" / "metrics.json").read_text())
    assert metrics["run"]["precision"] == "bf16"
    ref = json.loads((root / "runs" / "reference" / "metrics.json").read_text())["calibration"]
    for mode in ("bf16", "early_stop_1"):
        cal = json.loads((root / "runs" / mode / "metrics.json").read_text())["calibration"]
        assert {w: (c["thr_01"], c["diff_max"]) for w, c in cal.items()} == {
            w: (c["thr_01"], c["diff_max"]) for w, c in ref.items()}


def test_fp16_without_cuda_is_a_skipped_row(result):
    row = result[0]["modes"]["fp16"]
    if torch.cuda.is_available():
        assert "skipped" not in row
    else:
        assert "CUDA" in row["skipped"]
        assert "| fp16 | skipped:" in _bench().table(result[0])


def test_bad_arguments_are_refused(tmp_path):
    bench = _bench()
    with pytest.raises(ValueError, match="--modes"):
        bench.parse_modes("fp32,fp8", "2")
    with pytest.raises(ValueError, match="--patience"):
        bench.parse_modes("early_stop", "0")
    with pytest.raises(ValueError, match="--precision"):
        bench.parse_args(["--model_dir", "m", "--data_dir", "d", "--precision", "bf16"])
    (tmp_path / "x").write_text("")
    with pytest.raises(ValueError, match="not empty"):
        bench.main(["--model_dir", "m", "--data_dir", "d", "--out", str(tmp_path)])


def test_bad_value_on_the_command_line_is_one_line_exit_2(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_eval_modes.py"), "--model_dir", str(tmp_path),
           "--data_dir", str(tmp_path), "--patience", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert "--patience must list integers >= 1" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
