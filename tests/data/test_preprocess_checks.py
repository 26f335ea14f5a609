"""Issue 24 item 2: scripts/preprocess.py checks its input where it enters. A rerun whose source subjects
or options differ from the output's record refuses in one line (--overwrite rebuilds, never a mix), and
every scan is checked as it is read (finite voxels, one grid per subject, BraTS labels, no empty
modality), the message naming the subject, the file and what is wrong."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from guided_diffusion.data.preprocess import RECORD, preprocess, read_splits
from guided_diffusion.data.synthetic import build_synthetic_dataset

SIZE = 16


@pytest.fixture(scope="module")
def raw5(tmp_path_factory) -> Path:
    """Five BraTS-style NIfTI subjects SYN_00000..SYN_00004 (synthetic, 128 x 128 x 96)."""
    base = tmp_path_factory.mktemp("raw5")
    build_synthetic_dataset(base / "syn", subjects=5, seed=3, image_size=SIZE, raw_nifti=base / "raw",
                            progress=False, slice_step=16, baseline=False)
    return base / "raw"


def _source(raw5: Path, dst: Path, subjects: list[int]) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for i in subjects:
        shutil.copytree(raw5 / f"SYN_{i:05d}", dst / f"SYN_{i:05d}")
    return dst


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_new_subjects_refuse_then_overwrite_rebuilds(raw5, tmp_path, run_script):
    src, out = _source(raw5, tmp_path / "src", [0, 1, 2]), tmp_path / "out"
    preprocess(src, shape=SIZE, out=out, progress=False)
    rec = json.loads((out / RECORD).read_text())
    assert rec["subjects"] == ["SYN_00000", "SYN_00001", "SYN_00002"] and rec["options"]["shape"] == SIZE
    preprocess(src, shape=SIZE, out=out, progress=False)  # the same input: rebuilt, no refusal
    before = _tree(out)
    _source(raw5, src, [3, 4])
    with pytest.raises(ValueError) as err:
        preprocess(src, shape=SIZE, out=out, progress=False)
    msg = str(err.value)
    assert "new subject(s) SYN_00003, SYN_00004" in msg and "--overwrite" in msg and "\n" not in msg
    assert _tree(out) == before
    res = run_script("scripts/preprocess.py", "-s", src, "--out", out, "--shape", SIZE, "--quiet",
                     check=False)
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0 and "new subject(s)" in res.stderr
    preprocess(src, shape=SIZE, out=out, progress=False, overwrite=True)
    splits = read_splits(out)
    assert sorted(s for sp in splits.values() for s in sp) == [f"SYN_{i:05d}" for i in range(5)]
    assert len(list(out.glob("npy_*/patient_*"))) == 5
    assert json.loads((out / RECORD).read_text())["subjects"] == [f"SYN_{i:05d}" for i in range(5)]
    assert not list(tmp_path.glob(".out.*"))  # no partial or old tree left beside it


def test_other_options_or_lost_subjects_refuse(raw5, tmp_path):
    src, out = _source(raw5, tmp_path / "src", [0, 1, 2, 3]), tmp_path / "out"
    preprocess(src, shape=SIZE, out=out, progress=False)
    with pytest.raises(ValueError, match=r"--shape 16 -> 8"):
        preprocess(src, shape=8, out=out, progress=False)
    with pytest.raises(ValueError, match=r"--mask_resize area -> bilinear"):
        preprocess(src, shape=SIZE, out=out, progress=False, mask_resize="bilinear")
    shutil.rmtree(src / "SYN_00003")
    with pytest.raises(ValueError, match=r"the source lacks 1 subject\(s\) of the output SYN_00003"):
        preprocess(src, shape=SIZE, out=out, progress=False)


def _edit(path: Path, fn, affine_shift: float = 0.0) -> None:
    img = nib.load(str(path))
    data = np.asarray(img.get_fdata(dtype=np.float32))
    affine = img.affine.copy()
    affine[0, 3] += affine_shift
    nib.save(nib.Nifti1Image(fn(data.copy()).astype(np.float32), affine), str(path))


def _nan(d: np.ndarray) -> np.ndarray:
    d[60, 60, 40] = np.nan
    return d


def _label3(d: np.ndarray) -> np.ndarray:
    d[60, 60, 40] = 3
    return d


@pytest.mark.parametrize("file, fn, shift, expected", [
    ("flair", _nan, 0.0, "SYN_00001_flair.nii.gz has 1 non-finite voxel(s)"),
    ("seg", _label3, 0.0, "SYN_00001_seg.nii.gz has label values 3, expected only {0, 1, 2, 4}"),
    ("t1", np.zeros_like, 0.0, "SYN_00001_t1.nii.gz is all zero"),
    ("t2", lambda d: d, 2.0, "SYN_00001_t2.nii.gz is on another voxel grid than SYN_00001_flair.nii.gz"),
])
def test_bad_scan_names_subject_file_and_problem(raw5, tmp_path, file, fn, shift, expected):
    src, out = _source(raw5, tmp_path / "src", [0, 1, 2]), tmp_path / "out"
    _edit(src / "SYN_00001" / f"SYN_00001_{file}.nii.gz", fn, shift)
    with pytest.raises(ValueError) as err:
        preprocess(src, shape=SIZE, out=out, progress=False)
    assert str(err.value).startswith("subject 'SYN_00001': ") and expected in str(err.value), err.value
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_bad_scan_is_one_line_exit_2(raw5, tmp_path, run_script):
    src = _source(raw5, tmp_path / "src", [0, 1, 2])
    _edit(src / "SYN_00002" / "SYN_00002_flair.nii.gz", _nan)
    res = run_script("scripts/preprocess.py", "-s", src, "--out", tmp_path / "o", "--shape", SIZE, "--quiet",
                     check=False)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and "Traceback" not in res.stderr
    assert lines[0].startswith("error: subject 'SYN_00002': SYN_00002_flair.nii.gz has 1 non-finite")
