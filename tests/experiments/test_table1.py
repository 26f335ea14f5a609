"""Table 1 runner (scripts/run_table1.py, guided_diffusion/table1*.py): the smoke preset end to end (every
row filled, a rerun recomputes nothing, a changed setting is refused or recomputed, never reused), the
paper preset's cluster commands for BraTS and ATLAS, and simplex-noise training (AnoDDPM (S))."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from guided_diffusion.cli import UsageError
from guided_diffusion.experiments.table1 import PRESETS, ROWS
from guided_diffusion.experiments.table1_rows import ANOFPDM_ROWS, DISPLAY, PIXEL_MARK
from guided_diffusion.simplex import simplex_noise_like
from guided_diffusion.training import run as training
from guided_diffusion.training import training_flags

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
METRICS = [f"{s}.{m}" for s in ("mixed", "unhealthy") for m in ("dice", "iou", "auprc")]


def _run(args, timeout=600):
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "scripts/run_table1.py", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _label(name: str) -> str:
    return DISPLAY[name] + ("" if name in ANOFPDM_ROWS else PIXEL_MARK)


def _rows(out: str) -> dict[str, str]:
    folder = os.path.join(out, "rows")
    return {f: open(os.path.join(folder, f)).read() for f in sorted(os.listdir(folder))}


def test_smoke_preset_fills_every_row_and_resumes(tmp_path):
    out = str(tmp_path / "t1")
    p = _run(["--preset", "smoke", "--out", out])
    assert p.returncode == 0, p.stderr[-3000:]
    table = json.load(open(os.path.join(out, "table1.json")))
    assert sorted(table["rows"]) == sorted(_label(n) for n in ROWS)
    smoke = PRESETS["smoke"]
    for name in ROWS:
        row = table["rows"][_label(name)]
        assert row["seeds"] == [0, 1, 2], name
        for key in [*METRICS, "nfe_per_slice", "seconds_per_slice", "pixel_labels"]:
            assert row[key]["n"] == 3 and math.isfinite(row[key]["mean"]), (name, key)
        for key in METRICS:
            assert 0.0 <= row[key]["mean"] <= 1.0, (name, key)
        # per-patient 3-D columns (issue 12) for every row, comparison methods included
        for key in ("volume.dice_3d_mean", "volume.lesion_f1_mean"):
            assert row[key]["n"] == 3 and 0.0 <= row[key]["mean"] <= 1.0, (name, key)
        assert row["volume.hd95_mm_mean"]["mean"] >= 0.0, name
        assert row["pixel_labels"]["mean"] == (0.0 if name in ANOFPDM_ROWS else 1.0)
    nfe = {n: table["rows"][_label(n)]["nfe_per_slice"]["mean"] for n in ROWS}
    tuned = table["provenance"]["tuned"]
    assert nfe["anoddpm_simplex"] == tuned["anoddpm_simplex"]["level"] == smoke["anoddpm_levels"][0]
    assert nfe["ddim_classifier"] == 3 * tuned["ddim_classifier"]["level"]
    assert nfe["ddim_cfg"] == 3 * tuned["ddim_cfg"]["level"] and nfe["flair"] == 0
    assert nfe["anofpdm_ddpm_ste"] == 2 * smoke["forward_steps"]
    assert tuned["ddim_cfg"]["scale"] in smoke["cfg_w"]
    assert tuned["ddim_classifier"]["scale"] in smoke["clf_scales"]
    for method in ("ddim_classifier", "ddim_cfg"):  # the grid point with the best validation Dice wins
        tune = json.load(open(os.path.join(out, "rows", f"tune_{method}_seed0.json")))["metrics"]
        assert len(tune["grid"]) == 2 and tune["val_dice"] == max(g["val_dice"] for g in tune["grid"])
        assert tune["threshold"] == tuned[method]["threshold"]
    # the deterministic DDIM rows give the same numbers for every seed (as the paper's ± 0.0)
    assert table["rows"][_label("ddim_cfg")]["mixed.dice"]["std"] == 0.0
    md = open(os.path.join(out, "table1.md")).read()
    assert [line.split(" | ")[0][2:] for line in md.splitlines() if line.startswith("| ")][1:] == [
        _label(n) for n in ROWS]  # the paper's row order, pixel-label rows marked
    assert "python scripts/run_table1.py --preset smoke" in md
    assert "3-D DICE (%)" in md and "HD95 (mm)" in md and "lesion F1 (%)" in md
    assert os.path.getsize(os.path.join(out, "fig4_panel.png")) > 1000
    assert len(os.listdir(os.path.join(out, "models"))) == 5
    stored = _rows(out)
    assert len(stored) == 5 + 9 * 3  # tuning rows + (row, seed)

    again = _run(["--preset", "smoke", "--out", out])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "$ " not in again.stdout  # no training or evaluation command ran
    assert again.stdout.count("skipped") == 5 + 27 and again.stdout.count("reused") == 5
    assert _rows(out) == stored

    other = _run(["--preset", "smoke", "--out", out, "--w", "1", "2"])
    assert other.returncode == 2
    lines = other.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: row anofpdm_ddim_seed0 in ")
    assert "(differing: w)" in lines[0]
    assert _rows(out) == stored

    changed = _run(["--preset", "smoke", "--out", out, "--rows", "flair", "--num_slices", "4", "--recompute"])
    assert changed.returncode == 0, changed.stderr[-3000:]
    now = _rows(out)
    flair = [f for f in stored if f.startswith("flair_seed")]
    assert all(json.loads(now[f])["fingerprint"] != json.loads(stored[f])["fingerprint"] for f in flair)
    assert all(json.loads(now[f])["metrics"]["num_test_slices"] == 4 for f in flair)
    assert {f: now[f] for f in now if f not in flair} == {f: stored[f] for f in stored if f not in flair}


def test_paper_preset_builds_the_cluster_commands(tmp_path):
    launcher = "python -m torch.distributed.run --nproc-per-node 8"
    p = _run(["--preset", "paper", "--dry_run", "--data_dir", str(tmp_path), "--out", str(tmp_path / "o"),
              "--launcher", launcher])
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    train = [x for x in lines if "scripts/train.py" in x]
    assert len(train) == 4 and all(x.startswith(launcher) and "--max_steps 210000" in x for x in train)
    assert sum("--unet_ver v1" in x for x in train) == 3
    assert sum("--noise_type simplex" in x for x in train) == 1
    assert sum("--learn_sigma True" in x for x in train) == 1
    assert sum("--mixed False" in x and "--num_classes 0" in x for x in train) == 2
    assert sum("scripts/train_classifier.py" in x and "--classifier_width 128" in x for x in lines) == 1
    ev = [x for x in lines if "translation_FPDM.py" in x]
    assert len(ev) == 4 * 3 and all("--forward_steps 600" in x and "--num_slices_val 1000" in x for x in ev)
    assert sum("--encoding ddpm" in x and "--last_only True" in x for x in ev) == 3
    atlas = _run(["--preset", "paper", "--dataset", "atlas", "--dry_run", "--data_dir", str(tmp_path)])
    assert atlas.returncode == 0, atlas.stderr
    ev = [x for x in atlas.stdout.splitlines() if "translation_FPDM.py" in x]
    assert ev and all("--w 30 " in x and "--in_channels 1" in x for x in ev)
    assert all(x.split("--modality")[-1].startswith(" 0 --encoding") for x in ev)
    bad = _run(["--preset", "paper"])
    assert bad.returncode == 2 and bad.stderr.startswith("error: --preset paper needs --data_dir")
    bad = _run(["--preset", "smoke", "--dataset", "atlas", "--rows", "flair"])
    assert bad.returncode == 2 and "no FLAIR channel" in bad.stderr


def test_simplex_training_noise():
    _, _, t = training_flags.parse_configs_for_training(["--noise_type", "simplex",
                                                        "--simplex_frequency", "8"])
    assert (t.noise_type, t.simplex_frequency) == ("simplex", 8.0)
    with pytest.raises(UsageError, match="--noise_type: invalid choice: 'pink'"):  # one line, exit 2
        training_flags.parse_configs_for_training(["--noise_type", "pink"])
    with pytest.raises(ValueError, match="simplex_frequency"):
        training_flags.parse_configs_for_training(["--simplex_frequency", "0"])

    class Zero(torch.nn.Module):
        def forward(self, x, t, **kw):
            return torch.zeros_like(x)

    from guided_diffusion.script_util import create_gaussian_diffusion

    diffusion = create_gaussian_diffusion(steps=1000)
    wrapped = training.SimplexTrainingDiffusion(diffusion, {"frequency": 8.0})
    assert wrapped.num_timesteps == 1000
    x = torch.zeros(2, 3, 16, 16)
    t = torch.tensor([30, 700])
    losses = wrapped.training_losses(Zero(), x, t, generator=torch.Generator().manual_seed(5))
    noise = simplex_noise_like(x, generator=torch.Generator().manual_seed(5), frequency=8.0)
    # a zero prediction's MSE against the target noise is the noise's mean square per sample
    torch.testing.assert_close(losses["mse"], noise.pow(2).mean(dim=(1, 2, 3)))
    gauss = diffusion.training_losses(Zero(), x, t, generator=torch.Generator().manual_seed(5))
    assert not torch.allclose(gauss["mse"], losses["mse"])


def test_simplex_training_runs_and_refuses_a_gaussian_resume(tmp_path):
    from fake_data import write_fake_brats

    from guided_diffusion.cli import run_cli

    data = write_fake_brats(tmp_path / "data")
    flags = ["--data_dir", str(data), "--log_dir", str(tmp_path / "log"), "--image_size", "16",
             "--num_channels", "8", "--in_channels", "2", "--num_classes", "0", "--channel_mult", "1,2",
             "--attention_resolutions", "8", "--num_heads", "1", "--num_res_blocks", "1", "--unet_ver", "v1",
             "--diffusion_steps", "40", "--batch_size", "2", "--save_interval", "1", "--log_interval", "1",
             "--num_workers", "0", "--mixed", "False", "--n_unhealthy_patients", "0", "--ret_lab", "False"]
    assert run_cli(training.main, [*flags, "--max_steps", "1", "--noise_type", "simplex",
                                   "--simplex_frequency", "8"]) == 0
    assert (tmp_path / "log" / "model000001.pt").is_file()
    with pytest.raises(ValueError, match="train.noise_type: checkpoint 'simplex', flags 'gaussian'"):
        training.main([*flags, "--max_steps", "2", "--simplex_frequency", "8"])
