"""Fig. 5 / Fig. 2-style plots of one evaluation log dir (guided_diffusion.anofpdm.anofpdm_plots,
plot_anofpdm.py)
on the tiny seeded evaluation of tiny_eval.py with three t_e ratios and --save_data True."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
from scipy import ndimage
from tiny_eval import make_run, make_split, run_argv

from guided_diffusion.anofpdm import anofpdm_plots, translation


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(data dir, log dir, metrics) of one tiny evaluation with --t_e_ratio 0.5 1 2 --save_data True."""
    root = tmp_path_factory.mktemp("plots")
    data, mdir = make_run(root)
    out = root / "eval"
    translation.main([*run_argv(data, mdir, out, t_e_ratio=("0.5", "1", "2")), "--save_data", "True"])
    return data, out, json.loads((out / "metrics.json").read_text())


def _plots(tmp_path, log_dir, **kw):
    lines: list[str] = []
    res = anofpdm_plots.make_plots(str(log_dir), out_dir=str(tmp_path / "p"), log=lines.append, **kw)
    assert json.loads((tmp_path / "p" / "plots.json").read_text())["files"] == res["files"]
    return res, lines


def test_files_and_numbers_match_metrics_json(tiny, tmp_path):
    data, out, metrics = tiny
    res, lines = _plots(tmp_path, out)
    for name in ("te_ratio.png", "thresholds.png", "mse_curves.png"):
        assert (tmp_path / "p" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert res["skipped"] == {} and len(lines) == 1
    assert res["produced_by"].startswith("guided_diffusion.anofpdm.anofpdm_plots")
    sr = metrics["settings_results"]
    for w in ("1", "3"):
        s = res["te_ratio"]["per_w"][w]
        assert s["ratio"] == [0.5, 1.0, 2.0]
        for i, r in enumerate(("0.5", "1", "2")):
            assert s["mixed_dice"][i] == sr[f"w={w},t_e_ratio={r}"]["mixed"]["dice"]
            assert s["unhealthy_dice"][i] == sr[f"w={w},t_e_ratio={r}"]["unhealthy"]["dice"]
    # share of slices whose t_e is the last of the 5 forward steps, from slices.csv
    rows = list(csv.DictReader(open(out / "slices.csv")))
    for i, r in enumerate(("0.5", "1", "2")):
        te = [int(x["t_e"]) for x in rows if x["setting"] == f"w=1,t_e_ratio={r}"]
        share = res["te_ratio"]["per_w"]["1"]["t_e_at_last_step"][i]
        assert share == pytest.approx(np.mean(np.array(te) >= 4))
    # array plots default to the primary w at ratio 1; the dynamic Dice recomputed from arrays/ is the
    # evaluation's
    w0 = metrics["primary_setting"].split(",")[0]
    assert res["setting"] == f"{w0},t_e_ratio=1"
    at_one = res["te_ratio"]["per_w"][w0.split("=")[1]]
    assert at_one["unhealthy_dice"][1] == sr[res["setting"]]["unhealthy"]["dice"]
    th = res["thresholds"]
    assert th["dynamic"]["mixed_dice"] == pytest.approx(th["metrics_json"]["mixed_dice"], abs=1e-12)
    assert th["size_filter"]["min_cc_size"] == metrics["run"]["min_cc_size"] == 1


def test_dynamic_and_fixed_threshold_dice_independent(tiny, tmp_path):
    """A setting with non-zero unhealthy Dice: dynamic Dice = metrics.json's; the fixed-threshold Dice
    recomputed here with scipy from the slice files (8-connected, hole-filled size > 1 px kept)."""
    data, out, metrics = tiny
    key = "w=1,t_e_ratio=0.5"
    res, _ = _plots(tmp_path, out, setting=key)
    th = res["thresholds"]
    ref = metrics["settings_results"][key]
    assert ref["unhealthy"]["dice"] > 0
    assert th["dynamic"]["unhealthy_dice"] == pytest.approx(ref["unhealthy"]["dice"], abs=1e-12)
    assert th["dynamic"]["mixed_dice"] == pytest.approx(ref["mixed"]["dice"], abs=1e-12)
    z = np.load(out / "arrays" / "w=1_t_e_ratio=0.5.npz")
    rows = {int(r["index"]): r for r in csv.DictReader(open(out / "slices.csv")) if r["setting"] == key}
    gts, labs = [], []
    for i in z["index"]:
        r = rows[int(i)]
        y = np.load(data / "npy_test" / f"patient_{r['patient']}" / f"slice_{r['slice']}.npz")["y"]
        gts.append(y[0, 0] > 0.5)
        labs.append(int(r["label"]))
    assert max(th["fixed"]["unhealthy_dice"]) > ref["unhealthy"]["dice"]  # some fixed thr does better

    def keep_big(m):
        lab, n = ndimage.label(m, structure=np.ones((3, 3)))
        keep = np.zeros_like(m)
        for c in range(1, n + 1):
            comp = lab == c
            if ndimage.binary_fill_holes(comp).sum() > 1:
                keep |= comp
        return keep

    def dice(p, g):
        den = p.sum() + g.sum()
        return 1.0 if den == 0 else 2 * (p & g).sum() / den

    maps, gate, n = z["anomaly_map"], z["pred_label"] == 1, len(gts)
    unh, raw, mixed = [], [], []
    for thr in th["fixed"]["threshold"]:
        unh.append(np.mean([dice(keep_big(maps[k] >= thr), gts[k]) for k in range(n) if labs[k] == 1]))
        raw.append(np.mean([dice(maps[k] >= thr, gts[k]) for k in range(n) if labs[k] == 1]))
        mixed.append(np.mean([dice(keep_big(maps[k] >= thr) & gate[k], gts[k]) for k in range(n)]))
    assert not np.allclose(unh, raw)  # the size filter matters on this run, so it is checked
    assert th["fixed"]["unhealthy_dice"] == pytest.approx(unh, abs=1e-12)
    assert th["fixed"]["mixed_dice"] == pytest.approx(mixed, abs=1e-12)
    # MSE curves: the healthy MSE_h mean at w=1 (index 0) over the label-0 slices
    healthy = np.array(labs) == 0
    want = z["mse_h"][healthy, 0].mean(-1).mean(0)
    assert res["mse_curves"]["healthy"]["mse_h"]["mean"] == pytest.approx(want.tolist(), rel=1e-6)
    assert res["mse_curves"]["unhealthy"]["n_slices"] == int((~healthy).sum()) == 3


def test_missing_inputs_skip_one_plot_each(tiny, tmp_path):
    data, out, _ = tiny
    res, lines = _plots(tmp_path, out, data_dir=str(tmp_path / "nowhere"))
    assert list(res["skipped"]) == ["thresholds"] and "nowhere" in res["skipped"]["thresholds"]
    assert set(res["files"]) == {"te_ratio", "mse_curves"}
    assert len(lines) == 2 and lines[0].startswith("thresholds.png skipped")
    no_arrays = tmp_path / "copy"
    shutil.copytree(out, no_arrays, ignore=shutil.ignore_patterns("arrays"))
    _plots(tmp_path, out)  # all three, then into the same folder without arrays/: the stale PNGs go
    res, _ = _plots(tmp_path, no_arrays)
    assert set(res["skipped"]) == {"thresholds", "mse_curves"}
    assert "--save_data True" in res["skipped"]["mse_curves"] and res["files"] == {"te_ratio": "te_ratio.png"}
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["plots.json", "te_ratio.png"]


def test_single_ratio_skips_te_ratio(tmp_path):
    data, mdir = make_run(tmp_path)
    out = tmp_path / "one"
    translation.main([*run_argv(data, mdir, out, w=("2",), t_e_ratio=("1",)), "--save_data", "True"])
    res, lines = _plots(tmp_path, out)
    assert list(res["skipped"]) == ["te_ratio"] and "--t_e_ratio 0.25 0.5 1" in res["skipped"]["te_ratio"]
    assert set(res["files"]) == {"thresholds", "mse_curves"}


def test_other_runs_data_is_refused(tiny, tmp_path):
    data, out, _ = tiny
    other = tmp_path / "other"
    make_split(other, "test", {"P0": [False, True, True, False], "P1": [False, True, False]}, seed=3)
    with pytest.raises(ValueError, match="not this run's data"):
        anofpdm_plots.make_plots(str(out), data_dir=str(other), out_dir=str(tmp_path / "p"),
                                 log=lambda s: None)


def test_cli_bad_log_dir_one_line_exit_2(tiny, tmp_path, run_script):
    _, out, _ = tiny
    res = run_script("scripts/plot_anofpdm.py", tmp_path / "missing", check=False)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
    assert "missing" in res.stderr and "Traceback" not in res.stderr
    (tmp_path / "empty").mkdir()
    res = run_script("scripts/plot_anofpdm.py", tmp_path / "empty", check=False)
    assert res.returncode == 2 and "metrics.json" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "metrics.json").write_text("{not json")
    res = run_script("scripts/plot_anofpdm.py", tmp_path / "bad", check=False)
    assert res.returncode == 2 and "bad" in res.stderr and "metrics.json" in res.stderr
    res = run_script("scripts/plot_anofpdm.py", out, "--out", tmp_path / "cli",
                     "--setting", "w=9,t_e_ratio=1", check=False)
    assert res.returncode == 2 and "--setting" in res.stderr
    res = run_script("scripts/plot_anofpdm.py", out, "--out", tmp_path / "cli")
    assert sorted(p.name for p in (tmp_path / "cli").iterdir()) == [
        "mse_curves.png", "plots.json", "te_ratio.png", "thresholds.png"]
