"""Issue 12 done-criterion: an exported model reloads through ``--model_dir EXPORT`` of translation and
reproduces the evaluation of its training run bit-identically (tiny train -> translation -> export ->
translation), with the export's calibration used when it matches and refusals of mismatching flags."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from tiny_eval import MODEL_FLAGS, make_split, run_argv

from guided_diffusion.anofpdm import translation
from guided_diffusion.cli import run_cli
from guided_diffusion.export.export import main as export_main

EVAL = dict(w=("2",), t_e_ratio=("1",))


def _data(root: Path) -> Path:
    data = root / "data"
    make_split(data, "train", {"T0": [False, True, True, False]}, seed=1)
    make_split(data, "val", {"V0": [False, True, True, False], "V1": [False, False, True, False]}, seed=2)
    make_split(data, "test", {"P0": [False, True, True, False], "P1": [True, True, False]}, seed=3)
    for pid in ("P0", "P1"):  # 1.5 x 1.5 x 2.5 mm voxels, raw 32 x 32 in-plane resized to 16 px
        meta = {"affine": np.diag([1.5, 1.5, 2.5, 1.0]).tolist(), "shape": [32, 32, 20], "slice_step": 1}
        (data / "npy_test" / f"patient_{pid}" / "meta.json").write_text(json.dumps(meta))
    return data


def _train(data: Path, log: Path) -> None:
    from guided_diffusion.training.run import main as train_main

    assert train_main([*MODEL_FLAGS, "--data_dir", str(data), "--log_dir", str(log), "--batch_size", "2",
                       "--max_steps", "3", "--save_interval", "3", "--log_interval", "1", "--num_workers",
                       "0", "--lr", "1e-3", "--threshold", "0.5"]) == 0  # label dropout: a null branch that
    # differs from the conditional one (without it the 3-step EMA maps were all but zero and their calibration
    # degenerate on some CPUs: diff_max [0, 7e-20] on an Intel Xeon)


def _view(out: Path) -> dict:
    """What must be reproduced: metrics.json without the run record, calibration numbers (not the
    checkpoint they name), slices.csv and patients.csv."""
    m = json.loads((out / "metrics.json").read_text())
    m.pop("run")
    for c in m["calibration"].values():
        c.pop("checkpoint_sha256")
        c.pop("extra")
    return {"metrics": m, "slices": (out / "slices.csv").read_text(),
            "patients": (out / "patients.csv").read_text()}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export_eval")
    data = _data(root)
    log = root / "train"
    _train(data, log)
    first = root / "eval_run"
    translation.main([*run_argv(data, log, first, **EVAL), "--ema", "True"])  # EMA: the export's default
    export = root / "export"
    cal, metrics = str(first / "calibration.json"), str(first / "metrics.json")
    argv = [str(log), "--out", str(export), "--calibration", cal, "--metrics", metrics]
    assert run_cli(export_main, argv) == 0
    return root, data, first, export


def test_export_reproduces_the_evaluation_bit_identically(exported, monkeypatch):
    root, data, first, export = exported
    calls = []
    real = translation.run_forward_process

    def counting(*a, **k):
        calls.append(a[2].shape[0])
        return real(*a, **k)

    monkeypatch.setattr(translation, "run_forward_process", counting)
    second = root / "eval_export"
    metrics = translation.main(run_argv(data, export, second, **EVAL))
    assert sum(calls) == 7  # test slices only: the export's calibration.json was used, no validation pass
    assert f"using calibration {export / 'calibration.json'}" in (second / "log.txt").read_text()
    assert json.loads((first / "metrics.json").read_text())["run"]["checkpoint"].endswith(
        "ema_0.9999_000003.pt")
    assert _view(second) == _view(first)
    weights = export / "model.safetensors"
    assert metrics["run"]["checkpoint"] == str(weights)
    assert metrics["run"]["checkpoint_step"] == 3  # read from the export's config.json
    assert metrics["run"]["checkpoint_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    cal = json.loads((second / "calibration.json").read_text())["calibrations"][0]
    first_sha = json.loads((first / "metrics.json").read_text())["run"]["checkpoint_sha256"]
    assert cal["checkpoint_sha256"] == metrics["run"]["checkpoint_sha256"]
    assert cal["extra"]["exported_from"]["checkpoint_sha256"] == first_sha
    assert metrics["volume"]["spacing_source"] == "meta.json" and metrics["volume"]["n_patients"] == 2
    card = (export / "README.md").read_text()
    assert "`volume.dice_3d_mean`" in card and "`volume.hd95_mm_mean`" in card


def test_export_calibration_of_other_settings_is_not_used(exported, monkeypatch):
    root, data, _, export = exported
    calls = []
    real = translation.run_forward_process
    monkeypatch.setattr(translation, "run_forward_process",
                        lambda *a, **k: calls.append(a[2].shape[0]) or real(*a, **k))
    out = root / "eval_other"
    argv = run_argv(data, export, out, **EVAL)
    argv[argv.index("--forward_steps") + 1] = "4"  # the export's calibration was made with 5
    translation.main(argv)
    assert sum(calls) == 8 + 7  # recalibrated on the validation split
    assert "not using the export's calibration" in (out / "log.txt").read_text()
    assert "forward_steps" in (out / "log.txt").read_text()


def test_export_calibration_of_other_validation_data_is_not_used(exported, monkeypatch, tmp_path):
    """The export on a data root whose validation split differs (another dataset, or the synthetic data
    built on another CPU type): the run calibrates on its own validation split instead of refusing or
    reusing the export's numbers, and its calibration.json names the data it was made on."""
    root, data, _, export = exported
    other = tmp_path / "data"
    make_split(other, "val", {"V0": [False, True, True, False], "V1": [False, False, True, False]}, seed=7)
    for split in ("train", "test"):  # same train and test splits, other validation slices
        shutil.copytree(data / f"npy_{split}", other / f"npy_{split}")
        shutil.copytree(data / "data_splits" / split, other / "data_splits" / split)
    calls = []
    real = translation.run_forward_process
    monkeypatch.setattr(translation, "run_forward_process",
                        lambda *a, **k: calls.append(a[2].shape[0]) or real(*a, **k))
    out = root / "eval_other_data"
    translation.main(run_argv(other, export, out, **EVAL))
    log = (out / "log.txt").read_text()
    assert sum(calls) == 8 + 7  # recalibrated on the validation split
    assert "not using the export's calibration" in log and "other validation data" in log
    made_on, exported_on = (json.loads((folder / "calibration.json").read_text())["calibrations"][0]["extra"]
                            ["data_sha256"] for folder in (out, export))
    assert made_on != exported_on


@pytest.mark.parametrize("flag, value", [("--seed", "6"), ("--num_slices_val", "3")])
def test_export_calibration_of_another_validation_pass_is_not_used(exported, monkeypatch, flag, value):
    """An evaluation of the export with another noise seed or another number of validation slices than the
    export's calibration was made with calibrates on its own validation pass (a fresh folder would meet
    the same export file, so refusing would leave no way out but --calibration)."""
    root, data, _, export = exported
    calls = []
    real = translation.run_forward_process
    monkeypatch.setattr(translation, "run_forward_process",
                        lambda *a, **k: calls.append(a[2].shape[0]) or real(*a, **k))
    out = root / f"eval_other_pass{flag}"
    translation.main([*run_argv(data, export, out, **EVAL), flag, value])
    log = (out / "log.txt").read_text()
    assert sum(calls) == (8 if flag == "--seed" else 3) + 7  # recalibrated on the validation split
    assert "not using the export's calibration" in log and "another validation pass" in log
    assert flag.lstrip("-") in log
    made = json.loads((out / "calibration.json").read_text())["calibrations"][0]["extra"]
    assert made[flag.lstrip("-")] == int(value)


def test_export_with_other_flags_is_refused_in_one_line(exported, tmp_path):
    _, data, _, export = exported
    argv = run_argv(data, export, tmp_path / "x", **EVAL)
    bad = [*argv]
    bad[bad.index("--num_channels") + 1] = "16"
    bad[bad.index("--diffusion_steps") + 1] = "50"
    with pytest.raises(ValueError, match=r"differs from this run's flags \(num_channels: export 8, this run "
                                         r"16; diffusion_steps: export 40, this run 50\)") as err:
        translation.main(bad)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="holds the weights of step 3 only"):
        translation.main([*argv, "--model_num", "2"])


def test_export_refuses_a_calibration_of_other_weights(exported, tmp_path, capsys):
    root, _, first, _ = exported
    # the first evaluation calibrated the EMA weights: it does not belong to the raw weights
    assert run_cli(export_main, [str(root / "train"), "--out", str(tmp_path / "raw"), "--weights", "model",
                                 "--calibration", str(first / "calibration.json")]) == 2
    err = capsys.readouterr().err
    assert "was made with the checkpoint of sha256" in err and "model000003.pt" in err
    assert err.count("\n") == 1
    assert not (tmp_path / "raw" / "model.safetensors").exists()


def test_an_export_alone_is_enough_to_evaluate(exported, monkeypatch):
    """--model_dir EXPORT --data_dir D --log_dir L, no other flag: the export's network, diffusion and the
    settings of the evaluation its metrics came from; the same numbers as that evaluation."""
    root, data, first, export = exported
    evaluation = json.loads((export / "config.json").read_text())["evaluation"]
    assert evaluation["forward"]["forward_steps"] == 5
    assert evaluation["diffusion"]["timestep_respacing"] == "10"
    assert evaluation["eval"]["seed"] == 5 and "data_dir" not in evaluation["eval"]
    calls = []
    real = translation.run_forward_process
    monkeypatch.setattr(translation, "run_forward_process",
                        lambda *a, **k: calls.append(a[2].shape[0]) or real(*a, **k))
    out = root / "eval_alone"
    translation.main(["--model_dir", str(export), "--data_dir", str(data), "--log_dir", str(out),
                      "--progress", "False", "--num_panels", "0"])
    assert sum(calls) == 7  # the export's calibration matched: test slices only
    assert _view(out) == _view(first)
    # a flag given on the command line still wins over the export's settings (here: recalibrated) ...
    other = root / "eval_alone_other"
    translation.main(["--model_dir", str(export), "--data_dir", str(data), "--log_dir", str(other),
                      "--progress", "False", "--num_panels", "0", "--forward_steps", "4"])
    assert json.loads((other / "config.json").read_text())["forward"]["forward_steps"] == 4
    # ... and one that contradicts the exported network is refused in one line, as before
    with pytest.raises(ValueError, match=r"differs from this run's flags \(num_channels: export 8"):
        translation.main(["--model_dir", str(export), "--data_dir", str(data), "--log_dir", str(root / "x"),
                          "--num_channels", "16"])


def test_an_export_without_an_evaluation_record_names_the_missing_setting(exported, tmp_path):
    """An export made without --metrics has no evaluation settings: the run asks for --w, not a silent
    default."""
    root, data, _, _ = exported
    bare = tmp_path / "bare"
    assert run_cli(export_main, [str(root / "train"), "--out", str(bare)]) == 0
    assert "evaluation" not in json.loads((bare / "config.json").read_text())
    with pytest.raises(ValueError, match="--w"):
        translation.main(
            ["--model_dir", str(bare), "--data_dir", str(data), "--log_dir", str(tmp_path / "o")]
        )
