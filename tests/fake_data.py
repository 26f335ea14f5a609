"""Tiny preprocessed datasets written by tests (a plain helper module, not a test file)."""

from pathlib import Path


def write_fake_brats(root: Path, channels: int = 2, size: int = 16, patients: int = 2, slices: int = 5):
    """Minimal preprocessed layout (docs/method.md, 'Preprocessing'): npy_train/patient_*/slice_*.npz
    with x, y."""
    import numpy as np

    rng = np.random.default_rng(0)
    for p in range(patients):
        d = root / "npy_train" / f"patient_P{p:03d}"
        d.mkdir(parents=True)
        for k in range(slices):
            y = np.zeros((1, 1, size, size), np.float32)
            if k % 2:
                y[..., 4:9, 5:10] = 1.0
            np.savez(d / f"slice_{k}.npz", x=rng.random((1, channels, size, size)).astype(np.float32), y=y)
    (root / "data_splits" / "train").mkdir(parents=True)
    (root / "data_splits" / "train" / "scans.csv").write_text("".join(f"P{p:03d}\n" for p in range(patients)))
    return root
