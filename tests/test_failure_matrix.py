"""Failure matrix: every case either WORKS (finite outputs / loss, right shapes) or stops with ONE clear
message naming the file, flag or tensor, what was expected and what to do.

``MATRIX`` is the module-level list of ``(case id, expected outcome)`` with outcome "works" or
"clear error"; ``python tests/test_failure_matrix.py`` prints it.  The tests are generated from it:
a case function returns None when it works, or the ``pytest.ExceptionInfo`` of the expected error
(each clear-error case asserts its own message with ``pytest.raises(match=...)``; the generic test also
checks the type and that the message is not a bare tensor-shape error).

Models are tiny (16 channels, 24 px, channel_mult (1, 2, 2)) and built fresh in every case.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

from guided_diffusion import script_util as su
from guided_diffusion.anofpdm.forward import run_forward_process
from guided_diffusion.cli import run_cli
from guided_diffusion.data import preprocess
from guided_diffusion.data.brats import BrainDataset, get_train_loader
from guided_diffusion.training import checkpoint
from guided_diffusion.training import run as training
from guided_diffusion.training.train_util import TrainLoop
from guided_diffusion.utils import logger

REPO = Path(__file__).resolve().parents[1]

VARIANTS = ("v2", "hae", "hae_lite", "hae_v2")
PRECISIONS = ("fp32", "bf16", "fp16")
SIDE = 24  # a multiple of 4 = 2**(len((1, 2, 2)) - 1)
WORKS, CLEAR = "works", "clear error"
# phrases of raw torch errors that a user must never see instead of a clear message
BARE_SHAPE_ERRORS = ("Sizes of tensors must match", "size mismatch", "shape '[", "must match the size",
                     "Expected input batch_size", "mat1 and mat2 shapes", "out of range", "index out of")

CASES: dict[str, tuple[str, Callable[[Path], pytest.ExceptionInfo | None]]] = {}


def case(name: str, outcome: str, variants: tuple[str, ...] | None = VARIANTS):
    """Register ``fn(tmp_path[, ver])`` as case ``name[ver]`` per variant (or once when variants=None)."""

    def wrap(fn):
        if variants is None:
            CASES[name] = (outcome, fn)
        else:
            for ver in variants:
                CASES[f"{name}[{ver}]"] = (outcome, functools.partial(fn, ver=ver))
        return fn

    return wrap


# ---------------------------------------------------------------------------------------------- helpers
def build(ver: str, num_classes: int | None = 2, *, in_channels: int = 1, use_checkpoint: bool = False,
          channel_mult: str = "1,2,2", image_size: int = SIDE, width: int = 16, attention: str = "",
          dropout: float = 0.0) -> torch.nn.Module:
    """Tiny model of ``ver`` (seed 0); attention at the middle level unless ``attention`` is given."""
    torch.manual_seed(0)
    return su.create_model(
        image_size=image_size, num_channels=width, num_res_blocks=1, channel_mult=channel_mult,
        attention_resolutions=attention or str(image_size // 2), num_heads=1, use_scale_shift_norm=True,
        class_cond=num_classes is not None, num_classes=num_classes or 0, in_channels=in_channels,
        unet_ver=ver, dropout=dropout, use_checkpoint=use_checkpoint,
    )


def inputs(batch: int = 2, channels: int = 1, side: int = SIDE, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, channels, side, side, generator=g) * 2 - 1
    t = torch.randint(0, 50, (batch,), generator=g)
    y = torch.arange(batch) % 2
    return x, t, y


def autocast(precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def diffusion(steps: int = 50):
    return su.create_gaussian_diffusion(steps=steps)


def assert_finite(t: torch.Tensor, what: str) -> None:
    assert torch.isfinite(t.float()).all(), f"{what} has non-finite values"


def flat_params(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def write_slice(path: Path, x: np.ndarray, y: np.ndarray | None = None) -> Path:
    """One preprocessed slice file (docs/method.md, 'Preprocessing'): x [1, C, H, W], y [1, 1, H, W]."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if y is None:
        y = np.zeros((1, 1, *x.shape[2:]), np.float32)
    np.savez(path, x=x, y=y)
    return path


def write_dataset(root: Path, channels: int = 2, side: int = 16, patients: int = 2, slices: int = 3) -> Path:
    rng = np.random.default_rng(0)
    for p in range(patients):
        for k in range(slices):
            y = np.zeros((1, 1, side, side), np.float32)
            y[..., 2:6, 3:7] = float(k % 2)
            write_slice(root / "npy_train" / f"patient_P{p}" / f"slice_{k}.npz",
                        rng.random((1, channels, side, side)).astype(np.float32), y)
    return root


def make_loop(model, tmp_path: Path, precision: str = "fp32", **kw) -> TrainLoop:
    logger.configure(str(tmp_path), ["log"])
    settings = dict(data=None, batch_size=2, lr=1e-3, ema_rate="0.9", save_interval=1, max_steps=4,
                    label_dropout=0.5, resume="never", log_dir=str(tmp_path))
    return TrainLoop(model=model, diffusion=diffusion(), precision=precision, **{**settings, **kw})


# ---------------------------------------------------------------------------------------------- precision
def _train_step(tmp_path: Path, ver: str, precision: str, num_classes: int | None = 2) -> None:
    model = build(ver, num_classes, dropout=0.1)
    loop = make_loop(model, tmp_path, precision)
    x, _, y = inputs()
    before = flat_params(model).clone()
    losses = []
    for _ in range(2):  # fp16: the GradScaler may skip the first step on overflow; two steps must move
        loop.run_step((x, {"y": y} if num_classes else {}))
        losses.append(float(logger.dumpkvs()["loss"]))
    assert loop.step == 2
    assert all(math.isfinite(v) for v in losses), losses
    after = flat_params(model)
    assert_finite(after, "parameters")
    assert not torch.equal(before, after), "two optimiser steps left the parameters unchanged"
    for rate, ema in loop.ema.items():
        assert all(torch.isfinite(v).all() for v in ema.values()), f"EMA {rate}"


for _p in PRECISIONS:
    case(f"train-step-{_p}", WORKS)(functools.partial(_train_step, precision=_p))


def _inference(tmp_path: Path, ver: str, precision: str) -> None:
    """Eval forward + 3 AnoFPDM forward-process steps under the precision's autocast."""
    model = build(ver).eval()
    x, t, y = inputs()
    with torch.no_grad(), autocast(precision):
        out = model(x, t, y=y)
        fr = run_forward_process(model, diffusion(), x, ws=[0.0, 2.0], modality=[0], forward_steps=3,
                                 generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert_finite(out, "model output")
    assert fr.mse_h.shape == (2, 2, 3, 1) and fr.div.shape == (2, 2, 3, 1)
    for name in ("mse_h", "mse_null", "div"):
        assert_finite(getattr(fr, name), name)
    assert fr.calls == 3 and fr.samples_per_call == [4, 4, 4]  # one call on 2B per step


for _p in PRECISIONS:
    case(f"inference-{_p}", WORKS)(functools.partial(_inference, precision=_p))


@case("forward-process-unconditional-model", CLEAR)
def _fp_uncond(tmp_path: Path, ver: str):
    model = build(ver, None).eval()
    x, _, _ = inputs()
    with pytest.raises(ValueError, match="class-conditional .*--num_classes 2") as err:
        run_forward_process(model, diffusion(), x, ws=[1.0], modality=[0], forward_steps=2)
    return err


# ---------------------------------------------------------------------------------------------- shapes
@case("backward-without-class-labels", WORKS)
def _uncond_backward(tmp_path: Path, ver: str):
    """The classic HAE Lite failure: num_classes None must train (forward + backward)."""
    model = build(ver, None).train()
    x, t, _ = inputs()
    out = model(x, t)
    (out - x).square().mean().backward()  # out is 0 at init (zero conv): use a target
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert grads["out.2.weight"] is not None and grads["out.2.weight"].abs().sum() > 0
    assert all(torch.isfinite(g).all() for g in grads.values() if g is not None)
    hybrid = [n for n, g in grads.items() if g is not None and "output_blocks" in n]
    assert hybrid


@case("class-conditional-train-step", WORKS)
def _cond_step(tmp_path: Path, ver: str):
    _train_step(tmp_path, ver, "fp32", num_classes=2)


@case("unconditional-train-step", WORKS)
def _uncond_step(tmp_path: Path, ver: str):
    _train_step(tmp_path, ver, "fp32", num_classes=None)


@case("use-checkpoint-on-equals-off", WORKS)
def _use_checkpoint(tmp_path: Path, ver: str):
    x, t, y = inputs()
    results = []
    for flag in (False, True):
        model = build(ver, use_checkpoint=flag)
        with torch.no_grad():  # zero-initialised output convs would hide most of the network
            for p in model.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        out = model(x, t, y=y)
        out.square().mean().backward()
        results.append((out.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (o1, g1), (o2, g2) = results
    assert torch.allclose(o1, o2, atol=1e-6)
    assert len(g1) == len(g2) and all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g1, g2))


@case("side-multiple-of-4", WORKS)
def _side_ok(tmp_path: Path, ver: str):
    model = build(ver).eval()
    for side in (SIDE, 20, 32):  # all multiples of 4; 20 is not the nominal image_size
        x, t, y = inputs(side=side)
        with torch.no_grad():
            out = model(x, t, y=y)
        assert out.shape == (2, 1, side, side)
        assert_finite(out, f"output at {side} px")


@case("side-not-multiple-of-4", CLEAR)
def _side_bad(tmp_path: Path, ver: str):
    model = build(ver).eval()
    x, t, y = inputs(side=18)
    msg = r"tensor x .*\(18, 18\).*multiple of 4.*16 or 20 instead of 18"
    with pytest.raises(ValueError, match=msg) as e:
        model(x, t, y=y)
    return e


@case("side-100px-brats-skeleton", CLEAR)
def _side_100(tmp_path: Path, ver: str):
    """100 px into the BraTS skeleton (channel_mult 1,1,2,3,4, multiple 16): message, no bare shape error."""
    model = build(ver, channel_mult="1,1,2,3,4", image_size=128, attention="16").eval()
    x, t, y = inputs(batch=1, side=100)
    with pytest.raises(ValueError, match=r"multiple of 16 .*channel_mult=\(1, 1, 2, 3, 4\).*96 or 112") as e:
        model(x, t, y=y)
    return e


@case("image-size-100-flag", CLEAR)
def _image_size_100(tmp_path: Path, ver: str):
    with pytest.raises(ValueError, match=r"--image_size 100 must be a multiple of 16 .*use 96 or 112") as e:
        su.create_model(image_size=100, num_channels=16, num_res_blocks=1, channel_mult="1,1,2,3,4",
                        attention_resolutions="32,16,8", unet_ver=ver)
    return e


@case("in-channels-1-and-4-batch-1", WORKS)
def _channels(tmp_path: Path, ver: str):
    for c in (1, 4):
        model = build(ver, in_channels=c).train()
        x, t, y = inputs(batch=1, channels=c)
        out = model(x, t, y=y)
        assert out.shape == (1, c, SIDE, SIDE)
        out.square().mean().backward()
        assert_finite(out.detach(), "output")


@case("input-channels-differ-from-model", CLEAR)
def _channels_bad(tmp_path: Path, ver: str):
    model = build(ver, in_channels=4)
    x, t, y = inputs(channels=1)
    with pytest.raises(ValueError, match="tensor x has 1 channels .*in_channels=4.*--in_channels") as e:
        model(x, t, y=y)
    return e


# ---------------------------------------------------------------------------------------------- calls
@case("class-conditional-without-y", CLEAR)
def _no_y(tmp_path: Path, ver: str):
    model = build(ver)
    x, t, _ = inputs()
    with pytest.raises(ValueError, match=r"class-conditional \(num_classes=2\): pass class labels y") as e:
        model(x, t)
    return e


@case("class-conditional-null-true", WORKS)
def _null(tmp_path: Path, ver: str):
    model = build(ver).eval()
    x, t, y = inputs()
    with torch.no_grad():
        a = model(x, t, null=True)
        b = model(x, t, y=y, null=torch.ones(2, dtype=torch.bool))
    assert a.shape == x.shape and torch.equal(a, b)  # null rows ignore the label


@case("label-out-of-range", CLEAR)
def _bad_label(tmp_path: Path, ver: str):
    model = build(ver)
    x, t, _ = inputs()
    msg = r"y has labels in \[0, 2\] .*num_classes=2 \(valid labels 0..1\)"
    with pytest.raises(ValueError, match=msg) as e:
        model(x, t, y=torch.tensor([0, 2]))
    return e


@case("label-given-to-unconditional-model", CLEAR)
def _y_uncond(tmp_path: Path, ver: str):
    model = build(ver, None)
    x, t, y = inputs()
    with pytest.raises(ValueError, match="y was given but this model is unconditional") as e:
        model(x, t, y=y)
    return e


# ---------------------------------------------------------------------------------------------- data
@case("data-dir-missing", CLEAR, None)
def _data_missing(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="data directory .*missing_root does not exist.*"
                                                "make_synthetic_brats.py") as e:
        get_train_loader(tmp_path / "missing_root", 2)
    return e


@case("data-split-empty", CLEAR, None)
def _split_empty(tmp_path: Path):
    (tmp_path / "npy_train").mkdir()
    with pytest.raises(FileNotFoundError, match="npy_train holds no patient_\\* folders") as e:
        BrainDataset(tmp_path, "train")
    return e


@case("data-split-folder-missing", CLEAR, None)
def _split_missing(tmp_path: Path):
    write_dataset(tmp_path)
    with pytest.raises(FileNotFoundError, match="split folder .*npy_val is missing") as e:
        BrainDataset(tmp_path, "val")
    return e


@case("preprocess-subject-missing-modality", CLEAR, None)
def _missing_modality(tmp_path: Path):
    src = tmp_path / "source"
    for sid in ("BraTS2021_00001", "BraTS2021_00002", "BraTS2021_00003"):
        (src / sid).mkdir(parents=True)
        for mod in ("flair", "t1", "t1ce", "t2", "seg"):
            if not (sid.endswith("2") and mod == "t1ce"):
                (src / sid / f"{sid}_{mod}.nii.gz").write_bytes(b"")
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match="subject 'BraTS2021_00002' lacks file "
                                                "BraTS2021_00002_t1ce.nii.gz") as e:
        preprocess.preprocess(src, out=out, progress=False)
    assert not out.exists(), "nothing may be written before every subject was checked"
    return e


def _dataset_with(tmp_path: Path, bad: Callable[[Path], None]) -> BrainDataset:
    root = write_dataset(tmp_path / "data", patients=1, slices=3)
    bad(root / "npy_train" / "patient_P0" / "slice_1.npz")
    return BrainDataset(root, "train")


@case("slice-file-truncated", CLEAR, None)
def _truncated_slice(tmp_path: Path):
    ds = _dataset_with(tmp_path, lambda p: p.write_bytes(p.read_bytes()[:200]))
    with pytest.raises(ValueError, match="slice file .*slice_1.npz is unreadable or truncated.*re-run") as e:
        ds[1]
    return e


@case("slice-file-not-npz", CLEAR, None)
def _not_npz(tmp_path: Path):
    ds = _dataset_with(tmp_path, lambda p: p.write_text("this is not a numpy archive\n"))
    with pytest.raises(ValueError, match="slice file .*slice_1.npz is unreadable or truncated") as e:
        ds[1]
    return e


@case("slice-with-nan", CLEAR, None)
def _nan_slice(tmp_path: Path):
    def bad(p: Path) -> None:
        x = np.ones((1, 2, 16, 16), np.float32)
        x[0, 1, 3, 4] = np.nan
        write_slice(p, x)

    ds = _dataset_with(tmp_path, bad)
    with pytest.raises(ValueError, match="slice file .*slice_1.npz: x contains NaN or inf") as e:
        ds[1]
    return e


@case("slice-all-zeros", WORKS, None)
def _zero_slice(tmp_path: Path):
    ds = _dataset_with(tmp_path, lambda p: write_slice(p, np.zeros((1, 2, 16, 16), np.float64)))
    x, cond = ds[1]
    assert x.dtype == torch.float32 and x.shape == (2, 16, 16)
    assert torch.equal(x, torch.full_like(x, -1.0)) and cond["y"] == 0


@case("mask-size-differs-from-image", CLEAR, None)
def _mask_size(tmp_path: Path):
    ds = _dataset_with(tmp_path, lambda p: write_slice(p, np.ones((1, 2, 16, 16), np.float32),
                                                       np.zeros((1, 1, 8, 8), np.float32)))
    msg = r"slice_1.npz: mask size \(8, 8\) differs from image size \(16, 16\)"
    with pytest.raises(ValueError, match=msg) as e:
        ds[1]
    return e


@case("slice-of-another-size-than-its-dataset", CLEAR, None)
def _other_size(tmp_path: Path):
    ds = _dataset_with(tmp_path, lambda p: write_slice(p, np.ones((1, 2, 12, 12), np.float32)))
    loader = torch.utils.data.DataLoader(ds, batch_size=3)
    msg = r"slice_1.npz: image size \(12, 12\) differs from the dataset's \(16, 16\) \(of .*slice_0.npz\)"
    with pytest.raises(ValueError, match=msg) as e:
        next(iter(loader))
    return e


@case("mask-with-nan", CLEAR, None)
def _nan_mask(tmp_path: Path):
    y = np.zeros((1, 1, 16, 16), np.float32)
    y[0, 0, 5, 5] = np.nan
    ds = _dataset_with(tmp_path, lambda p: write_slice(p, np.ones((1, 2, 16, 16), np.float32), y))
    with pytest.raises(ValueError, match=r"slice file .*slice_1.npz: y \(mask\) contains NaN or inf") as e:
        ds[1]
    return e


@case("image-complex", CLEAR, None)
def _complex_x(tmp_path: Path):
    ds = _dataset_with(tmp_path, lambda p: write_slice(p, np.ones((1, 2, 16, 16), np.complex128)))
    with pytest.raises(ValueError, match="slice file .*slice_1.npz: x has complex dtype complex128") as e:
        ds[1]
    return e


def _nifti_subjects(src: Path, n: int = 3) -> list[str]:
    """n tiny BraTS-style subjects (16 x 16 x 6 volumes, every slice with brain)."""
    import nibabel as nib

    names = [f"BraTS2021_{i:05d}" for i in range(1, n + 1)]
    rng = np.random.default_rng(0)
    for sid in names:
        (src / sid).mkdir(parents=True)
        for mod in ("flair", "t1", "t1ce", "t2", "seg"):
            vol = rng.integers(0, 2, (16, 16, 6)) if mod == "seg" else rng.integers(50, 200, (16, 16, 6))
            nib.save(nib.Nifti1Image(vol.astype(np.int16), np.eye(4)), str(src / sid / f"{sid}_{mod}.nii.gz"))
    return names


@case("preprocess-corrupt-volume-mid-run", CLEAR, None)
def _corrupt_mid_run(tmp_path: Path):
    src, out = tmp_path / "source", tmp_path / "out"
    names = _nifti_subjects(src)
    assert preprocess.preprocess(src, out=out, shape=8, progress=False) == out
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    last = preprocess.split_subjects(names)["test"][0]  # processed last: the others are written first
    (src / last / f"{last}_t2.nii.gz").write_bytes(b"not a nifti volume")
    fresh = tmp_path / "fresh"
    with pytest.raises(ValueError, match=f"subject '{last}': cannot read .*{last}_t2.nii.gz"):
        preprocess.preprocess(src, out=fresh, shape=8, progress=False)
    assert not fresh.exists(), "a failed run must not leave a partial output tree"
    with pytest.raises(ValueError, match=f"subject '{last}': cannot read") as e:
        preprocess.preprocess(src, out=out, shape=8, progress=False)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before, "the earlier output changed"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [], "temporary tree left over"
    return e


@case("train-script-channels-differ-from-in-channels", CLEAR, None)
def _train_channels(tmp_path: Path):
    """Through scripts/train.py main: exit status 2 and one line naming --in_channels (no traceback)."""
    data = write_dataset(tmp_path / "data", channels=2)
    argv = ["--data_dir", str(data), "--log_dir", str(tmp_path / "log"), "--in_channels", "4",
            "--image_size", "16", "--num_channels", "16", "--channel_mult", "1,2",
            "--attention_resolutions", "8", "--num_res_blocks", "1", "--batch_size", "2", "--max_steps", "1",
            "--num_workers", "0"]
    stderr = io.StringIO()
    with mock.patch.dict(os.environ), contextlib.redirect_stderr(stderr):
        os.environ.pop("TRAIN_DEBUG", None)
        status = run_cli(training.main, argv)
    assert status == 2, stderr.getvalue()
    assert "has 2 channels but --in_channels is 4; set --in_channels 2" in stderr.getvalue()
    assert "Traceback" not in stderr.getvalue()
    with mock.patch.dict(os.environ, {"TRAIN_DEBUG": "1"}):  # the same error, raised instead of printed
        msg = "has 2 channels but --in_channels is 4; set --in_channels 2"
        with pytest.raises(ValueError, match=msg) as e:
            run_cli(training.main, argv)
    return e


# ---------------------------------------------------------------------------------------------- checkpoints
def _plain_checkpoint_dir(tmp_path: Path, ver: str = "v2") -> tuple[Path, torch.nn.Module]:
    model = build(ver)
    d = tmp_path / "ck"
    d.mkdir()
    for name in ("model000002.pt", "ema_0.9_000002.pt", "model000004.pt", "ema_0.9_000004.pt"):
        torch.save(model.state_dict(), d / name)
    return d, model


@case("checkpoint-step-missing", CLEAR, None)
def _step_missing(tmp_path: Path):
    d, _ = _plain_checkpoint_dir(tmp_path)
    assert checkpoint.find_checkpoint(str(d), step=2).endswith("model000002.pt")
    with pytest.raises(FileNotFoundError, match="no checkpoint for step 7 in .*; steps present: 2, 4") as e:
        checkpoint.find_checkpoint(str(d), step=7)
    return e


@case("checkpoint-ema-rate-wrong", CLEAR, None)
def _ema_wrong(tmp_path: Path):
    d, _ = _plain_checkpoint_dir(tmp_path)
    assert checkpoint.find_checkpoint(str(d), ema_rate="0.90").endswith("ema_0.9_000004.pt")
    msg = "no EMA checkpoint with rate 0.9999 .*EMA rates present: 0.9"
    with pytest.raises(FileNotFoundError, match=msg) as e:
        checkpoint.find_checkpoint(str(d), ema_rate=0.9999)
    return e


@case("checkpoint-of-another-unet-ver", CLEAR)
def _other_ver(tmp_path: Path, ver: str):
    other = VARIANTS[(VARIANTS.index(ver) + 1) % len(VARIANTS)]
    d, _ = _plain_checkpoint_dir(tmp_path, other)
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"(?s)model000004.pt does not fit the model built from the current flags.*"
                             r"flags that probably differ: .*pass the same model flags") as e:
        checkpoint.load_model_checkpoint(build(ver), str(d / "model000004.pt"))
    return e


@case("checkpoint-of-another-width", CLEAR)
def _other_width(tmp_path: Path, ver: str):
    d, _ = _plain_checkpoint_dir(tmp_path, ver)
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"(?s)does not fit.*mis-shaped keys: .*vs model.*num_channels") as e:
        checkpoint.load_model_checkpoint(build(ver, width=24), str(d / "model000004.pt"))
    return e


@case("checkpoint-truncated-falls-back", CLEAR, None)
def _truncated_ck(tmp_path: Path):
    """A truncated newest checkpoint: the loader names it; resume auto uses the previous complete one."""
    log = tmp_path / "log"
    model = build("hae_v2")
    loop = make_loop(model, log)
    x, _, y = inputs()
    for _ in range(2):
        loop.run_step((x, {"y": y}))
        loop.save()
    assert checkpoint.list_checkpoints(log) == [1, 2]
    newest = log / "model000002.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    found = checkpoint.latest_complete_checkpoint(str(log))
    assert found is not None and found.step == 1
    resumed = TrainLoop(model=build("hae_v2"), diffusion=diffusion(), data=None, batch_size=2, max_steps=4,
                        ema_rate="0.9", resume="auto", log_dir=str(log))
    assert resumed.step == 1
    msg = "model000002.pt: truncated or not a checkpoint .*resume from an earlier step"
    with pytest.raises(checkpoint.CheckpointError, match=msg) as e:
        checkpoint.load_model_checkpoint(build("hae_v2"), str(newest))
    return e


# ---------------------------------------------------------------------------------------------- issue 8 §4-§6
@case("train-ema-rate-not-a-number", CLEAR, None)
def _ema_abc(tmp_path: Path):
    """--ema_rate abc: names the flag and says what is expected (was a bare float() error)."""
    with pytest.raises(ValueError, match=r"--ema_rate 'abc': 'abc' is not a number; expected") as e:
        make_loop(build("v2"), tmp_path, ema_rate="abc")
    return e


@case("train-ema-rate-outside-0-1", CLEAR, None)
def _ema_range(tmp_path: Path):
    """--ema_rate 1.5 diverged silently; rates must lie in [0, 1)."""
    with pytest.raises(ValueError, match=r"--ema_rate 1.5: must be in \[0, 1\)") as e:
        make_loop(build("v2"), tmp_path, ema_rate="1.5")
    return e


def _two_steps(tmp_path: Path) -> None:
    loop = make_loop(build("v2"), tmp_path, data=_batches(), max_steps=2, save_interval=2)
    loop.run_loop()


def _batches():
    x, t, y = inputs()
    return [(x, {"y": y})] * 2


@case("train-resume-never-with-checkpoints", CLEAR, None)
def _resume_never(tmp_path: Path):
    """--resume never over existing checkpoints used to overwrite some and keep newer stale ones."""
    _two_steps(tmp_path)
    with pytest.raises(ValueError, match=r"--resume never: .* already holds checkpoints \(steps 2\)") as e:
        make_loop(build("v2"), tmp_path, data=_batches())
    return e


@case("train-resume-with-another-seed", CLEAR, None)
def _resume_seed(tmp_path: Path):
    """A resume with another seed continued silently; the saved train flags are compared now."""
    config = {"train": {"seed": 0, "lr": 1e-3}}
    loop = make_loop(build("v2"), tmp_path, data=_batches(), max_steps=2, save_interval=2, config=config)
    loop.run_loop()
    with pytest.raises(ValueError, match=r"train.seed: checkpoint 0, flags 1") as e:
        make_loop(build("v2"), tmp_path, data=_batches(), resume="auto",
                  config={"train": {"seed": 1, "lr": 1e-3}})
    return e


MATRIX: list[tuple[str, str]] = [(name, outcome) for name, (outcome, _) in CASES.items()]


@pytest.mark.parametrize("case_id,outcome", MATRIX, ids=[name for name, _ in MATRIX])
def test_failure_matrix(case_id: str, outcome: str, tmp_path: Path) -> None:
    result = CASES[case_id][1](tmp_path)
    if outcome == WORKS:
        assert result is None
        return
    assert isinstance(result, pytest.ExceptionInfo), f"{case_id}: expected a clear error"
    assert isinstance(result.value, ValueError | FileNotFoundError), type(result.value)
    message = str(result.value)
    assert len(message) > 40, message
    assert not any(bare in message for bare in BARE_SHAPE_ERRORS), message


def test_matrix_covers_every_variant() -> None:
    per_variant = {name.split("[")[0] for name in CASES if "[" in name}
    for base in per_variant:
        assert {f"{base}[{v}]" for v in VARIANTS} <= set(CASES), base
    # v1 (the comparison methods' guided-diffusion UNet, no classifier-free condition): tests/test_unet_v1.py
    assert set(su.MODEL_REGISTRY) == set(VARIANTS) | {"v1"}



# ---------------------------------------------------------------------------------------------- crash safety
SAVE_INTERVAL = 2
CRASH_STEPS = 24
CRASH_TIMEOUT = 150
KILLS = ("random", "mid-save", "random", "mid-save")  # kill points, in this order


def _crash_cmd(data: Path, out: Path) -> list[str]:
    flags = dict(data_dir=data, log_dir=out, unet_ver="hae_v2", image_size=32, in_channels=4, num_channels=16,
                 num_res_blocks=1, channel_mult="1,2", attention_resolutions=16, num_heads=1, num_classes=2,
                 diffusion_steps=100, batch_size=4, lr=1e-3, max_steps=CRASH_STEPS,
                 save_interval=SAVE_INTERVAL, log_interval=1, threshold=0.1, dropout=0.1, ema_rate=0.9,
                 num_workers=0, seed=3)
    return [sys.executable, str(REPO / "scripts" / "train.py"), *(a for k, v in flags.items()
                                                                   for a in (f"--{k}", str(v)))]


def _crash_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(
                   filter(None, [str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH")])))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "PMI_RANK", "OPENAI_LOGDIR",
                "TRAIN_DEBUG"):
        env.pop(key, None)
    return env


def _progress(out: Path) -> dict[int, dict[str, str]]:
    """progress.csv rows by step (the last row of a step wins: resumed runs re-log the lost steps)."""
    path = out / "progress.csv"
    if not path.is_file():
        return {}
    rows = list(csv.reader(io.StringIO(path.read_text())))
    if not rows:
        return {}
    header, by_step = rows[0], {}
    for row in rows[1:]:
        if len(row) == len(header) and row[header.index("step")].isdigit():
            by_step[int(row[header.index("step")])] = dict(zip(header, row))
    return by_step


def _partial_save(out: Path, pid: int, before: dict[str, int], min_step: int = 0) -> bool:
    """True while a save (of a step >= ``min_step``) by process ``pid`` is under way: one of its temp files
    exists, or a model / EMA / optimizer file was (re)written after ``before`` and has no state file yet."""
    try:
        names = os.listdir(out)
    except FileNotFoundError:
        return False
    for name in names:  # temp file of an atomic write: ".{target}.tmp-{pid}-{random}"
        target, sep, rest = name.partition(".tmp-")
        parsed = checkpoint.parse_checkpoint_name(target.lstrip(".")) if sep else None
        if parsed and rest.startswith(f"{pid}-") and parsed[2] >= min_step:
            return True
    parsed_names = [checkpoint.parse_checkpoint_name(name) for name in names]
    states = {parsed[2] for parsed in parsed_names if parsed and parsed[0] == "state"}
    for name, parsed in zip(names, parsed_names):
        if parsed and parsed[0] != "state" and parsed[2] not in states and parsed[2] >= min_step:
            try:
                mtime = (out / name).stat().st_mtime_ns
            except FileNotFoundError:
                continue
            if before.get(name) != mtime:
                return True
    return False


def _mtimes(out: Path) -> dict[str, int]:
    if not out.is_dir():
        return {}
    return {p.name: p.stat().st_mtime_ns for p in out.iterdir() if checkpoint.parse_checkpoint_name(p.name)}


def _kill_once(cmd: list[str], out: Path, kind: str, rng: random.Random) -> dict:
    """Start training and SIGKILL it: "random" = a random moment after it logged 1-3 steps beyond the
    furthest step so far; "mid-save" = while it writes the checkpoint files of its second save (so each
    round makes progress). Returns what was seen at the kill."""
    before = _mtimes(out)
    complete = checkpoint.list_checkpoints(out)
    furthest = max(_progress(out), default=0)
    target = furthest + rng.randint(1, 3)
    second_save = (complete[-1] if complete else 0) + 2 * SAVE_INTERVAL
    proc = subprocess.Popen(cmd, env=_crash_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + CRASH_TIMEOUT
    event = {"kind": kind, "delay_s": None, "partial_save_at_kill": False}
    try:
        while True:
            assert time.monotonic() < deadline, f"{kind}: no kill moment within {CRASH_TIMEOUT}s"
            if proc.poll() is not None:
                pytest.fail(f"{kind}: training ended (status {proc.returncode}) before the kill:\n"
                            f"{proc.stderr.read().decode()[-2000:]}")
            if kind == "mid-save":
                if _partial_save(out, proc.pid, before, second_save):
                    break
                time.sleep(0.0005)
            elif max(_progress(out), default=0) >= target:
                event["delay_s"] = rng.uniform(0.0, 0.3)
                time.sleep(event["delay_s"])
                break
            else:
                time.sleep(0.02)
        event["partial_save_at_kill"] = _partial_save(out, proc.pid, before)
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stderr.close()
    event["returncode"] = proc.returncode
    return event


def _check_after_kill(out: Path, event: dict) -> None:
    """Complete checkpoints load, at most one save interval is lost, temp files are never checkpoints."""
    complete = checkpoint.list_checkpoints(out)
    logger.configure(str(out / "inspect"), ["log"])
    newest = checkpoint.latest_complete_checkpoint(str(out))
    assert (newest.step if newest else None) == (complete[-1] if complete else None), \
        "the newest complete checkpoint does not load"
    logged = max(_progress(out), default=0)
    resume_step = complete[-1] if complete else 0
    assert logged - resume_step <= SAVE_INTERVAL, (event, logged, complete)
    temps = [p.name for p in out.iterdir() if ".tmp-" in p.name]
    assert all(checkpoint.parse_checkpoint_name(name) is None for name in temps), temps
    if checkpoint.list_model_steps(out):
        assert ".tmp-" not in checkpoint.find_checkpoint(str(out))
    event.update(logged_step=logged, resume_step=resume_step, temp_files=len(temps))


@pytest.mark.slow
def test_sigkill_at_random_moments_and_during_saves(tmp_path):
    """SIGKILL scripts/train.py at several moments (incl. during checkpoint writes), resume each time with
    --resume auto; the final weights, EMA, optimizer state and every logged loss equal an uninterrupted run
    with the same seed bit for bit."""
    # 20 slices of 4 x 32 x 32 (BraTS-like channels; 5 batches per epoch, so epoch boundaries are crossed
    # and resumed from); hand-made because the synthetic builder's atlas loading costs ~15 s
    data = write_dataset(tmp_path / "data", channels=4, side=32, patients=2, slices=10)
    ref_dir, out = tmp_path / "reference", tmp_path / "killed"
    reference = subprocess.Popen(_crash_cmd(data, ref_dir), env=_crash_env(), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE)
    try:
        rng = random.Random(20240607)
        events = []
        for kind in KILLS:
            event = _kill_once(_crash_cmd(data, out), out, kind, rng)
            _check_after_kill(out, event)
            events.append(event)
        assert any(e["kind"] == "mid-save" and e["partial_save_at_kill"] for e in events), events
        final = subprocess.run(_crash_cmd(data, out), env=_crash_env(), capture_output=True,
                               timeout=CRASH_TIMEOUT)
        assert final.returncode == 0, final.stderr.decode()[-3000:]
        _, ref_err = reference.communicate(timeout=CRASH_TIMEOUT)
        assert reference.returncode == 0, ref_err.decode()[-3000:]
    finally:
        if reference.poll() is None:
            reference.kill()
            reference.wait()
    assert checkpoint.list_checkpoints(out)[-1] == CRASH_STEPS
    leftover = [p.name for p in out.iterdir() if ".tmp-" in p.name]
    assert not leftover, f"temporary files of killed saves were not cleaned up on resume: {leftover}"
    log = (out / "log.txt").read_text()
    assert log.count("resumed from step") >= sum(e["resume_step"] > 0 for e in events)
    for name in (f"model{CRASH_STEPS:06d}.pt", f"ema_0.9_{CRASH_STEPS:06d}.pt", f"opt{CRASH_STEPS:06d}.pt"):
        a = checkpoint.load_state_dict_file(str(ref_dir / name))
        b = checkpoint.load_state_dict_file(str(out / name))
        _assert_same(a, b, name)
    ref_rows, rows = _progress(ref_dir), _progress(out)
    assert sorted(rows) == sorted(ref_rows) == list(range(1, CRASH_STEPS + 1))
    for step in ref_rows:
        for key in ("loss", "mse", "grad_norm", "lr"):
            assert rows[step][key] == ref_rows[step][key], (step, key, events)
    print("\nkills:", json.dumps(events))


def _assert_same(a, b, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}/{i}")
    else:
        assert a == b, where


if __name__ == "__main__":
    width = max(len(name) for name, _ in MATRIX)
    for name, outcome in MATRIX:
        print(f"{name:<{width}}  {outcome}")
