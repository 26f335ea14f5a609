#!/usr/bin/env python
"""HAE UNet V2 checks (the seed's three verifications, as real assertions).

1. Tensor operations of every block: shapes, dtypes, identity at initialisation, determinism, no
   NaN under bf16 autocast.
2. Implementation completeness: classes, registered factory names, training/inference scripts and
   launchers exist, import, and parse (``bash -n``).
3. Version comparison: exact parameter counts and HAE > HAE Lite > HAE V2 > FPDM UNet.

Run ``python test_hae_unet_v2.py`` (prints PASS/FAIL per check, exit status 1 on any failure) or
collect it with pytest.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent

SCRIPT_FILES = ("scripts/train_hae_v2.py", "scripts/translation_FPDM_hae_v2.py")
LAUNCHER_FILES = ("config/run_train_brats_clf_free_guided_hae_v2.sh",
                  "config/run_translation_brats_fpdm_hae_v2.sh")
EXPECTED = {
    "compare": {"v2": 261_375_492, "hae": 416_482_052, "hae_lite": 306_379_780, "hae_v2": 296_051_140},
    "brats": {"v2": 103_082_500, "hae": 158_822_660, "hae_lite": 119_499_780, "hae_v2": 115_808_580},
}
TINY = dict(image_size=32, in_channels=4, model_channels=32, out_channels=4, num_res_blocks=1,
            attention_resolutions={2}, dropout=0.1, channel_mult=(1, 2, 2), num_heads=4, num_classes=2)


def _blocks_v2():
    from guided_diffusion import unet_hae_v2

    return unet_hae_v2


# ------------------------------------------------------------------------------------ 1. tensor operations
def test_bottleneck_mlp_tensor_ops():
    m = _blocks_v2()
    torch.manual_seed(0)
    mlp = m.BottleneckMLP(64, bottleneck_ratio=0.25, dropout=0.1).eval()
    assert mlp.fc1.in_features == 64 and mlp.fc1.out_features == 16 and mlp.fc2.out_features == 64
    x = torch.randn(2, 50, 64)
    out = mlp(x)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert torch.equal(out, mlp(x))
    for bad in (0.0, 1.01, -1.0):
        try:
            m.BottleneckMLP(64, bottleneck_ratio=bad)
        except ValueError as err:
            assert "bottleneck_ratio" in str(err)
        else:
            raise AssertionError(f"bottleneck_ratio={bad} was accepted")


def test_mstb_v2_tensor_ops():
    m = _blocks_v2()
    torch.manual_seed(0)
    block = m.MultiScaleSparseTransformerBlockV2(64, bottleneck_ratio=0.25, dropout=0.1).eval()
    for h, w in ((16, 16), (12, 12), (8, 20), (3, 5)):        # sides not multiples of 4 or 8 included
        z = torch.randn(2, 64, h, w)
        out = block(z)
        assert out.shape == z.shape and out.dtype == z.dtype
        assert torch.isfinite(out).all()
        assert torch.equal(out, block(z)), "eval forward is not deterministic"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(torch.randn(2, 64, 16, 16))
    assert torch.isfinite(out.float()).all(), "NaN/inf under bf16 autocast"
    try:
        m.MultiScaleSparseTransformerBlockV2(60)
    except ValueError as err:
        assert "8" in str(err)
    else:
        raise AssertionError("a width not divisible by 8 heads was accepted")


def test_hybrid_block_v2_tensor_ops():
    m = _blocks_v2()
    torch.manual_seed(0)
    block = m.HybridCNNTransformerBlockV2(64, emb_channels=128, dropout=0.1, bottleneck_ratio=0.25).eval()
    x, emb = torch.randn(2, 64, 12, 12), torch.randn(2, 128)
    assert torch.equal(block(x, emb), x), "the zero-initialised fusion must make the block the identity"
    nn.init.normal_(block.fusion.weight, std=0.05)
    out = block(x, emb)
    assert out.shape == x.shape and not torch.equal(out, x)
    assert torch.equal(out, block(x, emb))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out16 = block(x, emb)
    assert torch.isfinite(out16.float()).all()


def test_hae_unet_v2_forward():
    m = _blocks_v2()
    torch.manual_seed(0)
    model = m.HAEUNetModelV2(**TINY, bottleneck_ratio=0.25).eval()
    assert [b.channels for b in model.hybrid_blocks()] == [64, 64]
    x = torch.randn(2, 4, 32, 32)
    t = torch.tensor([10, 900])
    y = torch.tensor([0, 1])
    state = torch.get_rng_state()
    out = model(x, t, y=y)
    assert torch.equal(state, torch.get_rng_state()), "eval forward consumed global random numbers"
    assert out.shape == x.shape and out.dtype == torch.float32
    assert torch.equal(out, model(x, t, y=y))
    assert torch.equal(model(x, t, null=True), model(x, t, y=y, null=torch.ones(2, dtype=torch.bool)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out16 = model(x, t, y=y)
    assert torch.isfinite(out16).all()


# -------------------------------------------------------------------------------------- 2. completeness
def test_classes_and_factory_names():
    from guided_diffusion import script_util, unet_hae, unet_hae_lite, unet_hae_v2

    for module, names in (
        (unet_hae_v2, ("BottleneckMLP", "MultiScaleSparseTransformerBlockV2", "HybridCNNTransformerBlockV2",
                       "HAEUNetModelV2")),
        (unet_hae_lite, ("MultiScaleSparseTransformerBlockLite", "HybridCNNTransformerBlockLite",
                         "HAEUNetModelLite")),
        (unet_hae, ("MultiScaleSparseTransformerBlock", "HybridCNNTransformerBlock", "HAEUNetModel")),
    ):
        for name in names:
            assert isinstance(getattr(module, name, None), type), f"{module.__name__}.{name} is missing"
    for ver in ("v2", "hae", "hae_lite", "hae_v2"):
        assert ver in script_util.MODEL_REGISTRY, f"unet_ver {ver!r} is not registered"
    model = script_util.create_model(32, 32, 1, channel_mult="1,2,2", attention_resolutions="16",
                                     in_channels=4, class_cond=True, num_classes=2, unet_ver="hae_v2",
                                     use_hae=True, bottleneck_ratio=0.5)
    assert isinstance(model, unet_hae_v2.HAEUNetModelV2) and model.bottleneck_ratio == 0.5


def test_scripts_exist_and_import():
    missing = [f for f in SCRIPT_FILES if not (ROOT / f).is_file()]
    assert not missing, f"missing scripts: {missing}"
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path)
    for rel in SCRIPT_FILES:  # each imports and parses its flags in a fresh interpreter
        res = subprocess.run([sys.executable, str(ROOT / rel), "--help"], capture_output=True, text=True,
                             env=env, timeout=300)
        assert res.returncode == 0 and "--unet_ver" in res.stdout, (rel, res.stderr[-2000:])
    from guided_diffusion.training.run import HAE_V2_FORCED

    assert HAE_V2_FORCED == {"unet_ver": "hae_v2"}


def test_launchers_exist_and_parse():
    missing = [f for f in LAUNCHER_FILES if not (ROOT / f).is_file()]
    assert not missing, f"missing launchers: {missing}"
    bash = shutil.which("bash")
    assert bash, "bash is needed to check the launchers"
    for rel in LAUNCHER_FILES:
        res = subprocess.run([bash, "-n", str(ROOT / rel)], capture_output=True, text=True)
        assert res.returncode == 0, f"{rel} does not parse: {res.stderr}"
        text = (ROOT / rel).read_text()
        assert "hae_v2" in text and "--use_hae True" in text, f"{rel} does not select the HAE V2 UNet"
    train = (ROOT / LAUNCHER_FILES[0]).read_text()
    assert "scripts/train_hae_v2.py" in train and "clf_free_guided_hae_v2" in train and "12361" in train
    assert "BOTTLENECK_RATIO" in train


# ------------------------------------------------------------------------------------ 3. version comparison
def test_version_comparison():
    import compare_hae_versions as cmp

    for config, expected in EXPECTED.items():
        rows = cmp.measure(config)
        got = {ver: rows[ver]["total"] for ver in expected}
        assert got == expected, f"{config}: measured {got}, expected {expected}"
        assert got["hae"] > got["hae_lite"] > got["hae_v2"] > got["v2"]
        for ver in ("hae", "hae_lite", "hae_v2"):
            r = rows[ver]
            assert r["encoder"] == rows["v2"]["encoder"] and r["middle"] == rows["v2"]["middle"]
            assert r["decoder"] == rows["v2"]["decoder"], "HAE variants change only the hybrid blocks"
            assert r["hybrid"] == got[ver] - got["v2"]


TESTS = [obj for name, obj in list(globals().items()) if name.startswith("test_") and callable(obj)]


def main() -> int:
    failed = 0
    for test in TESTS:
        try:
            test()
        except Exception:                                  # report every check, then fail at the end
            failed += 1
            print(f"FAIL {test.__name__}")
            traceback.print_exc(limit=3)
        else:
            print(f"PASS {test.__name__}")
    print(f"{len(TESTS) - failed}/{len(TESTS)} checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
