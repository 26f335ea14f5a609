"""Issue 24 (trust at the edges), exports: ``--out`` must be new or empty (``--overwrite`` replaces an earlier
export as a whole, atomically); ``--metrics`` / ``--calibration`` must come from the exported weights;
``load_pretrained`` checks config.json against the weights and drops a calibration of other weights."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch
from test_export import _out, _run_dir

from guided_diffusion.cli import run_cli
from guided_diffusion.configs.calibration import Calibration, save_calibrations
from guided_diffusion.export import export, weights_check
from guided_diffusion.export.export import export_run, load_pretrained, main
from guided_diffusion.utils.io_util import file_sha256


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _metrics(path: Path, checkpoint: Path | None) -> Path:
    """A metrics.json of an evaluation of ``checkpoint`` (None: one that records no checkpoint)."""
    run = {} if checkpoint is None else {"checkpoint": str(checkpoint),
                                         "checkpoint_sha256": file_sha256(str(checkpoint))}
    path.write_text(json.dumps({"mixed": {"dice": 0.25}, "primary_setting": "w=2", "run": run}))
    return path


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_out_of_an_evaluation_or_a_training_run_is_refused_untouched(tmp_path, capsys):
    run, _, _ = _run_dir(tmp_path)
    ev = tmp_path / "eval"
    ev.mkdir()
    (ev / "calibration.json").write_text('{"calibrations": []}\n')
    (ev / "config.json").write_text('{"eval": {}}\n')
    (ev / "metrics.json").write_text("{}\n")
    before_eval, before_run = _tree(ev), _tree(run)
    assert run_cli(main, [str(run), "--out", str(ev)]) == 2
    err = _one_error_line(capsys)
    assert f"--out {ev} is not empty" in err and "calibration.json" in err
    assert run_cli(main, [str(run), "--out", str(run)]) == 2
    _one_error_line(capsys)
    # --overwrite replaces an earlier export only, never an evaluation or a training run
    for target in (ev, run):
        assert run_cli(main, [str(run), "--out", str(target), "--overwrite"]) == 2
        err = _one_error_line(capsys)
        assert "--overwrite replaces an earlier export only" in err
    (tmp_path / "file").write_text("x")
    assert run_cli(main, [str(run), "--out", str(tmp_path / "file")]) == 2
    assert "is not a folder" in _one_error_line(capsys)
    assert _tree(ev) == before_eval and _tree(run) == before_run


def test_out_may_be_an_empty_folder(tmp_path):
    run, _, _ = _run_dir(tmp_path)
    out = tmp_path / "empty"
    out.mkdir()
    export_run(str(run), str(out))
    assert sorted(os.listdir(out)) == ["README.md", "calibration.json", "config.json", "model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["empty", "run"]  # no temporary sibling left


def test_overwrite_replaces_the_whole_folder(tmp_path):
    run, model, _ = _run_dir(tmp_path)
    out = tmp_path / "export"
    export_run(str(run), str(out))
    assert (out / "calibration.json").exists()
    os.remove(run / "calibration.json")
    export_run(str(run), str(out), weights="model", overwrite=True)
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["export", "run"]
    model.eval()
    assert torch.equal(_out(load_pretrained(str(out))[0]), _out(model))


@pytest.mark.parametrize("where", ["while writing", "while swapping"])
def test_an_interrupted_overwrite_keeps_the_earlier_export(tmp_path, monkeypatch, where):
    run, _, _ = _run_dir(tmp_path)
    out = tmp_path / "export"
    export_run(str(run), str(out))
    before = _tree(out)
    if where == "while writing":
        real = export.atomic_write_bytes

        def killed(data, path):
            if path.endswith(export.WEIGHTS_FILE):
                raise KeyboardInterrupt
            real(data, path)

        monkeypatch.setattr(export, "atomic_write_bytes", killed)
    else:
        real_replace, calls = os.replace, []

        def killed_replace(src, dst):
            calls.append(dst)
            if len(calls) == 2:  # the earlier export moved aside, the new one not yet in place
                raise KeyboardInterrupt
            real_replace(src, dst)

        monkeypatch.setattr(export.os, "replace", killed_replace)
    with pytest.raises(KeyboardInterrupt):
        export_run(str(run), str(out), weights="model", overwrite=True)
    monkeypatch.undo()
    assert _tree(out) == before
    load_pretrained(str(out))
    assert sorted(os.listdir(tmp_path)) == ["export", "run"]


def test_metrics_of_other_weights_are_refused(tmp_path, capsys):
    run, _, _ = _run_dir(tmp_path)
    raw, ema = run / "model000007.pt", run / "ema_0.9999_000007.pt"
    # an evaluation of the raw weights (translation's default) exported as EMA (the export's default)
    m_raw = _metrics(tmp_path / "raw.json", raw)
    out = tmp_path / "export"
    assert run_cli(main, [str(run), "--out", str(out), "--metrics", str(m_raw)]) == 2
    err = _one_error_line(capsys)
    assert f"--metrics {m_raw}" in err and "model000007.pt" in err and "ema_0.9999_000007.pt" in err
    assert "--weights model" in err
    assert not out.exists()
    no_sha = _metrics(tmp_path / "n.json", None)
    assert run_cli(main, [str(run), "--out", str(out), "--metrics", str(no_sha)]) == 2
    assert "records no checkpoint_sha256" in _one_error_line(capsys)
    # the right pairs are accepted: raw metrics with raw weights, EMA metrics with EMA weights
    assert run_cli(main, [str(run), "--out", str(out), "--metrics", str(m_raw), "--weights", "model"]) == 0
    assert "| 0.2500 |" in (out / "README.md").read_text()
    m_ema = _metrics(tmp_path / "ema.json", ema)
    assert run_cli(main, [str(run), "--out", str(tmp_path / "e2"), "--metrics", str(m_ema)]) == 0
    # an evaluation of the export folder itself (its model.safetensors) belongs to the same weights
    m_exp = _metrics(tmp_path / "exp.json", tmp_path / "e2" / "model.safetensors")
    assert run_cli(main, [str(run), "--out", str(tmp_path / "e3"), "--metrics", str(m_exp)]) == 0


def test_calibration_of_the_export_itself_is_accepted(tmp_path):
    """A calibration keyed to an export's model.safetensors (a run on --model_dir EXPORT) re-exports."""
    run, _, _ = _run_dir(tmp_path, with_cal=False)
    first = tmp_path / "first"
    cfg = export_run(str(run), str(first))
    cal = Calibration(thr_01=0.9, n_min=1, accuracy=0.9, q=0.05, diff_min=[0.1, 0.1], diff_max=[0.5, 0.6],
                      n_val=10, n_healthy=5, n_unhealthy=5, w=2.0, forward_steps=5, modality=[0, 1],
                      checkpoint_sha256=cfg["weights"]["sha256"])
    save_calibrations(str(tmp_path / "cal.json"), {2.0: cal})
    export_run(str(run), str(tmp_path / "second"), calibration=str(tmp_path / "cal.json"))
    assert set(load_pretrained(str(tmp_path / "second"))[2]) == {2.0}


def test_an_inconsistent_config_names_the_field(tmp_path):
    out = _export_with_cal(tmp_path)
    _edit(out, "model", "learn_sigma", True)  # the diffusion section still says False
    with pytest.raises(ValueError, match=r"round-trip .*model.learn_sigma True -> False"):
        load_pretrained(str(out))


def _export_with_cal(tmp_path: Path) -> Path:
    """An EMA export with a calibration made with the exported EMA checkpoint."""
    run, _, _ = _run_dir(tmp_path, with_cal=False)
    cal = Calibration(thr_01=0.9, n_min=1, accuracy=0.9, q=0.05, diff_min=[0.1, 0.1], diff_max=[0.5, 0.6],
                      n_val=10, n_healthy=5, n_unhealthy=5, w=2.0, forward_steps=5, modality=[0, 1],
                      checkpoint_sha256=file_sha256(str(run / "ema_0.9999_000007.pt")))
    save_calibrations(str(run / "calibration.json"), {2.0: cal})
    out = tmp_path / "export"
    export_run(str(run), str(out))
    return out


def test_load_pretrained_drops_a_calibration_of_other_weights(tmp_path):
    out = _export_with_cal(tmp_path)
    path = out / "calibration.json"
    data = json.loads(path.read_text())
    data["calibrations"][0]["checkpoint_sha256"] = "ab" * 32
    path.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match=r"calibration.json .*w=2.* other weights .*dropped"):
        _, _, cal = load_pretrained(str(out))
    assert cal is None


def _edit(out: Path, section: str, key: str, value) -> Path:
    path = out / "config.json"
    cfg = json.loads(path.read_text())
    cfg[section][key] = value
    path.write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize("key, value, found", [
    ("in_channels", 3, "2"), ("num_channels", 16, "8"), ("learn_sigma", True, "False"),
    ("num_classes", None, "2"),
])
def test_load_pretrained_names_the_config_field_that_does_not_fit(tmp_path, key, value, found):
    out = _export_with_cal(tmp_path)
    cfg_path = _edit(out, "model", key, value)
    if key == "learn_sigma":  # a consistent edit: the diffusion section holds it too
        _edit(out, "diffusion", key, value)
    with pytest.raises(ValueError) as err:
        load_pretrained(str(out))
    msg = str(err.value)
    assert "\n" not in msg and f"model.{key}" in msg and str(cfg_path) in msg
    assert str(out / "model.safetensors") in msg and f"weights hold {found}" in msg


@pytest.mark.parametrize("section, key, value", [
    ("model", "image_size", 32), ("model", "num_heads", 2), ("diffusion", "diffusion_steps", 50),
    ("weights", "step", 8), ("weights", "kind", "model"),
])
def test_load_pretrained_checks_shape_free_fields_against_the_weights(tmp_path, section, key, value):
    """Fields that leave every tensor shape alone are checked against the record in model.safetensors."""
    out = _export_with_cal(tmp_path)
    cfg_path = _edit(out, section, key, value)
    with pytest.raises(ValueError) as err:
        load_pretrained(str(out))
    msg = str(err.value)
    assert "\n" not in msg and f"{section}.{key}" in msg and str(cfg_path) in msg
    assert str(out / "model.safetensors") in msg


def test_load_pretrained_of_an_untouched_export_is_silent(tmp_path):
    out = _export_with_cal(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, _, cal = load_pretrained(str(out))
    assert set(cal) == {2.0}


def test_load_pretrained_names_the_likely_fields_when_none_is_read_off_the_weights(tmp_path):
    out = _export_with_cal(tmp_path)
    cfg_path = _edit(out, "model", "channel_mult", [1, 2, 2])  # more blocks: missing tensors
    with pytest.raises(ValueError, match=r"fields that probably differ in .*config.json: .*model.channel_mult"
                                         r".* missing") as err:
        load_pretrained(str(out))
    assert str(cfg_path) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("unet_ver", ["v1", "v2", "hae", "hae_lite", "hae_v2"])
@pytest.mark.parametrize("learn_sigma, class_cond", [(False, True), (True, False)])
def test_fields_read_off_the_weights_agree_with_every_network(unet_ver, learn_sigma, class_cond):
    """The fields check_fits names are read right for every unet_ver (no false accusation)."""
    from test_export import FLAGS

    from guided_diffusion.script_util import create_model_and_diffusion, model_config

    flags = {**FLAGS, "unet_ver": unet_ver, "learn_sigma": learn_sigma, "class_cond": class_cond}
    model, _ = create_model_and_diffusion(**flags)
    found = weights_check.fields_in_weights(model.state_dict())
    cfg = model_config(flags)
    assert set(found) == {"in_channels", "num_channels", "learn_sigma", "num_classes"}
    assert {k: cfg[k] for k in found} == found
