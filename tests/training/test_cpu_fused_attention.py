"""--cpu_fused_attention: attention on the CPU in torch's fused (flash) kernel, as on a GPU. Same values as
the default exact path up to rounding, the default left bit for bit as pinned, and the training script
running its steps inside the option (recorded in the run config, resumable across it like --compile)."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import profile

from guided_diffusion import nn as gd_nn
from guided_diffusion.cli import run_cli
from guided_diffusion.training import checkpoint
from guided_diffusion.training import run as training
from guided_diffusion.training.train_resume import RUN_CHANGING_TRAIN_KEYS
from tests.training.test_train import write_fake_brats
from tests.training.test_train_extras import FLAGS, _losses


def _qkv(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 2, 8, 64, generator=g, requires_grad=True) for _ in range(3)]  # [B, heads, d, T]


def _kernels(fn) -> set[str]:
    with profile() as prof:
        fn()
    return {e.key for e in prof.key_averages()}


def test_fused_path_matches_exact_path_and_uses_the_flash_kernel():
    q, k, v = _qkv()
    exact = gd_nn.attention_channels_first(q, k, v)
    exact_grads = torch.autograd.grad(exact.square().sum(), (q, k, v))
    with gd_nn.cpu_fused_attention():
        fused = gd_nn.attention_channels_first(q, k, v)
        fused_grads = torch.autograd.grad(fused.square().sum(), (q, k, v))
        inside = _kernels(lambda: gd_nn.attention_channels_first(q, k, v))
    outside = _kernels(lambda: gd_nn.attention_channels_first(q, k, v))
    torch.testing.assert_close(fused, exact, rtol=1e-5, atol=1e-6)
    for a, b in zip(fused_grads, exact_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert any("flash_attention" in name for name in inside), sorted(inside)
    assert not any("flash_attention" in name for name in outside), sorted(outside)  # default: exact path
    again = gd_nn.attention_channels_first(q, k, v)
    assert torch.equal(again, exact)  # the block restored the default, bit for bit


def test_option_is_scoped_and_restored_on_error():
    with pytest.raises(RuntimeError), gd_nn.cpu_fused_attention():
        assert gd_nn._CPU_FUSED_ATTENTION.get()
        raise RuntimeError("boom")
    assert not gd_nn._CPU_FUSED_ATTENTION.get()
    with gd_nn.cpu_fused_attention(), gd_nn.cpu_fused_attention(False):
        assert not gd_nn._CPU_FUSED_ATTENTION.get()


def record_fused_state(monkeypatch) -> list[bool]:
    """Spy on the UNet's attention: the returned list gets, per call, whether the fused option was on."""
    import guided_diffusion.unet as unet_module

    seen: list[bool] = []
    original = unet_module.attention_channels_first

    def spy(q, k, v):
        seen.append(gd_nn._CPU_FUSED_ATTENTION.get())
        return original(q, k, v)

    monkeypatch.setattr(unet_module, "attention_channels_first", spy)
    return seen


def test_training_runs_inside_the_option_and_records_it(tmp_path, monkeypatch):
    data = write_fake_brats(tmp_path / "data")
    seen = record_fused_state(monkeypatch)
    base, fused = tmp_path / "base", tmp_path / "fused"
    assert run_cli(training.main, ["--data_dir", str(data), "--log_dir", str(base), *FLAGS]) == 0
    assert seen and not any(seen)
    seen.clear()
    assert run_cli(training.main, ["--data_dir", str(data), "--log_dir", str(fused), *FLAGS,
                                   "--cpu_fused_attention", "True"]) == 0
    assert seen and all(seen)
    assert not gd_nn._CPU_FUSED_ATTENTION.get()  # the default is back after the run
    assert checkpoint.read_saved_config(str(fused))["train"]["cpu_fused_attention"] is True
    torch.testing.assert_close(torch.tensor(_losses(fused)), torch.tensor(_losses(base)), rtol=1e-4,
                               atol=1e-6)
    # a kernel choice, like --compile: a run may continue with or without it
    assert "cpu_fused_attention" not in RUN_CHANGING_TRAIN_KEYS
    assert run_cli(training.main, ["--data_dir", str(data), "--log_dir", str(base), *FLAGS,
                                   "--max_steps", "3", "--cpu_fused_attention", "True"]) == 0
    assert checkpoint.list_checkpoints(base)[-1] == 3
