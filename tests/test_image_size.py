"""Issue 24 (trust at the edges), sizes: the network's --image_size must equal the data's slice size in
training (scripts/train.py) and evaluation (scripts/translation_FPDM.py); else one line naming both and
exit 2, before any step or forward pass."""

from __future__ import annotations

from pathlib import Path

import pytest
from fake_data import write_fake_brats
from tiny_eval import make_run, run_argv

from guided_diffusion.cli import run_cli
from guided_diffusion.data.brats import BrainDataset, get_eval_loader

# a 32 px network with the same downsample factors as the 16 px one of the tiny data
AT_32 = {"--image_size": "32", "--attention_resolutions": "16"}


def _set(argv: list[str], values: dict[str, str]) -> list[str]:
    argv = list(argv)
    for flag, value in values.items():
        argv[argv.index(flag) + 1] = value
    return argv


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_training_refuses_an_image_size_other_than_the_data(tmp_path, capsys):
    from guided_diffusion.training.run import main as train_main

    data = write_fake_brats(tmp_path / "data", size=16)
    log = tmp_path / "log"
    argv = ["--data_dir", str(data), "--log_dir", str(log), "--image_size", "32", "--num_channels", "8",
            "--in_channels", "2", "--num_classes", "2", "--channel_mult", "1,2", "--attention_resolutions",
            "16", "--num_heads", "1", "--num_res_blocks", "1", "--diffusion_steps", "40", "--batch_size", "2",
            "--max_steps", "1", "--save_interval", "1", "--num_workers", "0"]
    assert run_cli(train_main, argv) == 2
    err = _one_line(capsys)
    assert "--image_size 32" in err and f"{data}" in err and "16 x 16" in err
    assert not list(log.glob("*.pt"))  # no step was trained


def test_evaluation_refuses_an_image_size_other_than_the_data(tmp_path, capsys, monkeypatch):
    from guided_diffusion.anofpdm import translation

    data, mdir = make_run(tmp_path)  # 16 px slices, a 16 px checkpoint (its tensors fit a 32 px network)
    def no_forward(*a, **k):
        raise AssertionError("a forward pass ran on data of another size")

    monkeypatch.setattr(translation, "run_forward_process", no_forward)
    argv = _set(run_argv(data, mdir, tmp_path / "out"), AT_32)
    assert run_cli(translation.main, argv) == 2
    err = _one_line(capsys)
    assert "--image_size 32" in err and f"{data}" in err and "16 x 16" in err
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_dataset_image_size_check(tmp_path):
    data, _ = make_run(tmp_path)
    assert BrainDataset(data, "test", image_size=16).image_size == (16, 16)
    with pytest.raises(ValueError, match=r"--image_size 24 .* the val split of .* has 16 x 16 slices"):
        get_eval_loader(data, "val", 2, image_size=24)
    assert Path(data).is_dir()
