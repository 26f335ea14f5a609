"""Experiment runner (guided_diffusion.experiments.experiments): fingerprints, resume semantics,
aggregation, tables;
the side-by-side cost measurement, the plots and the denoiser comparison's smoke preset end to end."""

import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from guided_diffusion.experiments import experiments as ex
from guided_diffusion.experiments.measure import measure_models
from guided_diffusion.reporting import plots

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_FLAGS = dict(image_size=16, in_channels=4, num_classes=2, class_cond=True, num_channels=8,
                  channel_mult="1,2", attention_resolutions="8", num_heads=2, diffusion_steps=100)


class Counter:
    """A fake row function: returns metrics derived from its settings and counts its calls."""

    def __init__(self, value):
        self.value, self.calls = value, 0

    def __call__(self, work):
        self.calls += 1
        assert os.path.isdir(work)
        return {"unhealthy": {"dice": self.value}}


def test_fingerprint_is_canonical_and_sensitive():
    a = ex.fingerprint({"lr": 1e-4, "mult": (1, 2), "nested": {"x": 1, "y": 2}})
    b = ex.fingerprint({"nested": {"y": 2, "x": 1}, "mult": [1, 2], "lr": 1e-4})
    assert a == b
    assert a != ex.fingerprint({"lr": 2e-4, "mult": (1, 2), "nested": {"x": 1, "y": 2}})
    assert a != ex.fingerprint({"lr": 1e-4, "mult": (1, 2), "nested": {"x": 1, "y": 3}})
    with pytest.raises(TypeError, match="cannot enter a fingerprint"):
        ex.fingerprint({"f": object()})
    diff = ex.diff_settings({"a": 1, "n": {"x": 1}, "b": 2}, {"a": 1, "n": {"x": 2}, "c": 3})
    assert diff == ["b", "c", "n.x"]


def test_checkpoint_settings_add_the_file_hash(tmp_path):
    p = tmp_path / "ema.pt"
    p.write_bytes(b"weights-1")
    s1 = ex.checkpoint_settings({"lr": 1}, str(p))
    p.write_bytes(b"weights-2")
    s2 = ex.checkpoint_settings({"lr": 1}, str(p))
    assert s1["checkpoint_sha256"] != s2["checkpoint_sha256"] and len(s1["checkpoint_sha256"]) == 64
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        ex.checkpoint_settings({}, str(tmp_path / "missing.pt"))


def test_finished_row_is_skipped(tmp_path):
    fn = Counter(0.5)
    rows = [ex.Row("v2", 0, {"lr": 1}, fn)]
    first = ex.run_rows(rows, str(tmp_path), log=lambda s: None)
    second = ex.run_rows([ex.Row("v2", 0, {"lr": 1}, fn)], str(tmp_path), log=lambda s: None)
    assert fn.calls == 1
    assert first[0]["metrics"] == second[0]["metrics"] == {"unhealthy": {"dice": 0.5}}
    stored = json.loads((tmp_path / "rows" / "v2_seed0.json").read_text())
    assert stored["fingerprint"] == rows[0].fingerprint and stored["settings"] == {"lr": 1}


def test_changed_setting_is_refused_then_recomputed_never_mixed(tmp_path):
    old = Counter(0.5)
    ex.run_rows([ex.Row("v2", 0, {"lr": 1, "w": [1, 2]}, old)], str(tmp_path), log=lambda s: None)
    before = (tmp_path / "rows" / "v2_seed0.json").read_text()
    new = Counter(0.9)
    fresh = Counter(0.1)
    rows = [ex.Row("hae", 0, {"lr": 1}, fresh), ex.Row("v2", 0, {"lr": 1, "w": [1, 3]}, new)]
    with pytest.raises(ValueError, match=r"v2_seed0 .*differing: w\)"):
        ex.run_rows(rows, str(tmp_path), log=lambda s: None)
    # refused before any work: neither the unchanged-file row nor the new row ran
    assert new.calls == fresh.calls == 0
    assert (tmp_path / "rows" / "v2_seed0.json").read_text() == before
    recs = ex.run_rows(rows, str(tmp_path), on_mismatch="recompute", log=lambda s: None)
    assert new.calls == 1 and recs[1]["metrics"]["unhealthy"]["dice"] == 0.9
    stored = json.loads((tmp_path / "rows" / "v2_seed0.json").read_text())
    assert stored["settings"]["w"] == [1, 3] and stored["fingerprint"] == rows[1].fingerprint
    with pytest.raises(ValueError, match="on_mismatch"):
        ex.run_rows(rows, str(tmp_path), on_mismatch="reuse")


def test_killed_row_resumes_in_its_own_work_dir(tmp_path):
    seen = []

    def flaky(work):
        part = os.path.join(work, "partial.txt")
        seen.append((work, os.path.exists(part)))
        if not os.path.exists(part):
            with open(part, "w") as f:
                f.write("half")
            raise KeyboardInterrupt  # the run is killed after saving partial work
        return {"unhealthy": {"dice": 0.7}}

    row = ex.Row("hae_v2", 1, {"lr": 1}, flaky)
    with pytest.raises(KeyboardInterrupt):
        ex.run_rows([row], str(tmp_path), log=lambda s: None)
    assert not (tmp_path / "rows" / "hae_v2_seed1.json").exists()
    rec = ex.run_rows([row], str(tmp_path), log=lambda s: None)[0]
    assert rec["metrics"]["unhealthy"]["dice"] == 0.7
    assert seen[0][0] == seen[1][0] and seen[1][1] is True  # same work dir, partial work found
    # other settings get another work dir: partial work of the first settings is never picked up
    other = ex.Row("hae_v2", 2, {"lr": 2}, flaky)
    with pytest.raises(KeyboardInterrupt):
        ex.run_rows([other], str(tmp_path), log=lambda s: None)
    assert seen[2][0] != seen[0][0] and seen[2][1] is False


def test_bad_rows_are_rejected(tmp_path):
    fn = Counter(0.1)
    with pytest.raises(ValueError, match="listed twice"):
        ex.run_rows([ex.Row("a", 0, {}, fn), ex.Row("a", 0, {}, fn)], str(tmp_path))
    with pytest.raises(ValueError, match="row name"):
        ex.run_rows([ex.Row("a/b", 0, {}, fn)], str(tmp_path))
    (tmp_path / "rows").mkdir()
    (tmp_path / "rows" / "c_seed0.json").write_text("{trunc")
    with pytest.raises(ValueError, match="c_seed0.json is not valid JSON"):
        ex.run_rows([ex.Row("c", 0, {}, fn)], str(tmp_path))


def test_aggregate_mean_and_population_std():
    recs = [{"name": "v2", "seed": s, "metrics": {"m": {"d": v}, "x": None}}
            for s, v in zip((2, 0, 1), (0.2, 0.4, 0.9))]
    recs.append({"name": "hae", "seed": 0, "metrics": {"m": {"d": float("nan")}}})
    agg = ex.aggregate(recs, ["m.d", "x", "absent.key"])
    assert list(agg) == ["v2", "hae"]
    assert agg["v2"]["seeds"] == [0, 1, 2]
    assert agg["v2"]["m.d"]["mean"] == pytest.approx(0.5)
    assert agg["v2"]["m.d"]["std"] == pytest.approx(math.sqrt((0.3**2 + 0.1**2 + 0.4**2) / 3))
    assert agg["v2"]["m.d"]["n"] == 3
    assert agg["v2"]["x"]["n"] == 0 and math.isnan(agg["v2"]["x"]["mean"])
    assert agg["hae"]["m.d"]["n"] == 0
    assert ex.fmt_cell(agg["v2"]["m.d"], 100, 1) == "50.0 ± 29.4"
    assert ex.fmt_cell(agg["hae"]["m.d"], 100, 1) == "–"


def test_table_writers(tmp_path):
    recs = [{"name": n, "seed": s, "metrics": {"unhealthy": {"dice": v}}}
            for n, s, v in (("v2", 0, 0.5), ("v2", 1, 0.7), ("hae_v2", 0, 0.6))]
    cols = [ex.Column("unhealthy.dice", "unh. DICE (%)", 100, 1)]
    agg = ex.aggregate(recs, [c.key for c in cols])
    prov = {"command": "python scripts/x.py --preset smoke", "checkpoint_sha256": {"v2": "ab" * 32}}
    paths = ex.write_tables(str(tmp_path), "T", cols, agg, prov, notes=["a note"])
    md = open(paths["md"]).read()
    assert "| v2 | 60.0 ± 10.0 |" in md and "| hae_v2 | 60.0 ± 0.0 |" in md
    assert "population std" in md and "python scripts/x.py --preset smoke" in md and "a note" in md
    assert "ab" * 32 in md
    rows = list(csv.reader(open(paths["csv"])))
    assert rows[0][0].startswith("# T") and rows[1][:3] == ["row", "seeds", "unhealthy.dice_mean"]
    assert rows[2][0] == "v2" and float(rows[2][2]) == pytest.approx(0.6)
    assert float(rows[2][3]) == pytest.approx(0.1)
    data = json.load(open(paths["json"]))
    assert data["provenance"]["checkpoint_sha256"]["v2"] == "ab" * 32
    assert data["rows"]["v2"]["unhealthy.dice"]["n"] == 2
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]


def test_train_once_runs_once_and_keys_the_folder_by_settings(tmp_path):
    calls = []

    def cmd(log_dir):
        calls.append(log_dir)
        return [sys.executable, "-c", f"open({os.path.join(log_dir, 'ema_0.9_000004.pt')!r}, 'w').write('x')"]

    d1, c1 = ex.train_once("v2", cmd, {"lr": 1}, str(tmp_path), 4, "0.9", REPO, log=lambda s: None)
    d2, c2 = ex.train_once("v2", cmd, {"lr": 1}, str(tmp_path), 4, "0.9", REPO, log=lambda s: None)
    assert (d1, c1) == (d2, c2) and len(calls) == 1 and os.path.isfile(c1)
    d3, _ = ex.train_once("v2", cmd, {"lr": 2}, str(tmp_path), 4, "0.9", REPO, log=lambda s: None)
    assert d3 != d1 and len(calls) == 2
    fail = lambda log_dir: [sys.executable, "-c", "import sys; sys.exit('bad flag --x')"]  # noqa: E731
    with pytest.raises(RuntimeError, match="exited with 1: bad flag --x"):
        ex.train_once("v2", fail, {"lr": 3}, str(tmp_path), 4, "0.9", REPO, log=lambda s: None)


def test_read_anofpdm_metrics(tmp_path):
    block = {"dice": 0.5, "iou": 0.4, "auprc": 0.6, "dice_lesion": 0.55}
    m = {"mixed": block, "unhealthy": {**block, "dice": 0.3}, "image": {"accuracy": 0.8},
         "primary_setting": "w=3,t_e_ratio=1",
         "settings_results": {"w=1,t_e_ratio=1": {"mixed": {"dice": 0.4}, "unhealthy": {"dice": 0.2}},
                              "w=3,t_e_ratio=1": {"mixed": {"dice": 0.5}, "unhealthy": {"dice": 0.3}},
                              "w=3,t_e_ratio=2": {"mixed": {"dice": 0.1}, "unhealthy": {"dice": 0.1}}},
         "guidance_selection": {"chosen_w": 3.0,
                                "table": [{"w": 1.0, "accuracy": 0.9}, {"w": 3.0, "accuracy": 0.95}]},
         "run": {"timing": {"per_rank": [{"new_slices": 6, "seconds": 3.0, "peak_memory_bytes": 10},
                                         {"new_slices": 4, "seconds": 2.0, "peak_memory_bytes": 20}]}}}
    (tmp_path / "metrics.json").write_text(json.dumps(m))
    r = ex.read_anofpdm_metrics(str(tmp_path))
    assert r["unhealthy"]["dice"] == 0.3 and r["chosen_w"] == 3.0
    assert r["seconds_per_slice"] == pytest.approx(0.5)
    assert r["per_w"] == {"1": {"accuracy": 0.9, "unhealthy_dice": 0.2, "mixed_dice": 0.4},
                          "3": {"accuracy": 0.95, "unhealthy_dice": 0.3, "mixed_dice": 0.5}}
    assert r["peak_memory_bytes"] == 20
    assert set(r["volume"]) == set(ex.VOLUME_METRICS) and r["volume"]["dice_3d_mean"] is None  # older run
    with pytest.raises(FileNotFoundError, match="did not finish"):
        ex.read_anofpdm_metrics(str(tmp_path / "nope"))


def test_denoiser_table_reads_the_volume_columns(tmp_path):
    """metrics.json "volume" -> read_anofpdm_metrics -> the 3-D DICE / HD95 columns of the denoiser table."""
    from guided_diffusion.experiments.denoiser_comparison import COLUMNS

    keys = [c.key for c in COLUMNS]
    assert "volume.dice_3d_mean" in keys and "volume.hd95_mm_mean" in keys
    recs = []
    for seed, (dice, hd95) in enumerate(((0.4, 10.0), (0.6, 20.0))):
        d = tmp_path / f"e{seed}"
        d.mkdir()
        m = {"mixed": {"dice": 0.5}, "unhealthy": {"dice": 0.3}, "image": {}, "primary_setting": "w=1",
             "volume": {"dice_3d_mean": dice, "hd95_mm_mean": hd95, "n_patients": 3}}
        (d / "metrics.json").write_text(json.dumps(m))
        recs.append({"name": "v2", "seed": seed, "metrics": ex.read_anofpdm_metrics(str(d))})
    recs.append({"name": "hae", "seed": 0, "metrics": {"volume": {"dice_3d_mean": None}}})
    agg = ex.aggregate(recs, keys)
    assert agg["v2"]["volume.dice_3d_mean"]["mean"] == pytest.approx(0.5)
    assert agg["v2"]["volume.hd95_mm_mean"]["std"] == pytest.approx(5.0)
    md = open(ex.write_tables(str(tmp_path), "T", COLUMNS, agg, {"command": "x"})["md"]).read()
    head = next(line for line in md.splitlines() if line.startswith("| row"))
    assert head.endswith("| 3-D DICE (%) | HD95 (mm) |")
    v2 = next(line for line in md.splitlines() if line.startswith("| v2 "))
    assert v2.endswith("| 50.0 ± 10.0 | 15.0 ± 5.0 |")
    hae = next(line for line in md.splitlines() if line.startswith("| hae "))
    assert hae.endswith("| – | – |")


def test_measure_models_side_by_side():
    flags = TINY_FLAGS
    res = measure_models(flags, ["v2", "hae_v2"], batch=2, reps=1, warmup=0)
    assert res["v2"]["params_ratio"] == 1.0 and res["v2"]["step_s_ratio"] == 1.0
    assert res["hae_v2"]["params"] > res["v2"]["params"] > 0
    assert res["hae_v2"]["params_ratio"] == pytest.approx(res["hae_v2"]["params"] / res["v2"]["params"])
    assert res["hae_v2"]["step_s"] > 0
    with pytest.raises(ValueError, match="batch"):
        measure_models(flags, ["v2"], batch=0)


def test_cpu_peak_memory_needs_the_allocator_env(tmp_path, monkeypatch):
    """Without CPU_ENV from the start, glibc keeps freed pages and the RSS peak of a later network is
    too low: NaN instead; the command line restarts itself with CPU_ENV and reports a figure."""
    from guided_diffusion.experiments import measure

    for name in measure.CPU_ENV:
        monkeypatch.delenv(name, raising=False)
    flags = TINY_FLAGS
    res = measure_models(flags, ["v2"], batch=2, reps=1, warmup=0)
    assert math.isnan(res["v2"]["peak_mib"]) and res["v2"]["step_s"] > 0
    spec, out = tmp_path / "spec.json", tmp_path / "out.json"
    spec.write_text(json.dumps({"flags": flags, "unet_vers": ["v2"], "batch": 2, "reps": 1, "warmup": 0,
                                "threads": 1}))
    env = {k: v for k, v in os.environ.items() if k not in measure.CPU_ENV}
    proc = subprocess.run([sys.executable, "-m", "guided_diffusion.experiments.measure", str(spec), str(out)],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    peak = json.loads(out.read_text())["v2"]["peak_mib"]
    assert math.isfinite(peak) and peak > 0


def test_measure_models_times_the_fused_cpu_attention_on_request(monkeypatch):
    from guided_diffusion import nn as nn_util
    from tests.training.test_cpu_fused_attention import record_fused_state

    seen = record_fused_state(monkeypatch)
    flags = TINY_FLAGS
    measure_models(flags, ["v2"], batch=2, reps=1, warmup=0)
    assert seen and not any(seen)
    seen.clear()
    res = measure_models(flags, ["v2"], batch=2, reps=1, warmup=0, cpu_fused_attention=True)
    assert seen and all(seen) and res["v2"]["step_s"] > 0
    assert not nn_util._CPU_FUSED_ATTENTION.get()


def test_plots_write_pngs(tmp_path):
    per_w = {"v2": [{"1": {"accuracy": 0.9, "unhealthy_dice": 0.4},
                     "3": {"accuracy": 0.8, "unhealthy_dice": 0.5}}]}
    plots.plot_w_selection(per_w, {"v2": [1.0]}, str(tmp_path / "w.png"))
    stat = {"mean": 0.5, "std": 0.1, "n": 2}
    agg = {"v2": {**{f"{s}.{m}": stat for s in ("mixed", "unhealthy") for m in ("dice", "iou", "auprc")},
                  "cost.params_ratio": {"mean": 1.0}, "seeds": [0, 1]}}
    plots.plot_denoisers(agg, str(tmp_path / "d.png"))
    for name in ("w.png", "d.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def _run(args, cwd=REPO):
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "scripts/compare_denoisers.py", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_paper_preset_builds_the_cluster_commands(tmp_path):
    p = _run(["--preset", "paper", "--dry_run", "--data_dir", str(tmp_path), "--out", str(tmp_path / "o"),
              "--launcher", "python -m torch.distributed.run --nproc-per-node 8"])
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 4 * 3 * (1 + 3)  # 4 networks x 3 training seeds x (train + 3 evaluations)
    prefix = "python -m torch.distributed.run --nproc-per-node 8 scripts/"
    assert all(line.startswith(prefix) for line in lines)
    train = [line for line in lines if "train.py" in line]
    assert len(train) == 12 and all("--image_size 128" in t and "--max_steps 210000" in t for t in train)
    assert sorted(t.split("--seed ")[1].split()[0] for t in train) == sorted(["0", "1", "2"] * 4)
    ev = [line for line in lines if "translation_FPDM.py" in line]
    assert all("--forward_steps 600" in e and "--num_slices_val 1000" in e for e in ev)
    assert {e.split("--seed ")[1].split()[0] for e in ev} == {"0", "1", "2"}
    bad = _run(["--preset", "paper", "--out", str(tmp_path / "o")])
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("error: --preset paper needs")


def test_smoke_preset_end_to_end(tmp_path):
    """Two rows (v2 and an ablation row with its own flag) x two training seeds x two evaluation seeds
    (the full smoke preset is 4 x 1 x 3: see the README): a model folder per (row, training seed), cells =
    mean ± std over the training seeds of the per-seed means, recomputed here from the stored rows."""
    out = str(tmp_path / "cmp")
    args = ["--preset", "smoke", "--out", out, "--rows", "v2", "hae_v2_b0.5", "--train_seeds", "0", "1",
            "--eval_seeds", "0", "1"]
    p = _run(args)
    assert p.returncode == 0, p.stderr[-3000:]
    md = open(os.path.join(out, "table.md")).read()
    for name in ("| v2 |", "| hae_v2_b0.5 |", "v2 [0, 1]", "hae_v2_b0.5 [0, 1]", "over training seeds"):
        assert name in md
    data = json.load(open(os.path.join(out, "table.json")))
    assert data["rows"]["v2"]["cost.params_ratio"]["mean"] == 1.0
    assert data["rows"]["hae_v2_b0.5"]["cost.params_ratio"]["mean"] > 1.0
    assert 0.0 <= data["rows"]["hae_v2_b0.5"]["mixed.dice"]["mean"] <= 1.0
    names = {f"{r}_train{t}" for r in ("v2", "hae_v2_b0.5") for t in (0, 1)}
    assert set(data["provenance"]["checkpoint_sha256"]) == names
    models = sorted(os.listdir(os.path.join(out, "models")))
    assert sorted(m.rsplit("-", 1)[0] for m in models) == sorted(names)  # one folder per (row, seed)
    for m in models:
        settings = json.load(open(os.path.join(out, "models", m, "train_settings.json")))["settings"]
        assert m.startswith(f"{m.split('_train')[0]}_train{settings['train_seed']}-")
        assert settings.get("model_options") == ({"bottleneck_ratio": 0.5} if "b0.5" in m else None)
    for row in ("v2", "hae_v2_b0.5"):
        per_seed = {}
        for t in (0, 1):
            recs = [json.load(open(os.path.join(out, "rows", f"{row}_train{t}_seed{e}.json")))
                    for e in (0, 1)]
            assert [r["meta"]["train_seed"] for r in recs] == [t, t]
            per_seed[t] = {k: float(np.mean([ex.get_path(r["metrics"], k) for r in recs]))
                           for k in ("mixed.dice", "unhealthy.auprc")}
        for key in ("mixed.dice", "unhealthy.auprc"):
            cell, seeds = data["rows"][row][key], [per_seed[0][key], per_seed[1][key]]
            assert cell["n"] == 2
            assert cell["mean"] == pytest.approx(np.mean(seeds))
            assert cell["std"] == pytest.approx(np.std(seeds))
            assert data["rows"][row]["per_train_seed"]["1"][key] == pytest.approx(per_seed[1][key])
        line = next(x for x in md.splitlines() if x.startswith(f"| {row} |"))
        dice = data["rows"][row]["mixed.dice"]
        assert f"| {100 * dice['mean']:.1f} ± {100 * dice['std']:.1f} |" in line
    for f in ("w_selection.png", "denoisers.png", "table.csv", "rows/v2_train1_seed1.json",
              "rows/cost_seed0.json"):
        assert os.path.isfile(os.path.join(out, f)), f
    stored = {f: open(os.path.join(out, "rows", f)).read() for f in os.listdir(os.path.join(out, "rows"))}
    again = _run(args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "train.py" not in again.stdout and "translation_FPDM.py" not in again.stdout
    assert again.stdout.count("skipped") == 2 * 2 * 2 + 1 and again.stdout.count("reused") == 4
    assert {f: open(os.path.join(out, "rows", f)).read() for f in stored} == stored
    other = _run([*args, "--w", "1", "2"])
    assert other.returncode == 2
    assert other.stderr.strip().splitlines()[-1].startswith("error: row v2_train0_seed0 in ")
    assert "(differing: w)" in other.stderr
    np.testing.assert_equal(len(other.stderr.strip().splitlines()), 1)


def test_compare_hae_versions_quality_delegates(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    args = ["--preset", "paper", "--dry_run", "--data_dir", str(tmp_path), "--rows", "hae_v2_b1.0",
            "--train_seeds", "4", "7"]
    p = subprocess.run([sys.executable, "compare_hae_versions.py", "--quality", *args], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    direct = _run(args)
    assert p.stdout == direct.stdout and p.stdout.count("scripts/translation_FPDM.py") == 2 * 3
    lines = p.stdout.strip().splitlines()
    assert all("--unet_ver hae_v2 --bottleneck_ratio 1.0" in line for line in lines)
    assert sorted(x.split("--seed ")[1].split()[0] for x in lines if "train.py" in x) == ["4", "7"]
    bad = subprocess.run([sys.executable, "compare_hae_versions.py", "--quality", "--preset", "paper"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "needs --data_dir" in bad.stderr


def test_compare_denoisers_launcher(tmp_path):
    script = os.path.join(REPO, "config", "run_compare_denoisers_brats.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0 and os.access(script, os.X_OK)
    base = {k: v for k, v in os.environ.items() if k not in ("NPROC", "NNODES", "OUT", "DATA_DIR")}
    proc = subprocess.run(["bash", script], env={**base, "DATA_DIR": str(tmp_path / "nodata")},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and str(tmp_path / "nodata") in proc.stderr
    data = tmp_path / "data"
    for split in ("train", "val", "test"):
        (data / "data_splits" / split).mkdir(parents=True)
    env = {**base, "DATA_DIR": str(data), "PYTHON": "echo", "OUT": str(tmp_path / "o"), "NPROC": "4",
           "MASTER_PORT": "29998", "EXTRA_FLAGS": "--denoisers v2 hae_v2"}
    proc = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.strip()
    head = f"scripts/compare_denoisers.py --preset paper --data_dir {data} --out {tmp_path / 'o'}"
    assert out.startswith(head)
    assert "--launcher echo -m torch.distributed.run --nproc-per-node 4 --nnodes 1 --node-rank 0" in out
    assert "--master-port 29998" in out and out.endswith("--denoisers v2 hae_v2")
    rows = "v2 hae hae_lite hae_v2 hae_skeleton hae_v2_b0.5 hae_v2_b1.0"
    assert f"--train_seeds 0 1 2 --rows {rows} --denoisers" in out  # the defaults; EXTRA_FLAGS last wins
    env = {**env, "TRAIN_SEEDS": "5 6", "ROWS": "hae_skeleton", "EXTRA_FLAGS": ""}
    proc = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("--train_seeds 5 6 --rows hae_skeleton")
