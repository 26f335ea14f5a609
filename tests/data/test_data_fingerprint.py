"""Issue 24 item 1: stored results and trained models are keyed by the content of the data they were
computed from (guided_diffusion/data/fingerprint.py), so a dataset regenerated or re-preprocessed in place
is never silently reused: the runners, the evaluation's resume and calibration and training's resume
refuse (or recompute) with one line naming what changed."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from fake_data import write_fake_brats
from tiny_eval import make_split, run_argv

from guided_diffusion.anofpdm import translation
from guided_diffusion.cli import run_cli
from guided_diffusion.configs.calibration import Calibration
from guided_diffusion.data import fingerprint as fpm
from guided_diffusion.data import stored_calibration
from guided_diffusion.data.fingerprint import CACHE_NAME, data_fingerprint
from guided_diffusion.experiments import denoiser_comparison as dc
from guided_diffusion.experiments import experiments as ex
from guided_diffusion.training import run as training


def _rewrite_same_size(path: Path) -> None:
    """Change one slice's content in place keeping its name and size (a regenerated dataset)."""
    with np.load(path) as z:
        x, y = z["x"].copy(), z["y"].copy()
    np.savez(path, x=(x[..., ::-1, :] + 0.25).astype(x.dtype), y=y)


def _first_slice(root: Path, split: str) -> Path:
    return sorted((root / f"npy_{split}").glob("patient_*/slice_*.npz"))[0]


@pytest.fixture
def data(tmp_path) -> Path:
    root = tmp_path / "data"
    make_split(root, "train", {"T0": [False, True]}, seed=1)
    make_split(root, "val", {"V0": [False, True]}, seed=2)
    make_split(root, "test", {"P0": [True, False], "P1": [False]}, seed=3)
    return root


# ------------------------------------------------------------------------------------ the fingerprint
def test_in_place_change_of_same_size_changes_the_identity(data):
    """The old identity hashed the names and sizes of data_splits/*/scans.csv: a regenerated slice kept
    it; the content fingerprint changes (and names the folder and the count)."""
    before = dc.data_identity(str(data))
    f = _first_slice(data, "test")
    size = f.stat().st_size
    _rewrite_same_size(f)
    assert f.stat().st_size == size
    after = dc.data_identity(str(data))
    assert after != before
    line = fpm.explain(str(data), before, data_fingerprint(str(data)))
    assert f"{data / 'npy_test'}: 1 slice files changed since " in line
    assert f"(fingerprint {before[:8]} -> {after[:8]})" in line and "\n" not in line
    # a split list edited by hand changes it too
    (data / "data_splits" / "val" / "scans.csv").write_text("V0\nV9\n")
    assert dc.data_identity(str(data)) != after


def test_cache_rehashes_only_changed_files_and_is_atomic(data, monkeypatch):
    first = data_fingerprint(str(data))
    cache = json.loads((data / CACHE_NAME).read_text())
    assert set(cache["files"]) == set(first.files) and len(first.files) == 7 + 3
    assert all({"size", "mtime_ns", "sha256"} <= set(e) for e in cache["files"].values())
    hashed: list[str] = []
    real = fpm.file_sha256
    monkeypatch.setattr(fpm, "file_sha256", lambda p: hashed.append(p) or real(p))
    assert data_fingerprint(str(data)) == first and hashed == []
    f = _first_slice(data, "val")
    _rewrite_same_size(f)
    second = data_fingerprint(str(data))
    assert hashed == [str(f)] and second.digest != first.digest
    assert second.split_digests["train"] == first.split_digests["train"]
    assert not [n for n in os.listdir(data) if ".tmp-" in n]
    # a fingerprint of one split does not depend on the others
    assert data_fingerprint(str(data), ("train",)).digest == data_fingerprint(str(data), ["train"]).digest


def test_read_only_data_still_works(data, monkeypatch):
    """A cache that cannot be written (read-only data; simulated, as the tests may run as root) is skipped:
    same fingerprint, every file hashed."""
    import errno

    from guided_diffusion.utils import io_util

    ref = data_fingerprint(str(data)).digest
    (data / CACHE_NAME).unlink()

    def read_only(*_a, **_k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(io_util, "atomic_write_bytes", read_only)
    assert data_fingerprint(str(data)).digest == ref
    assert data_fingerprint(str(data)).digest == ref
    assert not (data / CACHE_NAME).exists()


def test_missing_split_folder_is_one_line(tmp_path):
    root = write_fake_brats(tmp_path / "d")
    with pytest.raises(FileNotFoundError, match=r"has no npy_val/ folder"):
        data_fingerprint(str(root))
    assert len(data_fingerprint(str(root), ("train",)).digest) == 64


# ------------------------------------------------------------------------------------ the runners' rows
def _rows(data: Path, calls: list[str]) -> list[ex.Row]:
    settings = {"data_dir": str(data), "data_sha256": dc.data_identity(str(data)), "w": 1.0}

    def fn(work: str) -> dict:
        calls.append(work)
        return {"dice": 0.5}
    return [ex.Row("flair", 0, settings, fn)]


def test_rows_on_changed_data_are_refused_naming_the_change(data, tmp_path):
    out, calls = str(tmp_path / "out"), []
    ex.run_rows(_rows(data, calls), out)
    ex.run_rows(_rows(data, calls), out)
    assert len(calls) == 1  # same data: skipped
    old = dc.data_identity(str(data))
    _rewrite_same_size(_first_slice(data, "test"))
    new = dc.data_identity(str(data))
    with pytest.raises(ValueError) as err:
        ex.run_rows(_rows(data, calls), out)
    msg = str(err.value)
    assert "row flair_seed0" in msg and "computed on other data" in msg and "\n" not in msg
    assert "npy_test: 1 slice files changed" in msg and f"{old[:8]} -> {new[:8]}" in msg
    with pytest.raises(ValueError, match="npy_test: 1 slice files changed"):
        ex.refuse_rows_on_other_data(out, str(data), new)  # before any training
    logs: list[str] = []
    ex.run_rows(_rows(data, calls), out, "recompute", log=logs.append)
    assert len(calls) == 2 and any("the data changed" in line and "npy_test" in line for line in logs)
    ex.refuse_rows_on_other_data(out, str(data), new)


def test_train_once_retrains_on_changed_data_and_says_why(data, tmp_path):
    models = str(tmp_path / "models")

    def cmd(log_dir: str) -> list[str]:
        return [sys.executable, "-c", f"open({os.path.join(log_dir, 'model000001.pt')!r}, 'w').close()"]

    def settings() -> dict:
        return {"data_dir": str(data), "data_sha256": dc.data_identity(str(data)), "steps": 1}

    logs: list[str] = []
    first, _ = ex.train_once("fpdm", cmd, settings(), models, 1, None, str(tmp_path), log=logs.append)
    again, _ = ex.train_once("fpdm", cmd, settings(), models, 1, None, str(tmp_path), log=logs.append)
    assert again == first and "reused" in logs[-1]
    _rewrite_same_size(_first_slice(data, "train"))
    second, _ = ex.train_once("fpdm", cmd, settings(), models, 1, None, str(tmp_path), log=logs.append)
    assert second != first
    assert any(f"the model in {first} was trained on other data" in line and "npy_train: 1 slice files "
               "changed" in line for line in logs), logs


# ------------------------------------------------------------------------------------ evaluation resume
def _evaluated(tmp_path: Path) -> tuple[Path, Path, list[str]]:
    """A finished tiny evaluation (tests/tiny_eval.py) -> (data dir, log dir, its argv with --resume)."""
    from tiny_eval import make_run

    data, mdir = make_run(tmp_path)
    run = tmp_path / "run"
    argv = run_argv(data, mdir, run, t_e_ratio=("1",))
    translation.main(argv)
    return data, run, [*argv, "--resume", "True"]


def test_eval_resume_on_changed_test_data_is_refused(tmp_path):
    data, _, argv = _evaluated(tmp_path)
    translation.main(argv)  # same data: resumes
    _rewrite_same_size(_first_slice(data, "test"))
    with pytest.raises(ValueError) as err:
        translation.main(argv)
    msg = str(err.value)
    assert "per-slice results" in msg and "computed on other data" in msg and "\n" not in msg
    assert f"{data / 'npy_test'}: 1 slice files changed" in msg


def test_resumed_calibration_on_changed_validation_data_is_refused(tmp_path):
    data, _, argv = _evaluated(tmp_path)
    _rewrite_same_size(_first_slice(data, "val"))
    with pytest.raises(ValueError) as err:
        translation.main(argv)
    msg = str(err.value)
    assert "calibration" in msg and "other validation data" in msg and "\n" not in msg
    assert f"{data / 'npy_val'}: 1 slice files changed" in msg


# ------------------------------------------------------------------------------------ training resume
TINY = ["--image_size", "16", "--num_channels", "16", "--in_channels", "2", "--num_classes", "2",
        "--channel_mult", "1,2", "--attention_resolutions", "8", "--num_heads", "1", "--num_res_blocks", "1",
        "--diffusion_steps", "40", "--batch_size", "2", "--save_interval", "2", "--log_interval", "1",
        "--threshold", "0.5", "--num_workers", "0", "--lr", "1e-3", "--ema_rate", "0.9"]


def test_train_resume_on_changed_data_is_refused(tmp_path, capsys):
    data, log = write_fake_brats(tmp_path / "data"), tmp_path / "log"
    base = ["--data_dir", str(data), "--log_dir", str(log), *TINY]
    assert run_cli(training.main, [*base, "--max_steps", "2"]) == 0
    capsys.readouterr()
    _rewrite_same_size(_first_slice(data, "train"))
    status = run_cli(training.main, [*base, "--max_steps", "4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1, err
    assert "trained on other data" in err[0] and f"{data / 'npy_train'}: 1 slice files changed" in err[0]


# ------------------------------------------------------------------------------------ make_synthetic_brats
def test_regenerated_synthetic_data_changes_the_key_and_a_killed_overwrite_leaves_the_old(tmp_path,
                                                                                        monkeypatch):
    """The issue's case: make_synthetic_brats.py --seed 1 --overwrite at the same path."""
    from guided_diffusion.data import synthetic

    root = tmp_path / "syn"
    kw = dict(subjects=3, image_size=16, slice_step=12, baseline=False)
    synthetic.build_synthetic_dataset(root, seed=0, **kw)
    first = data_fingerprint(str(root))
    synthetic.build_synthetic_dataset(root, seed=1, overwrite=True, **kw)
    second = data_fingerprint(str(root))
    assert second.digest != first.digest
    assert fpm.explain(str(root), first.digest, second).count("slice files changed") == 3
    before = {p: p.read_bytes() for p in sorted(root.rglob("npy_*/*/*"))}
    calls = []

    def dies(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    real = synthetic.write_patient
    monkeypatch.setattr(synthetic, "write_patient", dies)
    with pytest.raises(KeyboardInterrupt):
        synthetic.build_synthetic_dataset(root, seed=2, overwrite=True, **kw)
    assert {p: p.read_bytes() for p in sorted(root.rglob("npy_*/*/*"))} == before
    assert data_fingerprint(str(root)).digest == second.digest
    assert not list(tmp_path.glob(".syn.*"))


def _cal(w: float, **extra) -> Calibration:
    return Calibration(thr_01=0.5, n_min=1, accuracy=1.0, q=0.9, diff_min=[0.0], diff_max=[1.0], n_val=2,
                       n_healthy=1, n_unhealthy=1, w=w, forward_steps=5, modality=[0], extra=extra)


def test_stored_calibrations_of_several_w_hash_the_validation_split_once(data, monkeypatch):
    """One fingerprint for all w of a stored calibration (it was computed once per w), and the w whose
    record names other data is still refused."""
    digest = data_fingerprint(str(data), ("val",)).digest
    calls = []
    real = stored_calibration.data_fingerprint
    monkeypatch.setattr(stored_calibration, "data_fingerprint",
                        lambda *a, **k: calls.append(a) or real(*a, **k))
    cals = [_cal(w, data_sha256=digest) for w in (1.0, 3.0, 5.0)]
    stored_calibration.check_calibration_data(cals, str(data), "calibration X", "recalibrate")
    assert len(calls) == 1
    stored_calibration.check_calibration_data([_cal(1.0)], str(data), "calibration X", "recalibrate")
    assert len(calls) == 1  # no record (an older file): nothing to hash
    with pytest.raises(ValueError, match=r"calibration X was made on other validation data: .*; recalibrate"):
        stored_calibration.check_calibration_data([*cals, _cal(7.0, data_sha256="0" * 64)], str(data),
                                                  "calibration X", "recalibrate")
