"""Learning curves over training seeds (guided_diffusion/experiments/curves_summary.py): statistics from the
per-seed values, groups that may differ only in the seed, and the entry point's refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from guided_diffusion.cli import run_cli
from guided_diffusion.experiments import curves_summary as cs


def _settings(seed: int, unet_ver: str = "hae_v2", slices: int = 64) -> dict:
    return {"model": {"unet_ver": unet_ver, "num_channels": 16}, "diffusion": {"steps": 1000},
            "train": {"seed": seed, "lr": 5e-4}, "data_dir": "/d", "curves": {"eval_slices": slices}}


def _run(root: Path, name: str, seed: int, dice: dict[int, float | None], **kw) -> str:
    rows = [{"step": s, "test": {"dice": d, "auprc": 0.5 + 0.01 * seed}, "val": {"dice": 0.4}}
            for s, d in dice.items()]
    d = root / name / "curves"
    d.mkdir(parents=True)
    record = {"version": 1, "settings": _settings(seed, **kw), "rows": rows}
    (d / "curves.json").write_text(json.dumps(record))
    return str(root / name)


def test_mean_and_std_over_training_seeds(tmp_path):
    runs = [_run(tmp_path, f"s{s}", s, {1000: 0.1 * (s + 1), 2000: 0.2 + 0.05 * s}) for s in (0, 1, 2)]
    runs.append(_run(tmp_path, "s3", 3, {1000: 0.9}))  # a run that stopped earlier
    summary = cs.summarise({"hae_v2": cs.load_group("hae_v2", runs)})
    steps = {s["step"]: s for s in summary["hae_v2"]["steps"]}
    first = steps[1000]["metrics"]["test.dice"]
    values = np.array([0.1, 0.2, 0.3, 0.9])
    assert first["n"] == 4 and first["mean"] == pytest.approx(values.mean())
    assert first["std"] == pytest.approx(values.std(ddof=1))
    assert first["values"] == {"0": 0.1, "1": 0.2, "2": pytest.approx(0.3), "3": 0.9}
    assert steps[2000]["metrics"]["test.dice"]["n"] == 3
    assert steps[2000]["metrics"]["test.auprc"]["mean"] == pytest.approx(0.51)


def test_missing_values_leave_the_statistics(tmp_path):
    runs = [_run(tmp_path, "a", 0, {1000: None}), _run(tmp_path, "b", 1, {1000: 0.4})]
    stat = cs.summarise({"g": cs.load_group("g", runs)})["g"]["steps"][0]["metrics"]["test.dice"]
    assert (stat["n"], stat["mean"], stat["std"]) == (1, 0.4, 0.0)


def test_a_group_differs_only_in_the_seed(tmp_path):
    a = _run(tmp_path, "a", 0, {1000: 0.1})
    with pytest.raises(ValueError, match="model.unet_ver"):
        cs.load_group("g", [a, _run(tmp_path, "b", 1, {1000: 0.1}, unet_ver="v2")])
    with pytest.raises(ValueError, match="curves.eval_slices"):
        cs.load_group("g", [a, _run(tmp_path, "c", 1, {1000: 0.1}, slices=32)])
    with pytest.raises(ValueError, match="same training seed"):
        cs.load_group("g", [a, _run(tmp_path, "d", 0, {1000: 0.2})])


def test_entry_point_writes_outputs_and_refuses_bad_groups(tmp_path, capsys):
    v2 = [_run(tmp_path, f"v{s}", s, {1000: 0.3, 2000: 0.4}, unet_ver="v2") for s in (0, 1)]
    hae = [_run(tmp_path, f"h{s}", s, {1000: 0.2, 2000: 0.5}) for s in (0, 1)]
    out = tmp_path / "out"
    assert run_cli(cs.main, ["--group", "v2=" + ",".join(v2), "--group", "hae_v2=" + ",".join(hae),
                             "--out", str(out)]) == 0
    rec = json.loads((out / "summary.json").read_text())
    assert set(rec["groups"]) == {"v2", "hae_v2"} and (out / "summary.png").stat().st_size > 0
    assert "at step 2000" in (out / "summary.md").read_text()
    for argv, needle in ((["--group", "v2", "--out", str(out)], "--group 'v2'"),
                         (["--group", f"v2={v2[0]}", "--group", f"v2={v2[1]}", "--out", str(out)], "twice"),
                         (["--group", f"v2={tmp_path / 'nothing'}", "--out", str(out)], "no curves"),
                         (["--group", f"v2={v2[0]}", "--out", str(out), "--step", "3000"], "step 3000")):
        capsys.readouterr()
        assert run_cli(cs.main, argv) == 2
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1


def test_compare_hae_versions_prints_the_summary_table(tmp_path, capsys):
    import compare_hae_versions as chv

    v2 = [_run(tmp_path, f"v{s}", s, {1000: 0.3 + 0.1 * s, 2000: 0.4}, unet_ver="v2") for s in (0, 1)]
    hae = [_run(tmp_path, f"h{s}", s, {1000: 0.2, 2000: 0.5 - 0.1 * s}) for s in (0, 1, 2)]
    out = tmp_path / "out"
    assert run_cli(cs.main, ["--group", "v2=" + ",".join(v2), "--group", "hae_v2=" + ",".join(hae),
                             "--out", str(out)]) == 0
    written = (out / "summary.md").read_text().split("\nProduced by")[0]
    capsys.readouterr()
    assert chv.quality(["--quality", "--summary", str(out)]) == 0
    printed = capsys.readouterr().out
    assert written.strip() in printed and "| hae_v2 (0, 1, 2) | 0.400 ± 0.100 (n=3)" in printed
    assert chv.quality(["--quality", "--summary", str(out), "--step", "1000"]) == 0
    assert "| v2 (0, 1) | 0.350 ± 0.071 (n=2)" in capsys.readouterr().out
    assert chv.quality(["--quality", "--summary", str(tmp_path / "v0")]) == 2
    err = capsys.readouterr().err
    assert "--summary" in err and "summary.json" in err and err.count("\n") == 1


def test_differences_have_welch_intervals(tmp_path, capsys):
    from scipy import stats

    import compare_hae_versions as chv

    ref_dice, dice = [0.30, 0.45, 0.41], [0.38, 0.36, 0.42, 0.33]
    v2 = [_run(tmp_path, f"v{s}", s, {1000: d}, unet_ver="v2") for s, d in enumerate(ref_dice)]
    hae = [_run(tmp_path, f"h{s}", s, {1000: d}) for s, d in enumerate(dice)]
    one = [_run(tmp_path, "k0", 0, {1000: 0.5}, unet_ver="hae")]
    summary = cs.summarise({"v2": cs.load_group("v2", v2), "hae_v2": cs.load_group("hae_v2", hae),
                            "hae": cs.load_group("hae", one)})
    diffs = cs.differences(summary, "v2", 1000)
    expected = stats.ttest_ind(dice, ref_dice, equal_var=False).confidence_interval(0.95)
    cell = diffs["hae_v2"]["test.dice"]
    assert cell["diff"] == pytest.approx(np.mean(dice) - np.mean(ref_dice))
    assert cell["ci95"] == pytest.approx([expected.low, expected.high])
    assert (cell["n"], cell["n_ref"]) == (4, 3)
    assert diffs["hae"]["test.dice"]["ci95"] is None and set(diffs) == {"hae_v2", "hae"}
    assert "one seed: no interval" in cs.differences_md(diffs, "v2", 1000)
    with pytest.raises(ValueError, match="--reference 'v3'"):
        cs.differences(summary, "v3", 1000)
    out = tmp_path / "out"
    assert run_cli(cs.main, ["--group", "v2=" + ",".join(v2), "--group", "hae_v2=" + ",".join(hae),
                             "--out", str(out), "--reference", "v2"]) == 0
    rec = json.loads((out / "summary.json").read_text())
    assert rec["differences"]["hae_v2"]["test.dice"]["ci95"] == pytest.approx(cell["ci95"])
    capsys.readouterr()
    assert chv.quality(["--quality", "--summary", str(out)]) == 0
    assert f"| hae_v2 | {cell['diff']:+.3f} [{cell['ci95'][0]:+.3f}, {cell['ci95'][1]:+.3f}]" in (
        capsys.readouterr().out)


def test_runs_folder_groups_by_label_and_refuses_other_names(tmp_path, capsys):
    root = tmp_path / "curves"
    for s in (0, 1):
        _run(root, f"v2_s{s}", s, {1000: 0.3 + 0.1 * s}, unet_ver="v2")
    for s in (0, 2):
        _run(root, f"hae_v2_b0.5_s{s}", s, {1000: 0.2 + 0.2 * s})
    assert cs.groups_in_folder(str(root)) == {
        "hae_v2_b0.5": [str(root / "hae_v2_b0.5_s0"), str(root / "hae_v2_b0.5_s2")],
        "v2": [str(root / "v2_s0"), str(root / "v2_s1")]}
    out = tmp_path / "out"
    assert run_cli(cs.main, ["--runs", str(root), "--out", str(out)]) == 0
    rec = json.loads((out / "summary.json").read_text())
    assert rec["group_order"] == ["hae_v2_b0.5", "v2"]
    assert rec["groups"]["hae_v2_b0.5"]["seeds"] == [0, 2]
    assert rec["groups"]["hae_v2_b0.5"]["steps"][0]["metrics"]["test.dice"]["mean"] == pytest.approx(0.4)
    twice = ["--group", f"v2={root / 'v2_s0'}", "--runs", str(root), "--out", str(out)]
    for argv, needle in ((twice, "twice"),
                         (["--runs", str(tmp_path / "none"), "--out", str(out)], "is not a folder"),
                         (["--out", str(out)], "--group LABEL=RUN_DIR"),
                         (["--runs", str(root), "--out", str(out)], "'notes' is not named")):
        if needle.startswith("'notes'"):
            (root / "notes").mkdir()
        capsys.readouterr()
        assert run_cli(cs.main, argv) == 2
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1
