"""Issue 11: a training step reads device values on the host once (the logged values and the gradient
norm, in one copy after the backward passes), and that copy gives exactly the values read one by one."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from test_train import make_loop

import guided_diffusion
from guided_diffusion import gaussian_diffusion, unet
from guided_diffusion.training.train_logging import fetch_step_values

PACKAGE = Path(guided_diffusion.__file__).resolve().parent
HOST_READS = ("cpu", "item", "tolist", "numpy", "__float__", "__int__", "__bool__")


def record_package_host_reads(monkeypatch) -> list[tuple[str, str]]:
    """Patch the Tensor methods that bring values to the host; record (method, file) for calls made
    directly from the package's code."""
    calls: list[tuple[str, str]] = []
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, _original=original, _name=name, **kwargs):
            caller = Path(inspect.stack(0)[1].filename).resolve()
            if PACKAGE in caller.parents:
                calls.append((_name, caller.name))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    return calls


@pytest.mark.parametrize("microbatch", [-1, 2])
def test_training_step_reads_the_device_once(tmp_path, monkeypatch, microbatch):
    loop = make_loop(tmp_path / "log", max_steps=2, microbatch=microbatch)
    batch = next(iter(loop.loader))
    loop.run_step(batch)  # warm-up step outside the recording (lazy state, first-call paths)
    # as on an accelerator: the host-only value checks are skipped
    monkeypatch.setattr(unet, "checks_on_host", lambda t: False)
    monkeypatch.setattr(gaussian_diffusion, "checks_on_host", lambda t: False)
    calls = record_package_host_reads(monkeypatch)
    loop.run_step(batch)
    assert calls == [("cpu", "train_logging.py"), ("tolist", "train_logging.py")]


def test_fetch_step_values_is_exact():
    g = torch.Generator().manual_seed(0)
    norm = torch.rand((), generator=g) * 7
    records = []
    for n in (3, 1):
        t = torch.randint(0, 1000, (n,), generator=g)
        weights = torch.rand(n, generator=g)
        losses = {"loss": torch.rand(n, generator=g).bfloat16() * weights, "mse": torch.rand(n, generator=g)}
        records.append((t, losses))
    got_norm, got = fetch_step_values(norm, records)
    assert got_norm == float(norm)
    assert len(got) == 2
    for (t, losses), (ts, values) in zip(records, got):
        assert ts == t.tolist()
        assert values == {k: v.float().tolist() for k, v in losses.items()}
    assert fetch_step_values(torch.tensor(2.5, dtype=torch.float64), []) == (2.5, [])
