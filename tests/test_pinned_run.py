"""No behaviour change: a tiny seeded translation run reproduces the metrics and slices.csv stored in
tests/data/pinned_translation.json (computed with the code before the typed-config refactor).

Regenerate only on an intended change of results: ``python tests/test_pinned_run.py OUT.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

PINNED = Path(__file__).resolve().parent / "data" / "pinned_translation.json"
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


def make_run(root: Path) -> tuple[Path, Path]:
    """(data dir, model dir) of the pinned run: 8 validation and 7 test slices, a seeded random UNet."""
    from guided_diffusion.script_util import create_model_and_diffusion

    data = root / "data"
    make_split(data, "train", {"T0": [False, True]}, seed=1)
    make_split(data, "val", {"V0": [False, True, True, False], "V1": [False, False, True, False]}, seed=2)
    make_split(data, "test", {"P0": [False, True, True, False], "P1": [True, False, False]}, seed=3)
    torch.manual_seed(0)
    model, _ = create_model_and_diffusion(**MODEL_KW)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    mdir = root / "model"
    mdir.mkdir()
    torch.save(model.state_dict(), mdir / "model000010.pt")
    return data, mdir


def run_argv(data: Path, mdir: Path, out: Path) -> list[str]:
    return [*MODEL_FLAGS, "--data_dir", str(data), "--model_dir", str(mdir), "--log_dir", str(out),
            "--w", "1", "3", "--t_e_ratio", "1", "2", "--forward_steps", "5", "--modality", "0", "3",
            "--timestep_respacing", "10", "--batch_size", "3", "--batch_size_val", "4", "--seed", "5",
            "--progress", "False", "--num_panels", "0"]


def pinned_view(out: Path) -> dict:
    """What must not change: the metrics (without the run record), calibration numbers, slices.csv."""
    m = json.loads((out / "metrics.json").read_text())
    cal = {w: {k: c[k] for k in ("thr_01", "n_min", "accuracy", "q", "diff_min", "diff_max", "n_val")}
           for w, c in m["calibration"].items()}
    core = {k: v for k, v in m.items() if k not in ("run", "calibration")}
    return {"metrics": core, "calibration": cal, "slices_csv": (out / "slices.csv").read_text()}


def test_tiny_run_matches_the_pinned_results(tmp_path):
    from guided_diffusion import translation

    data, mdir = make_run(tmp_path)
    translation.main(run_argv(data, mdir, tmp_path / "out"))
    got = json.loads(json.dumps(pinned_view(tmp_path / "out")))
    want = json.loads(PINNED.read_text())
    assert got["slices_csv"] == want["slices_csv"]
    assert got["calibration"] == want["calibration"]
    assert got["metrics"] == want["metrics"]


if __name__ == "__main__":
    import tempfile

    from guided_diffusion import translation

    with tempfile.TemporaryDirectory() as tmp:
        d, md = make_run(Path(tmp))
        translation.main(run_argv(d, md, Path(tmp) / "out"))
        Path(sys.argv[1]).write_text(json.dumps(pinned_view(Path(tmp) / "out"), indent=1, sort_keys=True))
