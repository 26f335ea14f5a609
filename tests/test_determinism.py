"""Determinism on CPU for every unet_ver (v2, hae, hae_lite, hae_v2).

* Same seed, same inputs -> bit-identical outputs of two separately constructed models (eval mode).
* A forward pass draws from the global torch RNG only in dropout layers (train mode) and in the
  label-dropout draw when no generator is given: eval forward with threshold > 0 and an explicit
  generator, and a train forward without dropout with a generator, leave ``torch.get_rng_state()``
  unchanged (and the check is shown to be able to fail: dropout in train mode does consume it).
* Same seed -> bit-identical anomaly maps and metrics from the full evaluation pipeline
  (``guided_diffusion.anofpdm.translation.main``) for the HAE variants;
  tests/anofpdm/test_translation.py covers v2.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from guided_diffusion import script_util as su

REPO = Path(__file__).resolve().parents[1]

VARIANTS = ("v2", "hae", "hae_lite", "hae_v2")
SIDE = 24


def build(ver: str, dropout: float = 0.0, seed: int = 0) -> torch.nn.Module:
    """Tiny class-conditional model; zero-initialised layers get seeded random values so that every
    block contributes to the output."""
    torch.manual_seed(seed)
    model = su.create_model(image_size=SIDE, num_channels=16, num_res_blocks=1, channel_mult="1,2,2",
                            attention_resolutions="12", num_heads=2, use_scale_shift_norm=True,
                            class_cond=True, num_classes=2, in_channels=2, unet_ver=ver, dropout=dropout)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, 0.05)
    return model


def inputs(batch: int = 3):
    g = torch.Generator().manual_seed(11)
    x = torch.rand(batch, 2, SIDE, SIDE, generator=g) * 2 - 1
    t = torch.randint(0, 1000, (batch,), generator=g)
    return x, t, torch.tensor([0, 1, 1][:batch])


@pytest.mark.parametrize("ver", VARIANTS)
def test_same_seed_bit_identical_outputs(ver):
    x, t, y = inputs()
    outs = []
    for _ in range(2):
        model = build(ver, dropout=0.3).eval()  # dropout is inactive in eval mode
        with torch.no_grad():
            outs.append((model(x, t, y=y), model(x, t, y=y, null=True)))
    (a, a_null), (b, b_null) = outs
    assert torch.equal(a, b) and torch.equal(a_null, b_null)
    assert not torch.equal(a, a_null)  # the label matters, so the comparison is not vacuous
    other = build(ver, seed=1).eval()
    with torch.no_grad():
        assert not torch.equal(other(x, t, y=y), a)


@pytest.mark.parametrize("ver", VARIANTS)
def test_forward_leaves_global_rng_alone(ver):
    x, t, y = inputs()
    gen = torch.Generator().manual_seed(5)

    eval_model = build(ver, dropout=0.3).eval()
    state = torch.get_rng_state()
    with torch.no_grad():
        eval_model(x, t, y=y, threshold=0.5, generator=gen)
        eval_model(x, t, y=y)
        eval_model(x, t, null=True)
    assert torch.equal(torch.get_rng_state(), state), "eval forward consumed the global RNG"

    train_model = build(ver, dropout=0.0).train()
    state = torch.get_rng_state()
    train_model(x, t, y=y, threshold=0.5, generator=gen).sum().backward()
    assert torch.equal(torch.get_rng_state(), state), "train forward without dropout consumed the global RNG"

    # label dropout with the same generator seed drops the same rows, whatever the global RNG does
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    with torch.no_grad():
        torch.manual_seed(100)
        o1 = eval_model(x, t, y=y, threshold=0.5, generator=g1)
        torch.manual_seed(200)
        o2 = eval_model(x, t, y=y, threshold=0.5, generator=g2)
    assert torch.equal(o1, o2)

    # the check can fail: dropout layers in train mode do draw from the global RNG
    dropout_model = build(ver, dropout=0.3).train()
    state = torch.get_rng_state()
    dropout_model(x, t, y=y, generator=gen)
    assert not torch.equal(torch.get_rng_state(), state)


# ------------------------------------------------------------------------------------ evaluation pipeline
def _write_split(root: Path, split: str, lesions: dict[str, list[bool]], rng: np.random.Generator) -> None:
    (root / "data_splits" / split).mkdir(parents=True, exist_ok=True)
    (root / "data_splits" / split / "scans.csv").write_text("".join(f"{p}\n" for p in lesions))
    yy, xx = np.mgrid[:32, :32]
    brain = ((yy - 15.5) / 13) ** 2 + ((xx - 15.5) / 11) ** 2 < 1
    for pid, flags in lesions.items():
        folder = root / f"npy_{split}" / f"patient_{pid}"
        folder.mkdir(parents=True, exist_ok=True)
        for k, lesion in enumerate(flags):
            x = np.stack([brain * (0.5 + 0.1 * c + 0.05 * rng.standard_normal((32, 32))) for c in range(2)])
            y = np.zeros((1, 1, 32, 32), np.float32)
            if lesion:
                cy, cx = rng.integers(11, 20, size=2)
                y[..., cy - 4:cy + 4, cx - 4:cx + 4] = 1
                x[:, cy - 4:cy + 4, cx - 4:cx + 4] += 0.7
            np.savez(folder / f"slice_{30 + k}.npz", x=x[None].astype(np.float32), y=y)


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("determinism")
    rng = np.random.default_rng(3)
    _write_split(root / "data", "val", {"V0": [False, True, True], "V1": [False, True]}, rng)
    _write_split(root / "data", "test", {"P0": [True, False, True], "P1": [False]}, rng)
    return root


MODEL_FLAGS = ["--image_size", "32", "--in_channels", "2", "--num_channels", "16", "--num_res_blocks", "1",
               "--channel_mult", "1,2", "--attention_resolutions", "16", "--num_heads", "1",
               "--diffusion_steps", "30", "--num_classes", "2"]


def _metrics_without_run_info(path: Path) -> dict:
    metrics = json.loads(path.read_text())
    return {k: v for k, v in metrics.items() if k != "run" and "timing" not in k}


@pytest.mark.parametrize("ver", ["hae", "hae_lite", "hae_v2"])
def test_translation_bit_identical_for_hae_variants(ver, eval_data):
    from guided_diffusion.anofpdm import translation

    model_dir = eval_data / f"model_{ver}"
    model_dir.mkdir()
    torch.manual_seed(0)
    model, _ = su.create_model_and_diffusion(
        image_size=32, in_channels=2, num_channels=16, num_res_blocks=1, channel_mult="1,2",
        attention_resolutions="16", num_heads=1, diffusion_steps=30, class_cond=True, num_classes=2,
        unet_ver=ver)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch.save(model.state_dict(), model_dir / "model000001.pt")
    runs = []
    for i in range(2):
        out = eval_data / f"out_{ver}_{i}"
        torch.manual_seed(1000 + i)  # the global RNG state must not matter
        translation.main([*MODEL_FLAGS, "--unet_ver", ver, "--data_dir", str(eval_data / "data"),
                          "--model_dir", str(model_dir), "--log_dir", str(out), "--w", "2",
                          "--forward_steps", "4", "--modality", "0", "1", "--batch_size", "3",
                          "--batch_size_val", "5", "--seed", "7", "--progress", "False",
                          "--save_data", "True", "--num_panels", "0"])
        arrays = {p.name: dict(np.load(p)) for p in sorted((out / "arrays").glob("*.npz"))}
        runs.append((_metrics_without_run_info(out / "metrics.json"), arrays,
                     json.loads((out / "calibration.json").read_text())))
    (m1, a1, c1), (m2, a2, c2) = runs
    assert a1 and a1.keys() == a2.keys()
    for name in a1:
        assert a1[name].keys() == a2[name].keys()
        assert "anomaly_map" in a1[name]
        for key in a1[name]:
            assert np.array_equal(a1[name][key], a2[name][key]), (name, key)
        assert np.isfinite(a1[name]["anomaly_map"]).all()
    assert m1 == m2
    assert c1 == c2
