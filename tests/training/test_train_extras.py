"""Training extras: the loss-curve PNG and optional TensorBoard hook (issue 12), and the --channels_last /
--compile throughput options (issue 11) leaving the losses and the checkpoint keys alone."""

from __future__ import annotations

import csv

import torch
from torch import nn

from guided_diffusion.cli import run_cli
from guided_diffusion.training import checkpoint, train_util
from guided_diffusion.training import run as training
from tests.training.test_train import make_loop, write_fake_brats

FLAGS = ["--image_size", "16", "--num_channels", "32", "--in_channels", "2", "--num_classes", "2",
         "--channel_mult", "1,2", "--attention_resolutions", "8", "--num_heads", "1", "--num_res_blocks",
         "1", "--diffusion_steps", "40", "--batch_size", "4", "--max_steps", "2", "--save_interval", "2",
         "--log_interval", "1", "--threshold", "0.1", "--num_workers", "0", "--lr", "1e-3"]


def test_run_writes_loss_curves_png_without_tensorboard(tmp_path, monkeypatch):
    from guided_diffusion.reporting import training_plots

    monkeypatch.setattr(training_plots, "tensorboard_available", lambda: False)
    data = write_fake_brats(tmp_path / "data")
    log = tmp_path / "log"
    assert run_cli(training.main, ["--data_dir", str(data), "--log_dir", str(log), *FLAGS]) == 0
    png = (log / "loss_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    assert not (log / "tb").exists()


def _losses(log_dir) -> list[float]:
    with open(log_dir / "progress.csv", newline="") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def _final_state(log_dir) -> dict[str, torch.Tensor]:
    step = checkpoint.list_checkpoints(log_dir)[-1]
    path = log_dir / f"model{step:06d}.pt"
    return torch.load(path, map_location="cpu", weights_only=True)


def test_channels_last_matches_default_and_keeps_keys(tmp_path):
    base, cl = tmp_path / "base", tmp_path / "cl"
    make_loop(base, max_steps=3).run_loop()
    loop = make_loop(cl, max_steps=3, channels_last=True)
    assert loop.memory_format is torch.channels_last
    loop.run_loop()
    a, b = _losses(base), _losses(cl)
    assert len(a) == len(b) > 0
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-4, atol=1e-6)
    sa, sb = _final_state(base), _final_state(cl)
    assert list(sa) == list(sb)
    assert all(sa[k].shape == sb[k].shape for k in sa)  # (Adam turns ulp-level gradient differences
    # of near-zero gradients into whole lr-sized steps, so the weights are compared by the losses above)
    fresh = make_loop(tmp_path / "fresh", max_steps=1).model
    fresh.load_state_dict(sb)  # loadable into a default (contiguous) model


class _Wrapped(nn.Module):
    """Wraps a module the way torch.compile's OptimizedModule does (``_orig_mod``)."""

    def __init__(self, mod: nn.Module):
        super().__init__()
        self._orig_mod = mod

    def forward(self, *args, **kwargs):
        return self._orig_mod(*args, **kwargs)


def test_compile_keeps_checkpoint_keys(tmp_path, monkeypatch):
    from guided_diffusion.utils import precision

    calls = []

    def fake_compile(model, enabled, **kw):
        calls.append(enabled)
        return _Wrapped(model) if enabled else model

    monkeypatch.setattr(precision, "maybe_compile", fake_compile)
    base = tmp_path / "base"
    make_loop(base, max_steps=2).run_loop()
    loop = make_loop(tmp_path / "c", max_steps=2, compile=True)
    assert isinstance(loop.ddp_model, _Wrapped) and loop.ddp_model._orig_mod is loop.model
    assert set(loop.ddp_model.state_dict()) != set(loop.model.state_dict())  # the wrapper's keys differ
    loop.run_loop()
    assert calls[-1] is True
    keys = list(_final_state(tmp_path / "c"))
    assert keys == list(_final_state(base)) and not any("_orig_mod" in k for k in keys)
    torch.testing.assert_close(torch.tensor(_losses(tmp_path / "c")), torch.tensor(_losses(base)))


def test_wrap_network_falls_back_when_compile_fails(monkeypatch):
    lines = []
    monkeypatch.setattr(train_util.logger, "log", lines.append)

    def broken(*a, **k):
        raise RuntimeError("no backend")

    monkeypatch.setattr(torch, "compile", broken)
    model = nn.Conv2d(2, 2, 3)
    out = train_util.wrap_network(model, torch.device("cpu"), 1, compile=True)
    assert out is model and len(lines) == 1 and "running eagerly" in lines[0]
