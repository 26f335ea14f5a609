"""End-to-end AnoFPDM evaluation (scripts/translation_FPDM.py) on a tiny hand-made dataset and UNet."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from guided_diffusion.anofpdm import translation
from guided_diffusion.script_util import create_model_and_diffusion
from guided_diffusion.utils.dist_util import find_free_port

REPO = Path(__file__).resolve().parents[2]
MODEL_FLAGS = [
    "--image_size",
    "32",
    "--in_channels",
    "4",
    "--num_channels",
    "32",
    "--num_res_blocks",
    "1",
    "--channel_mult",
    "1,2",
    "--attention_resolutions",
    "16",
    "--num_heads",
    "1",
    "--diffusion_steps",
    "50",
    "--num_classes",
    "2",
]
MODEL_KW = dict(
    image_size=32,
    in_channels=4,
    num_channels=32,
    num_res_blocks=1,
    channel_mult="1,2",
    attention_resolutions="16",
    num_heads=1,
    diffusion_steps=50,
    num_classes=2,
    class_cond=True,
)


def _write_split(root: Path, split: str, patients: dict[str, list[bool]], rng: np.random.Generator) -> None:
    (root / "data_splits" / split).mkdir(parents=True, exist_ok=True)
    (root / "data_splits" / split / "scans.csv").write_text("".join(f"{p}\n" for p in patients))
    yy, xx = np.mgrid[:32, :32]
    brain = ((yy - 15.5) ** 2 / 13**2 + (xx - 15.5) ** 2 / 11**2) < 1
    for pid, lesions in patients.items():
        pdir = root / f"npy_{split}" / f"patient_{pid}"
        pdir.mkdir(parents=True, exist_ok=True)
        for k, lesion in enumerate(lesions):
            x = np.zeros((1, 4, 32, 32), np.float64)
            for c in range(4):
                x[0, c] = brain * (0.4 + 0.1 * c + 0.05 * rng.standard_normal((32, 32)))
            y = np.zeros((1, 1, 32, 32), np.float32)
            if lesion:
                cy, cx = rng.integers(10, 20, size=2)
                y[0, 0, cy - 4 : cy + 4, cx - 4 : cx + 4] = 1
                x[0, :, cy - 4 : cy + 4, cx - 4 : cx + 4] += 0.6
            np.savez(pdir / f"slice_{20 + k}.npz", x=x, y=y)
        meta = {
            "affine": np.eye(4).tolist(),
            "shape": [32, 32, 40],
            "slices": [20, 20 + len(lesions) - 1],
            "modalities": ["flair", "t1", "t1ce", "t2"],
        }
        (pdir / "meta.json").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Dataset (2 patients per split, healthy and lesion slices) + a random tiny checkpoint."""
    root = tmp_path_factory.mktemp("anofpdm")
    rng = np.random.default_rng(0)
    data = root / "data"
    _write_split(data, "train", {"T0": [False, True]}, rng)
    _write_split(data, "val", {"V0": [False, True, True, False], "V1": [False, False, True, False]}, rng)
    _write_split(data, "test", {"P0": [False, True, True, False], "P1": [True, False, False]}, rng)
    torch.manual_seed(0)
    model, _ = create_model_and_diffusion(**MODEL_KW)
    with torch.no_grad():  # random (not zero-initialised) output layers so eps_y != eps_null
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    mdir = root / "model"
    mdir.mkdir()
    torch.save(model.state_dict(), mdir / "ema_0.9999_000010.pt")
    torch.save(model.state_dict(), mdir / "model000010.pt")
    return data, mdir, root


def _argv(setup, out, *extra):
    data, mdir, _ = setup
    return [
        *MODEL_FLAGS,
        "--data_dir",
        str(data),
        "--model_dir",
        str(mdir),
        "--log_dir",
        str(out),
        "--w",
        "2",
        "--forward_steps",
        "6",
        "--modality",
        "0",
        "3",
        "--batch_size",
        "3",
        "--batch_size_val",
        "4",
        "--ema",
        "True",
        "--seed",
        "3",
        "--progress",
        "False",
        *extra,
    ]


def _metrics_core(path: Path) -> dict:
    m = json.loads(path.read_text())
    m.pop("run")
    return m


def test_translation_outputs_resume_and_determinism(setup, monkeypatch):
    _, _, root = setup
    out = root / "run1"
    calls = []
    real = translation.run_forward_process

    def counting(*a, **k):
        calls.append(a[2].shape[0])
        return real(*a, **k)

    monkeypatch.setattr(translation, "run_forward_process", counting)
    metrics = translation.main(
        _argv(
            setup,
            out,
            "--save_nifti",
            "True",
            "--save_data",
            "True",
            "--num_panels",
            "4",
            "--legacy_metrics",
            "True",
            "--t_e_ratio",
            "1",
            "2",
            "--null",
            "True",
        )
    )
    assert sum(calls) == 8 + 7  # every val slice once (calibration) and every test slice once
    for name in (
        "metrics.json",
        "slices.csv",
        "patients.csv",
        "calibration.json",
        "panels/index.html",
        "nifti/P0_anomaly_map.nii.gz",
        "nifti/P1_pred_mask.nii.gz",
        "log.txt",
    ):
        assert (out / name).is_file(), name
    assert len(list((out / "panels").glob("*.png"))) == 4
    assert len(list((out / "arrays").glob("*.npz"))) == 2 and len(list((out / "results").glob("*.pt"))) == 3
    assert metrics["counts"]["n_slices"] == 7 and set(metrics["settings_results"]) == {
        "w=2,t_e_ratio=1",
        "w=2,t_e_ratio=2",
    }
    assert "legacy" in metrics and 0 <= metrics["mixed"]["dice"] <= 1
    cal = json.loads((out / "calibration.json").read_text())["calibrations"][0]
    assert cal["w"] == 2.0 and cal["n_val"] == 8 and cal["encoding"] == "ddim" and len(cal["diff_max"]) == 2
    slices_csv = (out / "slices.csv").read_text().splitlines()
    assert len(slices_csv) == 1 + 2 * 7
    _check_volume_outputs(out, metrics)

    # --resume after deleting the final outputs: no forward pass at all, identical metrics
    before = _metrics_core(out / "metrics.json")
    arrays_before = dict(np.load(out / "arrays" / "w=2_t_e_ratio=1.npz"))
    for name in ("metrics.json", "slices.csv", "patients.csv"):
        (out / name).unlink()
    shutil.rmtree(out / "panels")
    calls.clear()
    translation.main(
        _argv(
            setup,
            out,
            "--resume",
            "True",
            "--legacy_metrics",
            "True",
            "--t_e_ratio",
            "1",
            "2",
            "--save_data",
            "True",
        )
    )
    assert calls == []
    assert _metrics_core(out / "metrics.json") == before and (out / "panels" / "index.html").is_file()

    # a fresh run with the same seed gives bit-identical anomaly maps; a partially finished run resumes
    out2 = root / "run2"
    translation.main(
        _argv(
            setup,
            out2,
            "--calibration",
            str(out / "calibration.json"),
            "--t_e_ratio",
            "1",
            "2",
            "--save_data",
            "True",
            "--legacy_metrics",
            "True",
        )
    )
    arrays2 = dict(np.load(out2 / "arrays" / "w=2_t_e_ratio=1.npz"))
    assert np.array_equal(arrays_before["anomaly_map"], arrays2["anomaly_map"])
    assert np.array_equal(arrays_before["mse_h"], arrays2["mse_h"])
    assert _metrics_core(out2 / "metrics.json") == before
    first = sorted((out2 / "results").glob("*.pt"))[0]
    first.unlink()
    calls.clear()
    translation.main(
        _argv(setup, out2, "--resume", "True", "--t_e_ratio", "1", "2", "--legacy_metrics", "True")
    )
    assert calls == [3]  # only the deleted batch is recomputed
    assert _metrics_core(out2 / "metrics.json") == before


def _check_volume_outputs(out: Path, metrics: dict) -> None:
    """The per-patient 3-D metrics of the primary setting: metrics.json "volume", patients.csv, index.html."""
    import csv

    from guided_diffusion.metrics.volume_metrics import HD_MAX_MM

    vol = metrics["volume"]
    assert vol == json.loads((out / "metrics.json").read_text())["volume"]
    assert vol["setting"] == metrics["primary_setting"] == "w=2,t_e_ratio=1"
    assert vol["n_patients"] == 2 and vol["n_patients_lesion"] == 2 and vol["spacing_source"] == "meta.json"
    assert "373.13 mm" in vol["conventions"]["empty_one"] and "= 1" in vol["conventions"]["empty_both"]
    for key in ("dice_3d_mean", "iou_3d_mean", "lesion_f1_mean", "lesion_dice_mean", "lesion_f1_pooled"):
        assert 0 <= vol[key] <= 1, key
    assert 0 <= vol["asd_mm_mean"] <= vol["hd95_mm_mean"] <= HD_MAX_MM
    with open(out / "patients.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    primary = [r for r in rows if r["setting"] == vol["setting"]]
    assert len(primary) == 2 and all(r["dice_3d"] == "" for r in rows if r not in primary)
    for r in primary:
        # 3-D Dice of the stacked slices = the evaluator's per-patient Dice from pooled counts
        assert float(r["dice_3d"]) == pytest.approx(float(r["dice"]), abs=1e-12)
        assert int(r["n_slices_3d"]) == int(r["n_slices"]) and r["n_slices_missing"] == "0"
        assert float(r["spacing_z_mm"]) == 1.0 and float(r["spacing_y_mm"]) == 1.0
        assert 0 <= float(r["hd95_mm"]) <= float(r["hd_mm"]) <= HD_MAX_MM
        tp, fp, fn = (int(r[f"lesion_{k}"]) for k in ("tp", "fp", "fn"))
        assert tp + fn >= 1 and tp + fp + fn <= 8
    n_fp = sum(int(r["lesion_fp"]) for r in primary)
    assert vol["lesion_fp"] == n_fp
    page = (out / "panels" / "index.html").read_text()
    assert "Volume metrics (3-D, per patient; w=2,t_e_ratio=1)" in page and "HD95 (mm)" in page


def test_translation_errors(setup, tmp_path):
    data, mdir, root = setup
    argv = _argv(setup, tmp_path / "e")
    with pytest.raises(FileNotFoundError, match="model_dir"):
        translation.main([*argv, "--model_dir", str(tmp_path / "missing")])
    with pytest.raises(FileNotFoundError, match="step 7"):
        translation.main([*argv, "--model_num", "7"])
    with pytest.raises(ValueError, match="contradicts"):
        translation.parse_args([*argv, "--d_reverse", "False", "--encoding", "ddim"])
    cal = tmp_path / "cal.json"
    translation.save_calibrations(
        str(cal),
        {
            2.0: translation.calibrate(
                torch.rand(2, 6, 2),
                torch.rand(2, 6, 2),
                torch.rand(2, 6, 2) + 0.1,
                [0, 1],
                w=2.0,
                forward_steps=6,
                modality=[0, 3],
                checkpoint_sha256="0" * 64,
            )
        },
    )
    with pytest.raises(ValueError, match="checkpoint_sha256"):
        translation.main([*argv, "--calibration", str(cal)])
    with pytest.raises(ValueError, match="w=\\[3.0\\]"):
        translation.main([*argv, "--calibration", str(cal), "--w", "3"])
    run = translation.parse_args([*argv, "--d_reverse", "False"])
    assert run.forward.encoding == "ddpm" and run.model.class_cond
    hae_v2 = {"unet_ver": "hae_v2", "use_hae": True}  # the script's forced flags (it is not importable)
    assert f"HAE_V2_OVERRIDES = {hae_v2!r}".replace("'", '"') in (
        REPO / "scripts" / "translation_FPDM_hae_v2.py").read_text()
    assert translation.parse_args(argv, hae_v2).model.unet_ver == "hae_v2"
    with pytest.raises(ValueError, match="--unet_ver v2 contradicts"):
        translation.parse_args([*argv, "--unet_ver", "v2"], hae_v2)


@pytest.mark.slow
def test_one_vs_two_processes_equal_metrics(setup):
    _, _, root = setup
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    outs = {}
    for n in (1, 2):
        out = root / f"dist{n}"
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(n),
            "--master-port",
            str(find_free_port()),
            str(REPO / "scripts" / "translation_FPDM.py"),
            *_argv(setup, out, "--t_e_ratio", "1"),
        ]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs[n] = out
    assert _metrics_core(outs[1] / "metrics.json") == _metrics_core(outs[2] / "metrics.json")
    assert (outs[1] / "calibration.json").read_text() == (outs[2] / "calibration.json").read_text()


def test_min_cc_size_scales_with_image_size(setup):
    from guided_diffusion.configs.eval_configs import resolve_min_cc_size

    assert resolve_min_cc_size(-1, 128) == 40 and resolve_min_cc_size(-1, 64) == 10
    assert resolve_min_cc_size(-1, 256) == 160 and resolve_min_cc_size(-1, 32) == 3  # 2.5 rounds up
    assert resolve_min_cc_size(0, 128) == 0 and resolve_min_cc_size(7, 64) == 7
    with pytest.raises(ValueError, match="--min_cc_size"):
        resolve_min_cc_size(-2, 64)
    argv = _argv(setup, "unused")
    assert translation.parse_args(argv).segment.min_cc_size == -1
    with pytest.raises(ValueError, match="--min_cc_size"):
        translation.parse_args([*argv, "--min_cc_size", "-5"])


def test_several_w_primary_is_the_selected_w(setup, monkeypatch):
    """--w 1 2 3: top-level metrics / panels use the w of calibration.select_guidance, not the first w."""
    _, _, root = setup
    out = root / "multi_w"
    real = translation.get_calibrations
    accuracy = {1.0: 0.90, 2.0: 0.895, 3.0: 0.50}  # 2 is within 99 % of the best, 3 is not

    def rigged(args, *a, **k):
        cals = real(args, *a, **k)
        for w, c in cals.items():
            c.accuracy = accuracy[w]
        return cals

    monkeypatch.setattr(translation, "get_calibrations", rigged)
    fast = ("--num_slices_val", "4", "--forward_steps", "4")  # V0 holds healthy and lesion slices
    metrics = translation.main(
        _argv(setup, out, "--w", "1", "2", "3", "--num_slices", "3", "--num_panels", "2", *fast)
    )
    assert metrics["primary_setting"] == "w=2,t_e_ratio=1"
    sel = metrics["guidance_selection"]
    assert sel["chosen_w"] == 2.0 and sel["tolerance"] == 0.99
    assert [r["w"] for r in sel["table"]] == [1.0, 2.0, 3.0]
    assert [r["selected"] for r in sel["table"]] == [False, True, False]
    assert [r["accuracy"] for r in sel["table"]] == [0.90, 0.895, 0.50]
    assert metrics["mixed"] == metrics["settings_results"]["w=2,t_e_ratio=1"]["mixed"]
    assert metrics["settings"]["min_cc_size"] == 3 and metrics["run"]["min_cc_size"] == 3  # 32 px
    stored = json.loads((out / "metrics.json").read_text())
    assert stored["guidance_selection"]["chosen_w"] == 2.0
    assert "w=2,t_e_ratio=1" in (out / "panels" / "index.html").read_text()
    assert "guidance selection" in (out / "log.txt").read_text()
    # a stricter tolerance keeps only the best accuracy -> w = 1 (stored calibration: no validation pass)
    metrics = translation.main(
        _argv(
            setup,
            root / "multi_w_strict",
            *("--w", "1", "2", "3", "--num_slices", "2", "--num_panels", "0", *fast),
            *("--selection_tolerance", "1.0", "--calibration", str(out / "calibration.json")),
        )
    )
    assert (
        metrics["primary_setting"] == "w=1,t_e_ratio=1" and metrics["guidance_selection"]["chosen_w"] == 1.0
    )
    # a single w keeps the old behaviour: no selection block
    single = translation.choose_primary_w([2.0], {})
    assert single == (2.0, None)


# ------------------------------------------------------------------------- gradient SAM, lock, inference
def _tiny(tmp_path, *extra, w=("2",)):
    """(data, model dir, argv) of the 16 px tiny run (tests/tiny_eval.py), one w and one t_e ratio."""
    from tiny_eval import make_run, run_argv

    data, mdir = make_run(tmp_path)
    return data, mdir, [*run_argv(data, mdir, tmp_path / "out", w=w, t_e_ratio=("1",)), *extra]


def _set_log_dir(argv, out):
    argv = list(argv)
    argv[argv.index("--log_dir") + 1] = str(out)
    return argv


def _result_maps(out: Path) -> dict[int, np.ndarray]:
    recs = {}
    for f in sorted((out / "results").glob("slices_*.pt")):
        recs.update({r["idx"]: r for r in torch.load(f, weights_only=False)})
    return {i: next(iter(r["out"].values()))["map"] for i, r in recs.items()}


def test_gradient_sam_flags_reach_the_forward_process(tmp_path, monkeypatch):
    _, _, argv = _tiny(tmp_path, "--use_gradient_sam", "True", "--use_gradient_para_sam", "True",
                       "--legacy_segmentation", "True", "--num_slices", "3", "--num_slices_val", "4")
    seen: list[dict] = []
    real = translation.run_forward_process

    def spy(*a, **k):
        seen.append(dict(k))
        return real(*a, **k)

    monkeypatch.setattr(translation, "run_forward_process", spy)
    metrics = translation.main(argv)
    val, test = seen[0], seen[-1]
    assert "sam_mode" not in val  # the calibration statistics do not depend on the SAM kind
    assert test["sam_mode"] == "gradient_para" and test["legacy_gradient_schedule"] is True
    assert metrics["run"]["sam_mode"] == "gradient_para"
    # the SAM kind changes the per-slice results (resume fingerprint), not the calibration match keys
    run = translation.parse_run(argv)
    assert run.result_settings()["use_gradient_sam"] is True
    assert "use_gradient_sam" not in run.stats_settings()


def test_gradient_sam_changes_the_maps_end_to_end(tmp_path):
    _, _, argv = _tiny(tmp_path, "--num_slices", "3")
    default = translation.main(_set_log_dir(argv, tmp_path / "default"))
    translation.main(_set_log_dir([*argv, "--use_gradient_sam", "True"], tmp_path / "grad"))
    a, b = _result_maps(tmp_path / "default"), _result_maps(tmp_path / "grad")
    assert sorted(a) == sorted(b) == [0, 1, 2]
    assert all(not np.allclose(a[i], b[i]) for i in a)
    stored = json.loads((tmp_path / "grad" / "metrics.json").read_text())
    assert stored["run"]["sam_mode"] == "gradient" and default["run"]["sam_mode"] == "default"
    assert stored["calibration"] == default["calibration"]  # same validation statistics


def test_gradient_para_sam_alone_is_refused_in_one_line(tmp_path, capsys):
    from guided_diffusion.cli import run_cli

    _, _, argv = _tiny(tmp_path, "--use_gradient_para_sam", "True")
    assert run_cli(translation.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--use_gradient_para_sam" in err[0] and "--use_gradient_sam" in err[0]
    assert not (tmp_path / "out").exists()


def test_a_second_run_into_a_locked_log_dir_stops_at_once(tmp_path, capsys):
    import os

    from guided_diffusion.cli import run_cli
    from guided_diffusion.utils.run_lock import run_lock
    from scripts import select_guidance as select_script

    _, _, argv = _tiny(tmp_path, "--num_slices", "2", "--num_slices_val", "4")
    out = tmp_path / "out"
    with run_lock(str(out)):  # another run holds the folder
        assert run_cli(translation.main, argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "in use by another run" in err[0] and f"pid {os.getpid()}" in err[0]
        test_only = ("--num_slices", "--batch_size", "--t_e_ratio", "--num_panels")
        sel = [a for i, a in enumerate(argv) if a not in test_only and argv[i - 1] not in test_only]
        assert run_cli(select_script.main, sel) == 2
        assert "in use by another run" in capsys.readouterr().err
    assert not (out / "log.txt").exists() and not (out / "metrics.json").exists()
    # the evaluation itself holds the lock while it runs, and drops it at the end
    held = []
    real = translation.get_calibrations

    def probe(*a, **k):
        with pytest.raises(OSError, match="in use by another run"):
            with run_lock(str(out)):
                pass
        held.append(True)
        return real(*a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(translation, "get_calibrations", probe)
        translation.main(argv)
    assert held == [True]
    with run_lock(str(out)):
        pass


def test_data_summary_reports_all_zero_slices_and_empty_patients(tmp_path):
    data, _, argv = _tiny(tmp_path)
    blank = data / "npy_test" / "patient_P1" / "slice_11.npz"
    with np.load(blank) as z:
        np.savez(blank, x=np.zeros_like(z["x"]), y=z["y"])
    (data / "npy_val" / "patient_V9").mkdir()
    with open(data / "data_splits" / "val" / "scans.csv", "a") as f:
        f.write("V9\n")
    with pytest.warns(UserWarning):
        translation.main(argv)
    log = (tmp_path / "out" / "log.txt").read_text().splitlines()
    test_line = [ln for ln in log if ln.startswith("data: test split")]
    val_line = [ln for ln in log if ln.startswith("data: val split")]
    assert len(test_line) == 1 and "warning: 1 all-zero slices read" in test_line[0]
    assert len(val_line) == 1 and "1 empty patient folders skipped" in val_line[0]
    assert "all-zero" not in val_line[0]


def test_precision_and_early_stop_reach_both_passes_bf16_on_cpu(tmp_path, monkeypatch):
    _, _, argv = _tiny(tmp_path, "--precision", "bf16", "--early_stop_patience", "2", "--num_slices", "3",
                       "--num_slices_val", "4", "--forward_steps", "8")
    seen: list[tuple[int, dict]] = []
    real = translation.run_forward_process

    def spy(*a, **k):
        fr = real(*a, **k)
        seen.append((fr.steps_run, dict(k)))
        return fr

    monkeypatch.setattr(translation, "run_forward_process", spy)
    metrics = translation.main(argv)
    assert len(seen) == 2  # one validation batch (4), one test batch (3)
    assert all(k["precision"] == "bf16" and k["early_stop_patience"] == 2 for _, k in seen)
    timing = metrics["run"]["timing"]
    assert timing["steps_run_mean"] == seen[-1][0] and 1 <= seen[-1][0] <= 8 and timing["forward_steps"] == 8
    assert metrics["run"]["precision"] == "bf16"
    assert 0.0 <= metrics["mixed"]["dice"] <= 1.0
    cal = json.loads((tmp_path / "out" / "calibration.json").read_text())["calibrations"][0]
    assert np.isfinite(cal["thr_01"]) and all(np.isfinite(cal["diff_max"]))
    assert cal["settings"]["precision"] == "bf16" and cal["settings"]["early_stop_patience"] == 2
    # a resume under another precision stops and names it (the stored calibration does not match)
    with pytest.raises(ValueError, match="precision"):
        translation.main([*argv, "--resume", "True", "--precision", "fp32"])
    # without early stop the timing has no steps_run_mean and every pass runs all steps
    seen.clear()
    plain = translation.main(_set_log_dir([*argv, "--early_stop_patience", "0"], tmp_path / "plain"))
    assert "steps_run_mean" not in plain["run"]["timing"] and all(n == 8 for n, _ in seen)


def test_resume_with_another_precision_stops_naming_it(tmp_path):
    from guided_diffusion.cli import run_cli

    _, _, argv = _tiny(tmp_path, "--num_slices", "3", "--num_slices_val", "4")
    translation.main(argv)
    with pytest.raises(ValueError, match="precision: .*'fp32'.*'bf16'"):
        translation.main([*argv, "--resume", "True", "--precision", "bf16"])
    # the fp32 calibration given explicitly is refused as well
    cal = str(tmp_path / "out" / "calibration.json")
    with pytest.raises(ValueError, match="precision"):
        translation.main([*argv, "--resume", "True", "--precision", "bf16", "--calibration", cal])
    assert run_cli(translation.main, [*argv, "--resume", "True", "--early_stop_patience", "3"]) == 2


def test_fp16_on_cpu_is_refused_in_one_line(tmp_path, capsys):
    from guided_diffusion.cli import run_cli

    _, _, argv = _tiny(tmp_path, "--precision", "fp16")
    assert run_cli(translation.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--precision fp16 needs a CUDA device" in err[0]
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_batch_size_auto_and_compile_fallback(tmp_path, monkeypatch):
    from guided_diffusion.anofpdm import translation_runtime

    _, _, argv = _tiny(tmp_path, "--num_slices", "3", "--num_slices_val", "4")
    ref = translation.main(_set_log_dir(argv, tmp_path / "ref"))

    def broken(model, enabled, **kw):  # a compiler that wraps fine and fails at the first call
        def call(*a, **k):
            raise RuntimeError("no C++ compiler\nsecond line")
        return call

    monkeypatch.setattr(translation_runtime, "maybe_compile", broken)
    out = tmp_path / "auto"
    auto = [*_set_log_dir(argv, out), "--batch_size", "auto", "--batch_size_val", "auto", "--compile", "True"]
    metrics = translation.main(auto)
    log = (out / "log.txt").read_text()
    assert "--batch_size auto: 8 on cpu" in log and "--batch_size_val auto: 8 on cpu" in log
    assert ("--compile: torch.compile failed on this platform (RuntimeError: no C++ compiler); "
            "running eagerly") in log
    assert metrics["run"]["timing"]["batch_size"] == 8 and metrics["run"]["config"]["eval"]["batch_size"] == 8
    assert json.loads((out / "config.json").read_text())["eval"]["batch_size"] == "auto"
    assert metrics["mixed"] == ref["mixed"] and metrics["settings_results"] == ref["settings_results"]
    # --compile is a RESULT setting only: the calibration is reused, the per-slice results are not
    with pytest.raises(ValueError, match="compile"):
        translation.main([*_set_log_dir(argv, tmp_path / "ref"), "--resume", "True", "--compile", "True"])
    run = translation.parse_run(auto)
    assert run.result_settings()["compile"] is True and "compile" not in run.stats_settings()
    with pytest.raises(ValueError, match="--batch_size must be a positive integer or 'auto'"):
        translation.parse_run([*argv, "--batch_size", "0"])
