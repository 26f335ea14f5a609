"""The tiny translation dataset and UNet flags shared by test_translation.py and test_select_guidance.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

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


def write_split(root: Path, split: str, patients: dict[str, list[bool]], rng: np.random.Generator) -> None:
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
