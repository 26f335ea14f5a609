"""A tiny seeded AnoFPDM evaluation (16 px, 4 channels, 8 validation and 7 test slices, a random UNet) for
the tests of the evaluation: explicit arguments everywhere, nothing downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

SIDE, CHANNELS = 16, 4
MODEL_FLAGS = ["--image_size", str(SIDE), "--in_channels", str(CHANNELS), "--num_channels", "8",
               "--num_res_blocks", "1", "--channel_mult", "1,2", "--attention_resolutions", "8",
               "--num_heads", "1", "--diffusion_steps", "40", "--num_classes", "2"]
MODEL_KW = dict(image_size=SIDE, in_channels=CHANNELS, num_channels=8, num_res_blocks=1, channel_mult="1,2",
                attention_resolutions="8", num_heads=1, diffusion_steps=40, num_classes=2, class_cond=True)


def make_split(root: Path, split: str, lesions_by_patient: dict[str, list[bool]], seed: int) -> None:
    """Write a tiny BraTS-like split: an elliptic 'brain', a bright square lesion where flagged."""
    rng = np.random.default_rng(seed)
    (root / "data_splits" / split).mkdir(parents=True, exist_ok=True)
    (root / "data_splits" / split / "scans.csv").write_text("".join(f"{p}\n" for p in lesions_by_patient))
    yy, xx = np.mgrid[:SIDE, :SIDE]
    brain = ((yy - 7.5) ** 2 / 7**2 + (xx - 7.5) ** 2 / 6**2) < 1
    for pid, lesions in lesions_by_patient.items():
        pdir = root / f"npy_{split}" / f"patient_{pid}"
        pdir.mkdir(parents=True, exist_ok=True)
        for k, lesion in enumerate(lesions):
            x = np.stack([brain * (0.4 + 0.1 * c + 0.05 * rng.standard_normal((SIDE, SIDE)))
                          for c in range(CHANNELS)])[None]
            y = np.zeros((1, 1, SIDE, SIDE), np.float32)
            if lesion:
                cy, cx = rng.integers(5, 11, size=2)
                y[0, 0, cy - 2: cy + 2, cx - 2: cx + 2] = 1
                x[0, :, cy - 2: cy + 2, cx - 2: cx + 2] += 0.6
            np.savez(pdir / f"slice_{10 + k}.npz", x=x.astype(np.float64), y=y)


def make_run(root: Path, weight_seed: int = 0, step: int = 10) -> tuple[Path, Path]:
    """(data dir, model dir) of the pinned run: 8 validation and 7 test slices, a seeded random UNet."""
    data = root / "data"
    make_split(data, "train", {"T0": [False, True]}, seed=1)
    make_split(data, "val", {"V0": [False, True, True, False], "V1": [False, False, True, False]}, seed=2)
    make_split(data, "test", {"P0": [False, True, True, False], "P1": [True, False, False]}, seed=3)
    mdir = root / "model"
    mdir.mkdir(exist_ok=True)
    write_checkpoint(mdir, weight_seed, step)
    return data, mdir


def write_checkpoint(mdir: Path, weight_seed: int, step: int, ema_rate: str | None = None) -> Path:
    """A random (seeded) checkpoint of the tiny UNet in ``mdir``: model<step>.pt, or
    ema_<rate>_<step>.pt with ``ema_rate``."""
    from guided_diffusion.script_util import create_model_and_diffusion

    torch.manual_seed(weight_seed)
    model, _ = create_model_and_diffusion(**MODEL_KW)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = mdir / (f"ema_{ema_rate}_{step:06d}.pt" if ema_rate else f"model{step:06d}.pt")
    torch.save(model.state_dict(), path)
    return path


def run_argv(data: Path, mdir: Path, out: Path, *, w=("1", "3"), t_e_ratio=("1", "2")) -> list[str]:
    """The flags of the tiny run (several w and t_e ratios by default)."""
    return [*MODEL_FLAGS, "--data_dir", str(data), "--model_dir", str(mdir), "--log_dir", str(out),
            "--w", *w, "--t_e_ratio", *t_e_ratio, "--forward_steps", "5", "--modality", "0", "3",
            "--timestep_respacing", "10", "--batch_size", "3", "--batch_size_val", "4", "--seed", "5",
            "--progress", "False", "--num_panels", "0"]


def core(out: Path) -> dict:
    """metrics.json without its run record (paths, timing)."""
    m = json.loads((out / "metrics.json").read_text())
    m.pop("run")
    return m


