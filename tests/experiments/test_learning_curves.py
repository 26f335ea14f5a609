"""scripts/learning_curves.py (guided_diffusion.experiments.learning_curves): rows, ranges, PNG, resume
after a kill,
refused settings, and the AnoFPDM numbers equal to translation_FPDM.py's on the same checkpoint."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from tiny_eval import make_split

from guided_diffusion.cli import run_cli
from guided_diffusion.experiments import learning_curves as lc
from guided_diffusion.experiments import learning_curves_eval as lce
from guided_diffusion.training import run as training

MODEL = ["--image_size", "16", "--in_channels", "4", "--num_channels", "8", "--num_res_blocks", "1",
         "--channel_mult", "1,2", "--attention_resolutions", "8", "--num_heads", "1",
         "--diffusion_steps", "40", "--num_classes", "2"]
EVAL = ["--eval_w", "1", "3", "--forward_steps", "5", "--eval_respacing", "10", "--eval_batch", "4",
        "--loss_draws", "2", "--cond_steps", "3"]
UNIT = ("image_accuracy", "image_recall", "image_specificity", "dice", "dice_pooled", "auprc", "te_inside")


def _data(root: Path) -> Path:
    data = root / "data"
    make_split(data, "train", {"T0": [False, True, False, True]}, seed=1)
    make_split(data, "val", {"V0": [False, True, True, False], "V1": [False, False, True, False]}, seed=2)
    make_split(data, "test", {"P0": [False, True, True, False], "P1": [True, False, False]}, seed=3)
    return data


def _train_flags(data: Path, log: Path, max_steps: int = 6) -> list[str]:
    return ["--data_dir", str(data), "--log_dir", str(log), *MODEL, "--batch_size", "2", "--max_steps",
            str(max_steps), "--save_interval", "100", "--log_interval", "100", "--threshold", "0.2",
            "--num_workers", "0", "--lr", "1e-3", "--ema_rate", "0.9", "--dropout", "0.1"]


def _flags(data: Path, log: Path, max_steps: int = 6, slices: int = 6) -> list[str]:
    return [*_train_flags(data, log, max_steps), "--eval_every", "3", "--eval_slices", str(slices), *EVAL]


def test_schedule_and_bad_flags(tmp_path, capsys):
    assert lc.schedule(3, 6) == [3, 6] and lc.schedule(4, 10) == [4, 8, 10] and lc.schedule(5, 3) == [3]
    data = _data(tmp_path)
    for bad, expected in ((["--eval_every", "0"], "--eval_every"), (["--max_steps", "0"], "--max_steps"),
                          (["--eval_w"], "--eval_w"), (["--resume", "never"], "--resume never")):
        assert run_cli(lc.main, [*_flags(data, tmp_path / "log"), *bad]) == 2
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "log" / "curves" / "curves.json").exists()
    assert run_cli(lc.main, ["--help"]) == 0  # both flag sets: the curves' and scripts/train.py's
    text = capsys.readouterr().out
    assert "--eval_every" in text and "--max_steps" in text and "--num_channels" in text


class _Stop(Exception):
    """Stands in for a kill in the middle of an evaluation."""


def test_rows_png_resume_and_equal_to_translation(tmp_path, monkeypatch, capsys):
    data, log = _data(tmp_path), tmp_path / "log"
    real, calls = lc.evaluate_checkpoint, []

    def killed_at_step_6(*args, **kwargs):
        calls.append(args[5])
        if args[5] == 6:
            raise _Stop
        return real(*args, **kwargs)

    monkeypatch.setattr(lc, "evaluate_checkpoint", killed_at_step_6)
    with pytest.raises(_Stop):
        lc.main(_flags(data, log))
    path = log / "curves" / "curves.json"
    first = json.loads(path.read_text())
    assert [r["step"] for r in first["rows"]] == [3] and calls == [3, 6]

    calls.clear()
    monkeypatch.setattr(lc, "evaluate_checkpoint", lambda *a, **k: calls.append(a[5]) or real(*a, **k))
    monkeypatch.setattr(training, "train", lambda *a, **k: pytest.fail("trained again"))
    assert lc.main(_flags(data, log)) == 0
    assert calls == [6]  # step 3 was not recomputed, steps 6's checkpoint not retrained
    curves = json.loads(path.read_text())
    assert curves["rows"][0] == first["rows"][0]
    assert [r["step"] for r in curves["rows"]] == [3, 6]
    assert (log / "curves" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for row in curves["rows"]:
        assert len(row["checkpoint_sha256"]) == 64 and row["w"] in (1.0, 3.0)
        for split in ("val", "test"):
            r = row[split]
            assert r["n_slices"] == 6 and math.isfinite(r["loss"]) and r["loss"] > 0
            assert r["cond_healthy"] >= 0 and r["cond_unhealthy"] >= 0
            for key in UNIT:
                assert r[key] is None or 0.0 <= r[key] <= 1.0, (split, key, r[key])
            assert r["auprc"] is not None and r["te_inside"] is not None
    assert curves["rows"][0]["test"]["loss"] != curves["rows"][1]["test"]["loss"]

    # other settings: one line, exit 2, nothing overwritten
    capsys.readouterr()
    assert run_cli(lc.main, _flags(data, log, slices=5)) == 2
    err = capsys.readouterr().err
    assert "curves.eval_slices: stored 6, now 5" in err and len(err.strip().splitlines()) == 1
    assert json.loads(path.read_text()) == curves

    # the AnoFPDM numbers are translation_FPDM.py's on the same checkpoint and settings
    from guided_diffusion.anofpdm import translation

    out = tmp_path / "fpdm"
    metrics = translation.main([*MODEL, "--data_dir", str(data), "--model_dir", str(log), "--model_num", "6",
                                "--log_dir", str(out), "--w", "1", "3", "--forward_steps", "5",
                                "--timestep_respacing", "10", "--num_slices", "6", "--num_slices_val", "6",
                                "--batch_size", "4", "--batch_size_val", "4", "--seed", "0", "--progress",
                                "False", "--num_panels", "0"])
    # trained in chunks of 3 steps = one uninterrupted scripts/train.py run of 6 steps
    monkeypatch.undo()
    assert training.main(_train_flags(data, tmp_path / "plain")) == 0
    for name in ("model000006.pt", "ema_0.9_000006.pt"):
        chunked = torch.load(log / name, weights_only=True)
        plain = torch.load(tmp_path / "plain" / name, weights_only=True)
        assert chunked.keys() == plain.keys() and all(torch.equal(chunked[k], plain[k]) for k in plain), name

    row = curves["rows"][1]
    assert row["w"] == metrics["guidance_selection"]["chosen_w"]
    assert row["calibration"]["thr_01"] == metrics["calibration"][f"{row['w']:g}"]["thr_01"]
    test = row["test"]
    assert test["image_accuracy"] == metrics["image"]["accuracy"]
    assert test["image_recall"] == pytest.approx(metrics["image"]["recall"], nan_ok=True)
    for key, ref in (("dice", "dice"), ("dice_pooled", "dice_pooled"), ("auprc", "auprc")):
        value = metrics["unhealthy"][ref]
        assert (test[key] is None and not math.isfinite(value)) or test[key] == value, key


def test_conditioning_strength_and_loss_are_seeded():
    from guided_diffusion.configs.base import DiffusionConfig
    from guided_diffusion.script_util import create_gaussian_diffusion

    diffusion = create_gaussian_diffusion(DiffusionConfig(diffusion_steps=40))

    class Net(torch.nn.Module):
        def __init__(self, gain: float):
            super().__init__()
            self.gain = torch.nn.Parameter(torch.tensor(gain))

        def forward(self, x, t, y=None, null=False):
            cond = (~torch.as_tensor(null, device=x.device).expand(x.shape[0])).float()
            return 0.5 * x + self.gain * cond[:, None, None, None]

    x = torch.rand(3, 2, 8, 8) * 2 - 1
    gens = lambda: lce._generators(0, "val", [0, 1, 2], "cond")  # noqa: E731
    assert torch.equal(lc.conditioning_strength(Net(0.0), diffusion, x, gens(), 4), torch.zeros(3))
    strength = lc.conditioning_strength(Net(0.3), diffusion, x, gens(), 4)
    assert torch.allclose(strength, torch.full((3,), 0.09), atol=1e-6)
    labels = torch.tensor([0, 1, 0])
    a = lc.denoising_loss(Net(0.1), diffusion, x, labels, lce._generators(0, "val", [0, 1, 2], "loss"), 3)
    b = lc.denoising_loss(Net(0.1), diffusion, x, labels, lce._generators(0, "val", [0, 1, 2], "loss"), 3)
    c = lc.denoising_loss(Net(0.1), diffusion, x, labels, lce._generators(0, "test", [0, 1, 2], "loss"), 3)
    assert a.shape == (3,) and torch.equal(a, b) and not torch.equal(a, c) and bool((a > 0).all())
