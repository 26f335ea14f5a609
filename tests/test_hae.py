"""Critical properties of the HAE UNet family (hae, hae_lite, hae_v2) and their shared blocks."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from guided_diffusion import script_util
from guided_diffusion.hae_blocks import (
    HybridCNNTransformerBlockBase,
    PatchEmbedTokens,
    PooledTokens,
    SpatialReductionAttention,
)
from guided_diffusion.unet import UNetModel
from guided_diffusion.unet_hae import (
    HAEUNetModel,
    HybridCNNTransformerBlock,
    MultiScaleSparseTransformerBlock,
)
from guided_diffusion.unet_hae_lite import (
    HAEUNetModelLite,
    HybridCNNTransformerBlockLite,
    MultiScaleSparseTransformerBlockLite,
)
from guided_diffusion.unet_hae_v2 import (
    BottleneckMLP,
    HAEUNetModelV2,
    HybridCNNTransformerBlockV2,
    MultiScaleSparseTransformerBlockV2,
)

VARIANTS = {"hae": HAEUNetModel, "hae_lite": HAEUNetModelLite, "hae_v2": HAEUNetModelV2}
BLOCKS = {"hae": HybridCNNTransformerBlock, "hae_lite": HybridCNNTransformerBlockLite,
          "hae_v2": HybridCNNTransformerBlockV2}

# 24 px input, mult (1, 2): the only hybrid block sits at 12x12 (not a multiple of p = 8).
TINY = dict(image_size=24, in_channels=2, model_channels=32, out_channels=2, num_res_blocks=1,
            attention_resolutions={2}, dropout=0.1, channel_mult=(1, 2), num_heads=2)

CMP = dict(image_size=128, in_channels=4, model_channels=128, out_channels=4, num_res_blocks=2,
           attention_resolutions={4, 8, 16}, dropout=0.1, channel_mult=(1, 2, 4, 8), num_heads=8,
           use_scale_shift_norm=False, num_classes=None)
BRATS = dict(CMP, channel_mult=(1, 1, 2, 3, 4), num_heads=4, use_scale_shift_norm=True, num_classes=2)
EXPECTED = {
    "cmp": {"v2": 261_375_492, "hae": 416_482_052, "hae_lite": 306_379_780, "hae_v2": 296_051_140},
    "brats": {"v2": 103_082_500, "hae": 158_822_660, "hae_lite": 119_499_780, "hae_v2": 115_808_580},
}


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def tiny(name: str, num_classes: int | None = 2, seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    return VARIANTS[name](**{**TINY, "num_classes": num_classes, **kw})


def perturb(m: nn.Module) -> nn.Module:
    """Give the zero-initialised output head and fusion convs weights, so gradients reach every block."""
    nn.init.normal_(m.out[-1].weight, std=0.05)
    for blk in m.hybrid_blocks():
        nn.init.normal_(blk.fusion.weight, std=0.05)
    return m


def inputs(batch: int = 2, side: int = 24, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 2, side, side, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.arange(batch) % 2
    return x, t, y


@pytest.mark.parametrize("config", ["cmp", "brats"])
def test_exact_parameter_counts(config):
    cfg = CMP if config == "cmp" else BRATS
    with torch.device("meta"):
        got = {"v2": n_params(UNetModel(**cfg))}
        got.update({k: n_params(cls(**cfg)) for k, cls in VARIANTS.items()})
    assert got == EXPECTED[config]


def test_registry_builders_and_per_block_formula():
    assert {"v2", "hae", "hae_lite", "hae_v2"} <= set(script_util.MODEL_REGISTRY)
    with torch.device("meta"):
        m = script_util.create_model(128, 128, 2, channel_mult="1,1,2,3,4", class_cond=True, num_classes=2,
                                     attention_resolutions="32,16,8", num_heads=4, use_scale_shift_norm=True,
                                     dropout=0.1, in_channels=4, unet_ver="hae_v2", bottleneck_ratio=0.25)
    assert isinstance(m, HAEUNetModelV2) and n_params(m) == EXPECTED["brats"]["hae_v2"]
    widths = [b.channels for b in m.hybrid_blocks()]
    assert widths == [512, 384, 256, 128]          # levels n-1 .. 1
    e = 512
    for blk, c in zip(m.hybrid_blocks(), widths):
        r = math.floor(0.25 * c)
        formula = (18 * c * c + 6 * c) + (e * c + c) + (c * c + c) + (4 * c * c + 4 * c) + 8 * c \
            + (c * c + c) + (2 * c * r + r + c)
        assert n_params(blk) == formula


def test_use_hae_false_is_plain_skeleton():
    with torch.device("meta"):
        plain = UNetModel(**CMP, resblock_activation=True)
        for cls in VARIANTS.values():
            m = cls(**CMP, use_hae=False)
            assert not m.hybrid_blocks()
            assert n_params(m) == n_params(plain)


def test_attention_parameters_match_multihead_attention():
    c = 64
    ours = SpatialReductionAttention(c)
    ref = nn.MultiheadAttention(c, 8)
    shapes = {k: v.shape for k, v in ours.state_dict().items()}
    assert shapes == {k: v.shape for k, v in ref.state_dict().items()}
    with pytest.raises(ValueError, match="multiple of the 8"):
        SpatialReductionAttention(36)


def test_attention_matches_reference_head_split():
    torch.manual_seed(0)
    c, heads = 32, 8
    attn = SpatialReductionAttention(c, heads)
    nn.init.normal_(attn.in_proj_bias)
    q_tok = torch.randn(2, 20, c)
    kv = [torch.randn(2, 5, c), torch.randn(2, 2, c)]
    out = attn(q_tok, kv)
    wq, wk, wv = attn.in_proj_weight.chunk(3)
    bq, bk, bv = attn.in_proj_bias.chunk(3)
    d = c // heads
    q = q_tok @ wq.T + bq
    per_head = []
    for h in range(heads):
        tokens = kv[0] if h < heads // 2 else kv[1]
        sl = slice(h * d, (h + 1) * d)
        k = tokens @ wk[sl].T + bk[sl]
        v = tokens @ wv[sl].T + bv[sl]
        w = torch.softmax(q[..., sl] @ k.transpose(1, 2) / math.sqrt(d), dim=-1)
        per_head.append(w @ v)
    ref = attn.out_proj(torch.cat(per_head, dim=-1))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_regional_tokens_for_sides_not_multiple_of_p():
    x = torch.arange(12.0).view(1, 1, 1, 12).expand(1, 1, 12, 12)
    pooled = PooledTokens(8)(x)                      # ceil mode: 2x2 tokens, partial patch = mean of valid
    assert pooled.shape == (1, 4, 1)
    torch.testing.assert_close(pooled[0, :, 0], torch.tensor([3.5, 9.5, 3.5, 9.5]))
    emb = PatchEmbedTokens(4, 8)
    assert emb(torch.randn(2, 4, 12, 12)).shape == (2, 4, 4)
    assert emb(torch.randn(2, 4, 3, 5)).shape == (2, 1, 4)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_hybrid_block_at_12x12_shapes_and_identity_at_init(name):
    m = tiny(name)
    blocks = m.hybrid_blocks()
    assert len(blocks) == 1 and isinstance(blocks[0], BLOCKS[name]) and blocks[0].channels == 64
    seen = {}
    blocks[0].register_forward_hook(lambda mod, args, out: seen.update(inp=args[0], out=out))
    m.eval()
    x, t, y = inputs()
    out = m(x, t, y=y)
    assert out.shape == x.shape
    assert seen["inp"].shape == (2, 64, 12, 12)
    assert torch.equal(seen["out"], seen["inp"])     # zero-initialised fusion -> identity
    # the transformer branch itself is not trivial and keeps the shape
    z = torch.randn(2, 64, 12, 12)
    tr = blocks[0].transformer(z)
    assert tr.shape == z.shape and not torch.allclose(tr, z)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_eval_determinism_and_no_global_rng(name):
    m = tiny(name).eval()
    x, t, y = inputs()
    state = torch.get_rng_state()
    a = m(x, t, y=y)
    b = m(x, t, y=y)
    assert torch.equal(state, torch.get_rng_state())
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["hae", "hae_v2"])
def test_use_checkpoint_same_outputs_and_grads(name):
    x, t, y = inputs()
    results = []
    for ckpt in (False, True):
        m = tiny(name, seed=3, use_checkpoint=ckpt)
        perturb(m).train()
        torch.manual_seed(11)
        out = m(x, t, y=y, threshold=0.0)
        out.square().mean().backward()
        grads = [p.grad.clone() for p in m.hybrid_blocks()[0].parameters()]
        assert sum(float(g.abs().sum()) for g in grads) > 0
        results.append((out.detach(), grads))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-6, rtol=1e-5)
    for g0, g1 in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(g0, g1, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("num_classes", [None, 2])
def test_backward_with_and_without_labels(num_classes):
    m = perturb(tiny("hae_v2", num_classes=num_classes)).train()
    x, t, y = inputs()
    out = m(x, t, y=y if num_classes else None, **({"threshold": 0.1} if num_classes else {}))
    out.square().mean().backward()
    blk = m.hybrid_blocks()[0]
    assert blk.transformer.attn.in_proj_weight.grad is not None
    assert float(blk.transformer.attn.in_proj_weight.grad.abs().sum()) > 0
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_autocast_finite(name, dtype):
    m = perturb(tiny(name)).eval()
    x, t, y = inputs()
    with torch.autocast("cpu", dtype=dtype):
        out = m(x, t, y=y)
        z = torch.randn(2, 64, 12, 12)
        blk_out = m.hybrid_blocks()[0](z, torch.randn(2, 128))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert torch.isfinite(blk_out).all()


def test_other_input_sides_and_bottleneck_validation():
    m = tiny("hae_v2").eval()
    for side in (8, 16, 40):
        x, t, y = inputs(side=side)
        assert m(x, t, y=y).shape == x.shape
    for bad in (0, -0.5, 1.5, float("nan")):
        with pytest.raises(ValueError, match="bottleneck_ratio"):
            HAEUNetModelV2(**{**TINY, "num_classes": None}, bottleneck_ratio=bad)
    assert BottleneckMLP(64, 0.25).fc1.out_features == 16
    assert MultiScaleSparseTransformerBlockV2(64, 1.0).mlp.hidden == 64
    assert MultiScaleSparseTransformerBlockLite(64).mlp.hidden == 256
    assert MultiScaleSparseTransformerBlock(64).mlp.hidden == 256
    assert isinstance(m.hybrid_blocks()[0], HybridCNNTransformerBlockBase)
