"""Synthetic BraTS-like dataset: layout, determinism, label mix, lesion visibility."""

import json
from pathlib import Path

import numpy as np
import pytest

from guided_diffusion.data.preprocess import split_counts
from guided_diffusion.data.synthetic import (
    build_synthetic_dataset,
    generate_subject,
    healthy_subjects,
    load_atlas,
)

REPO = Path(__file__).resolve().parents[1]
SIZE = 32


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn") / "data"
    stats = build_synthetic_dataset(out, subjects=5, seed=0, image_size=SIZE)
    return out, stats


def _npz_files(root):
    return sorted(p.relative_to(root) for p in root.glob("npy_*/patient_*/slice_*.npz"))


def _patient_arrays(pdir):
    files = sorted(pdir.glob("slice_*.npz"), key=lambda p: int(p.stem.split("_")[1]))
    xs, ys = [], []
    for f in files:
        with np.load(f) as z:
            xs.append(z["x"])
            ys.append(z["y"])
    return np.concatenate(xs), np.concatenate(ys)


def test_layout_matches_spec(built):
    root, stats = built
    splits = {}
    for split in ("train", "val", "test"):
        csv = root / "data_splits" / split / "scans.csv"
        names = csv.read_text().splitlines()
        assert names and all(n.startswith("SYN_") for n in names)
        splits[split] = names
        assert stats[split]["subjects"] == len(names)
        pdirs = sorted((root / f"npy_{split}").iterdir())
        assert [p.name for p in pdirs] == sorted(f"patient_{n}" for n in names)
        for pdir in pdirs:
            meta = json.loads((pdir / "meta.json").read_text())
            assert set(meta) == {"affine", "shape", "slices", "slice_step", "modalities"}
            assert meta["modalities"] == ["flair", "t1", "t1ce", "t2"]
            assert meta["shape"] == [128, 128, 96]
            np.testing.assert_allclose(meta["affine"], load_atlas()["affine"])
            lo, hi = meta["slices"]
            nums = sorted(int(p.stem.split("_")[1]) for p in pdir.glob("slice_*.npz"))
            assert nums == list(range(lo, hi + 1))
            with np.load(pdir / f"slice_{lo}.npz") as z:
                assert set(z.files) == {"x", "y"}
                assert z["x"].shape == (1, 4, SIZE, SIZE) and z["x"].dtype == np.float32
                assert z["y"].shape == (1, 1, SIZE, SIZE) and z["y"].dtype == np.float32
    assert [len(splits[s]) for s in ("train", "val", "test")] == [3, 1, 1]
    assert sorted(sum(splits.values(), [])) == [f"SYN_{i:05d}" for i in range(5)]


def test_split_rule_keeps_val_and_test():
    assert split_counts(1251) == (938, 62, 251)
    assert split_counts(20) == (15, 1, 4)
    assert split_counts(3) == (1, 1, 1)
    with pytest.raises(ValueError, match="at least 3 subjects"):
        split_counts(2)
    for n in (3, 5, 8, 20):
        ids = [f"s{i}" for i in range(n)]
        from guided_diffusion.data.preprocess import split_subjects

        sp = split_subjects(ids)
        healthy = healthy_subjects(sp, seed=0, healthy_fraction=0.9)
        for names in sp.values():
            assert names and any(s not in healthy for s in names)


def test_same_seed_identical_via_cli(built, tmp_path, run_script):
    root, _ = built
    other = tmp_path / "again"
    run_script("scripts/make_synthetic_brats.py",
               "--out", other, "--subjects", "5", "--seed", "0", "--image_size", SIZE, "--quiet")
    files = _npz_files(root)
    assert files == _npz_files(other)
    for rel in files:
        with np.load(root / rel) as a, np.load(other / rel) as b:
            assert a["x"].tobytes() == b["x"].tobytes()
            assert a["y"].tobytes() == b["y"].tobytes()
    with pytest.raises(FileExistsError, match="--overwrite"):
        build_synthetic_dataset(other, subjects=5, seed=0, image_size=SIZE)


def test_different_seed_differs():
    a, seg_a = generate_subject(0, 0, healthy=False)
    b, seg_b = generate_subject(1, 0, healthy=False)
    assert a.shape == b.shape == (4, 128, 128, 96)
    assert not np.array_equal(a, b)
    assert not np.array_equal(seg_a, seg_b)
    assert set(np.unique(seg_a)) <= {0, 1, 2, 4} and {1, 2, 4} <= set(np.unique(seg_a))
    h, seg_h = generate_subject(0, 0, healthy=True)
    assert seg_h.max() == 0 and (a[:, seg_a == 0] >= 0).all()


def test_label_mix_and_lesions_inside_brain(built):
    root, stats = built
    for split in ("train", "test"):
        assert 0 < stats[split]["unhealthy_slices"] < stats[split]["slices"]
    for pdir in root.glob("npy_*/patient_*"):
        x, y = _patient_arrays(pdir)
        assert set(np.unique(y)) <= {0.0, 1.0}
        lesion = y[:, 0] > 0.5
        if lesion.any():
            brain = x.mean(axis=1) > 0
            assert brain[lesion].mean() > 0.98


def test_lesion_visible_in_flair_and_t2(built):
    root, _ = built
    checked = 0
    for pdir in root.glob("npy_*/patient_*"):
        x, y = _patient_arrays(pdir)
        lesion = y[:, 0] > 0.5
        if lesion.sum() < 20:
            continue
        brain = (x.mean(axis=1) > 0) & ~lesion
        for c in (0, 3):
            inside = x[:, c][lesion].mean()
            around = x[:, c][brain].mean()
            assert inside > 1.3 * around, (pdir.name, c, inside, around)
        checked += 1
    assert checked >= 2


def test_slice_step_keeps_every_nth_slice(built, tmp_path, run_script):
    """--slice_step 2 writes the even-offset slices of the full build, byte for byte, and records the step."""
    root, _ = built
    thin = tmp_path / "thin"
    run_script("scripts/make_synthetic_brats.py", "--out", thin, "--subjects", "5", "--seed", "0",
               "--image_size", SIZE, "--quiet", "--slice_step", "2")
    full, half = _npz_files(root), _npz_files(thin)
    assert half and set(half) < set(full)
    for pdir in sorted((thin / "npy_test").iterdir()):
        meta = json.loads((pdir / "meta.json").read_text())
        lo, hi = meta["slices"]
        assert meta["slice_step"] == 2
        numbers = sorted(int(p.stem.split("_")[1]) for p in pdir.glob("slice_*.npz"))
        assert numbers == list(range(lo, hi + 1, 2))
    for rel in half:
        with np.load(root / rel) as a, np.load(thin / rel) as b:
            assert a["x"].tobytes() == b["x"].tobytes() and a["y"].tobytes() == b["y"].tobytes()
    with pytest.raises(ValueError, match="--slice_step must be >= 1"):
        build_synthetic_dataset(tmp_path / "bad", subjects=5, seed=0, image_size=SIZE, slice_step=0)
