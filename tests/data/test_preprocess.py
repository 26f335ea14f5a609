"""NIfTI -> slice preprocessing, end to end on the synthetic --raw_nifti output."""

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from guided_diffusion.data.preprocess import (
    modality_list,
    normalise_percentile,
    preprocess,
    resize_slices,
    split_subjects,
)
from guided_diffusion.data.synthetic import build_synthetic_dataset

REPO = Path(__file__).resolve().parents[2]
SIZE = 32


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, run_script):
    base = tmp_path_factory.mktemp("pre")
    syn, raw = base / "syn", base / "raw"
    build_synthetic_dataset(syn, subjects=3, seed=5, image_size=SIZE, raw_nifti=raw)
    (raw / "README.txt").write_text("stray file, not a subject\n")
    res = run_script("scripts/preprocess.py", "-s", raw, "--shape", SIZE, "--quiet")
    out = res.stdout.strip().splitlines()[-1].removeprefix("preprocessed data written to ")
    return syn, raw, Path(out)


def test_layout_default_out_and_split(pipeline):
    syn, raw, out = pipeline
    assert out == raw.resolve().parent / f"preprocessed_data_all_00_{SIZE}"
    subjects = sorted(p.name for p in raw.iterdir() if p.is_dir())
    assert subjects == ["SYN_00000", "SYN_00001", "SYN_00002"]
    for split in ("train", "val", "test"):
        names = (out / "data_splits" / split / "scans.csv").read_text().splitlines()
        assert names == (syn / "data_splits" / split / "scans.csv").read_text().splitlines()
        assert names == split_subjects(subjects)[split] and "README.txt" not in names
        for sid in names:
            pdir = out / f"npy_{split}" / f"patient_{sid}"
            meta = json.loads((pdir / "meta.json").read_text())
            np.testing.assert_allclose(meta["affine"], nib.load(raw / sid / f"{sid}_flair.nii.gz").affine)
            assert meta["modalities"] == ["flair", "t1", "t1ce", "t2"] and meta["shape"] == [128, 128, 96]
            assert len(list(pdir.glob("slice_*.npz"))) == meta["slices"][1] - meta["slices"][0] + 1


def test_matches_synthetic_output(pipeline):
    syn, _, out = pipeline
    files = sorted(p.relative_to(syn) for p in syn.glob("npy_*/patient_*/slice_*.npz"))
    assert files == sorted(p.relative_to(out) for p in out.glob("npy_*/patient_*/slice_*.npz"))
    soft = 0
    for rel in files[::5]:
        with np.load(syn / rel) as a, np.load(out / rel) as b:
            assert b["x"].dtype == np.float32 and b["x"].shape == (1, 4, SIZE, SIZE)
            np.testing.assert_array_equal(a["x"], b["x"])
            np.testing.assert_array_equal(a["y"], (b["y"] > 0.5).astype(np.float32))
            soft += int(((b["y"] > 0) & (b["y"] < 1)).sum())
    assert soft > 0  # area-resized mask is stored soft


def test_channel_order(pipeline):
    _, raw, out = pipeline
    sid = (out / "data_splits" / "train" / "scans.csv").read_text().split()[0]
    meta = json.loads((out / "npy_train" / f"patient_{sid}" / "meta.json").read_text())
    k = (meta["slices"][0] + meta["slices"][1]) // 2
    with np.load(out / "npy_train" / f"patient_{sid}" / f"slice_{k}.npz") as z:
        x = z["x"][0]
    for c, mod in enumerate(["flair", "t1", "t1ce", "t2"]):
        vol = nib.load(raw / sid / f"{sid}_{mod}.nii.gz").get_fdata(dtype=np.float32)
        norm = normalise_percentile(vol[None])[0]
        ref, _ = resize_slices(norm[None, None, :, :, k], np.zeros((1, 1, 128, 128)), SIZE)
        np.testing.assert_allclose(x[c], ref[0, 0], rtol=1e-5, atol=1e-6)


def test_missing_modality_names_subject_and_file(pipeline, tmp_path):
    _, raw, _ = pipeline
    src = tmp_path / "raw"
    shutil.copytree(raw, src)
    (src / "SYN_00001" / "SYN_00001_t1ce.nii.gz").unlink()
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match=r"'SYN_00001' lacks file SYN_00001_t1ce\.nii\.gz"):
        preprocess(src, shape=SIZE, out=out, progress=False)
    assert not out.exists()


def test_split_is_random_seed_10():
    names = [f"s{i:03d}" for i in range(40)]
    idx = list(range(40))
    random.seed(10)
    random.shuffle(idx)
    sp = split_subjects(names)
    assert sp["train"] == [names[i] for i in idx[:30]] and sp["val"] == [names[i] for i in idx[30:32]]
    assert sp["test"] == [names[i] for i in idx[32:]]


def test_mask_resize_modes():
    mask = np.zeros((1, 1, 15, 15), np.float32)
    mask[0, 0, 7, 2:13] = 1.0
    x = np.zeros((1, 1, 15, 15), np.float32)
    _, area = resize_slices(x, mask, 8, "area")
    _, bil = resize_slices(x, mask, 8, "bilinear")
    assert not np.allclose(area, bil)
    assert area.sum() * (15 / 8) ** 2 == pytest.approx(mask.sum(), rel=0.2)
    with pytest.raises(ValueError, match="--mask_resize"):
        resize_slices(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4), 2, "nearest")


def test_flag_errors(tmp_path, run_script):
    with pytest.raises(ValueError, match="--mod t1"):
        modality_list("atlas", "all")
    assert modality_list("brats", "t2") == ["t2"]
    with pytest.raises(FileNotFoundError, match="--source"):
        preprocess(tmp_path / "missing", progress=False)
    res = run_script("scripts/preprocess.py", check=False)
    assert res.returncode == 2 and "--source" in res.stderr


def test_run_preprocess_sh_requires_source():
    env = {k: v for k, v in os.environ.items() if k != "SOURCE"}
    res = subprocess.run(
        ["bash", str(REPO / "config" / "run_preprocess.sh")], env=env, capture_output=True, text=True
    )
    assert res.returncode == 2 and "set SOURCE" in res.stderr


@pytest.mark.parametrize(
    "script,argv,message",
    [
        ("preprocess", ["-s", "{tmp}/missing"], "error: --source {tmp}/missing is not a directory"),
        ("make_synthetic_brats", ["--out", "{tmp}/syn", "--subjects", "2"], "error: --subjects must be >= 3"),
    ],
)
def test_scripts_end_bad_input_with_one_line_exit_2(tmp_path, script, argv, message):
    """Bad input: one line on stderr, exit 2, no traceback; --debug / HAE_FPDM_DEBUG=1 shows it."""
    env = {k: v for k, v in os.environ.items() if k not in ("HAE_FPDM_DEBUG", "TRAIN_DEBUG")}
    env["PYTHONPATH"] = str(REPO)
    cmd = [sys.executable, str(REPO / "scripts" / f"{script}.py"), *(a.format(tmp=tmp_path) for a in argv)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message.format(tmp=tmp_path)), res.stderr
    assert "Traceback" not in res.stderr
    res = subprocess.run([*cmd, "--debug"], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode != 0 and "Traceback" in res.stderr
    text = (REPO / "scripts" / f"{script}.py").read_text()
    assert "sys.path.insert" not in text and "run_cli(main)" in text
