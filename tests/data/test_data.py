"""BrainDataset, process_slice, train / eval loaders and their input validation."""

import io
import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from guided_diffusion.data import brats
from guided_diffusion.data.brats import BrainDataset, get_eval_loader, get_train_loader, process_slice
from guided_diffusion.data.synthetic import build_synthetic_dataset

SIZE = 32


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "syn"
    build_synthetic_dataset(out, subjects=4, seed=3, image_size=SIZE)
    return out


def _write_slice(path: Path, x, y) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez_compressed(buf, **{k: v for k, v in (("x", x), ("y", y)) if v is not None})
    path.write_bytes(buf.getvalue())


def _fake_root(tmp_path, x=None, y=None, split="test"):
    x = np.random.default_rng(0).random((1, 4, 16, 16), dtype=np.float32) if x is None else x
    y = np.zeros((1, 1, 16, 16), np.float32) if y is None else y
    _write_slice(tmp_path / f"npy_{split}" / "patient_A" / "slice_3.npz", x, y)
    return tmp_path


def test_process_slice_range_and_labels():
    x = np.stack([np.linspace(5, 9, 64, dtype=np.float32).reshape(8, 8), np.full((8, 8), 2.0, np.float32)])
    y = np.zeros((1, 1, 8, 8), np.float32)
    y[0, 0, 2, 3] = 0.6
    xt, gt, lab = process_slice(x[None], y)
    assert xt.shape == (2, 8, 8) and xt.dtype == torch.float32
    assert xt[0].min().item() == pytest.approx(-1.0) and xt[0].max().item() == pytest.approx(1.0, abs=1e-4)
    assert torch.all(xt[1] == -1.0)
    assert gt.shape == (1, 8, 8) and gt.dtype == torch.float32 and gt.sum().item() == 1.0 and lab == 1
    y[0, 0, 2, 3] = 0.5
    assert process_slice(x, y)[2] == 0


def test_dataset_items_shapes_and_types(root):
    ds = BrainDataset(root, "train", in_channels=4)
    x, cond = ds[0]
    assert x.shape == (4, SIZE, SIZE) and x.dtype == torch.float32
    assert -1.0 <= x.min().item() < -0.99 and 0.99 < x.max().item() <= 1.0
    assert set(cond) == {"y"} and cond["y"] in (0, 1)
    assert BrainDataset(root, "train", ret_lab=False)[0][1] == {}
    test = BrainDataset(root, "test")
    labs = []
    for i in range(len(test)):
        x, gt, lab = test[i]
        assert gt.shape == (1, SIZE, SIZE) and gt.dtype == torch.float32
        assert set(gt.unique().tolist()) <= {0.0, 1.0} and lab == int(gt.any())
        labs.append(lab)
    assert 0 < sum(labs) < len(labs)
    pid, k = test.slice_info(0)
    assert test.slice_path(0).name == f"slice_{k}.npz" and test.slice_path(0).parent.name == f"patient_{pid}"


def test_subject_order_and_numeric_slice_sort(root):
    ds = BrainDataset(root, "train", seed=7)
    names = sorted(p.name[len("patient_") :] for p in (root / "npy_train").iterdir())
    random.Random(7).shuffle(names)
    assert ds.patients == names
    for pid in names:
        nums = [k for p, k in (ds.slice_info(i) for i in range(len(ds))) if p == pid]
        assert nums == sorted(nums) and nums[-1] - nums[0] == len(nums) - 1
    assert BrainDataset(root, "train", num_mix=1).patients == [BrainDataset(root, "train").patients[0]]


def test_mixed_index_reads_one_file_and_healthy_only_selection(root, monkeypatch):
    calls = []
    real = brats._read_npz
    monkeypatch.setattr(brats, "_read_npz", lambda p, keys=("x", "y"): calls.append(keys) or real(p, keys))
    mixed = BrainDataset(root, "train")
    assert len(calls) == 1
    calls.clear()
    healthy = BrainDataset(root, "train", mixed=False, n_unhealthy_patients=0)
    assert calls and all(keys == ("y",) for keys in calls[:-1])
    labels = [mixed.read_label(i) for i in range(len(mixed))]
    assert len(healthy) == labels.count(0) and 0 < len(healthy) < len(mixed)
    assert all(healthy[i][1]["y"] == 0 for i in range(0, len(healthy), 7))
    with pytest.raises(ValueError, match="n_unhealthy_patients"):
        BrainDataset(root, "train", mixed=False)


def test_eval_loader_visits_each_slice_once_and_shards(root):
    loader, ds = get_eval_loader(root, "test", batch_size=16, world_size=1, rank=0)
    seen = []
    for x, gt, lab, idx in loader:
        assert x.shape[1:] == (4, SIZE, SIZE) and gt.shape[1:] == (1, SIZE, SIZE)
        assert lab.dtype == torch.int64 and idx.dtype == torch.int64
        seen += idx.tolist()
    assert seen == list(range(len(ds)))
    shards = []
    for r in range(2):
        ld, _ = get_eval_loader(root, "test", batch_size=5, world_size=2, rank=r)
        shards.append([i for *_, idx in ld for i in idx.tolist()])
    assert shards[0] == list(range(0, len(ds), 2)) and shards[1] == list(range(1, len(ds), 2))
    assert sorted(shards[0] + shards[1]) == seen
    few, _ = get_eval_loader(root, "test", batch_size=4, num_slices=7)
    assert [i for *_, idx in few for i in idx.tolist()] == list(range(7))


def test_train_loader_deterministic_per_seed_and_epoch(root):
    def order(seed, epoch):
        loader, sampler = get_train_loader(root, 8, seed=seed, world_size=1, rank=0)
        sampler.set_epoch(epoch)
        return list(iter(sampler)), next(iter(loader))

    (o1, b1), (o2, b2) = order(0, 0), order(0, 0)
    assert o1 == o2 and torch.equal(b1[0], b2[0]) and torch.equal(b1[1]["y"], b2[1]["y"])
    assert b1[0].shape == (8, 4, SIZE, SIZE) and b1[1]["y"].dtype == torch.int64
    assert order(0, 1)[0] != o1 and order(1, 0)[0] != o1
    loader, sampler = get_train_loader(root, 8, world_size=2, rank=1)
    assert loader.batch_size == 4 and sampler.num_replicas == 2 and sampler.rank == 1
    assert all(len(b[0]) == 4 for b in loader)
    with pytest.raises(ValueError, match="multiple of the world size 2"):
        get_train_loader(root, 7, world_size=2, rank=0)
    with pytest.raises(ValueError, match="fewer than the per-rank batch"):
        get_train_loader(root, 100000, world_size=1, rank=0)


def test_train_loader_without_process_group(root):
    assert not torch.distributed.is_initialized()
    loader, sampler = get_train_loader(root, 4)
    assert sampler.num_replicas >= 1 and loader.batch_size * sampler.num_replicas == 4


def test_missing_dir_and_split_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="make_synthetic_brats"):
        BrainDataset(tmp_path / "nope", "train")
    with pytest.raises(FileNotFoundError, match="npy_val"):
        BrainDataset(_fake_root(tmp_path), "val")
    (tmp_path / "npy_train").mkdir()
    with pytest.raises(FileNotFoundError, match="no patient_"):
        BrainDataset(tmp_path, "train")
    with pytest.raises(ValueError, match="split"):
        BrainDataset(tmp_path, "training")


def test_truncated_and_missing_key_errors(tmp_path):
    root = _fake_root(tmp_path)
    f = root / "npy_test" / "patient_A" / "slice_3.npz"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(ValueError, match="slice_3.npz.*unreadable or truncated"):
        BrainDataset(root, "test")
    _write_slice(f, np.zeros((1, 4, 16, 16), np.float32), None)
    with pytest.raises(ValueError, match=r"slice_3.npz lacks key\(s\) \['y'\]"):
        BrainDataset(root, "test")


def test_nan_size_and_channel_errors(tmp_path):
    x = np.ones((1, 4, 16, 16), np.float32)
    x[0, 1, 2, 2] = np.nan
    with pytest.raises(ValueError, match="slice_3.npz: x contains NaN or inf"):
        BrainDataset(_fake_root(tmp_path / "a", x=x), "test")
    with pytest.raises(
        ValueError, match=r"slice_3.npz: mask size \(8, 8\) differs from image size \(16, 16\)"
    ):
        BrainDataset(_fake_root(tmp_path / "b", y=np.zeros((1, 1, 8, 8), np.float32)), "test")
    ds = BrainDataset(_fake_root(tmp_path / "c"), "test")
    assert ds.num_channels == 4 and ds[0][0].shape == (4, 16, 16)
    with pytest.raises(ValueError, match="slice_3.npz has 4 channels but --in_channels is 1"):
        BrainDataset(tmp_path / "c", "test", in_channels=1)


def test_slice_of_another_size_named_not_a_stack_error(tmp_path):
    """A slice of another H x W than its dataset: the file and expected vs found size, not torch.stack."""
    root = _fake_root(tmp_path)
    odd = root / "npy_test" / "patient_A" / "slice_4.npz"
    _write_slice(odd, np.ones((1, 4, 12, 12), np.float32), np.zeros((1, 1, 12, 12), np.float32))
    loader, _ = get_eval_loader(root, "test", batch_size=2)
    with pytest.raises(ValueError, match=r"slice_4.npz: image size \(12, 12\) differs from the dataset's "
                       r"\(16, 16\) \(of .*slice_3.npz\)"):
        next(iter(loader))


def test_nan_mask_and_complex_image_refused(tmp_path):
    y = np.zeros((1, 1, 16, 16), np.float32)
    y[0, 0, 3, 3] = np.nan
    with pytest.raises(ValueError, match=r"slice_3.npz: y \(mask\) contains NaN"):
        BrainDataset(_fake_root(tmp_path / "a", y=y), "test")
    # also on the label-only read of the healthy-slice selection
    root = _fake_root(tmp_path / "b", y=y, split="train")
    with pytest.raises(ValueError, match=r"slice_3.npz: y \(mask\) contains NaN"):
        BrainDataset(root, "train", mixed=False, n_unhealthy_patients=0)
    x = (np.ones((1, 4, 16, 16)) + 1j).astype(np.complex64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # refused with an error, not cast with a ComplexWarning
        with pytest.raises(ValueError, match="slice_3.npz: x has complex dtype complex64"):
            BrainDataset(_fake_root(tmp_path / "c", x=x), "test")


def test_all_zero_slice_and_empty_patient_warn_once_with_count(tmp_path):
    root = _fake_root(tmp_path)
    zero = np.zeros((1, 4, 16, 16), np.float32)
    for k in (4, 5, 6):
        _write_slice(root / "npy_test" / "patient_A" / f"slice_{k}.npz", zero, np.zeros((1, 1, 16, 16)))
    for name in ("patient_B", "patient_C"):
        (root / "npy_test" / name).mkdir()
    msg = r"2 of 3 patient folders hold no slice_\*.npz.*patient_B, patient_C"
    with pytest.warns(UserWarning, match=msg):
        ds = BrainDataset(root, "test")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(len(ds)):
            ds[i]
    zero_warnings = [w for w in caught if "all zero" in str(w.message)]
    assert len(zero_warnings) == 1 and "slice_4.npz" in str(zero_warnings[0].message)
    summary = ds.data_summary()
    assert "4 slices, 1 patients" in summary and "2 empty patient folders skipped" in summary
    assert "3 all-zero slices" in summary


def test_training_loader_workers_warn_once_and_count_all_zero_reads(tmp_path):
    """With DataLoader workers each worker reads into its own dataset copy: still one all-zero warning per
    run, and the main process's data summary counts every worker's reads (run in a fresh process so that
    the workers print their warnings as in a real run)."""
    import subprocess
    import sys

    rng = np.random.default_rng(1)
    zero = np.zeros((1, 4, 16, 16), np.float32)
    for k in range(8):
        x = zero if k % 2 else rng.random((1, 4, 16, 16), dtype=np.float32)
        _write_slice(tmp_path / "npy_train" / "patient_A" / f"slice_{k}.npz", x, np.zeros((1, 1, 16, 16)))
    script = (
        "import sys\n"
        "from guided_diffusion.data.brats import get_train_loader\n"
        "loader, sampler = get_train_loader(sys.argv[1], 2, seed=0, num_workers=2, world_size=1, rank=0)\n"
        "for epoch in range(2):\n"
        "    sampler.set_epoch(epoch)\n"
        "    assert sum(len(x) for x, _ in loader) == 8\n"
        "print(loader.dataset.data_summary())\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("is all zero") == 1, proc.stderr
    assert "8 reads of all-zero slices so far" in proc.stdout
