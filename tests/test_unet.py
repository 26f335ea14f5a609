"""Tests for guided_diffusion.nn and guided_diffusion.unet (FPDM UNet v2 and the shared skeleton)."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from guided_diffusion.nn import GroupNorm32, normalization, timestep_embedding
from guided_diffusion.unet import (
    AttentionBlock,
    ResBlock,
    TimestepBlock,
    TimestepEmbedSequential,
    UNetModel,
    Upsample,
)

SPEC = Path(__file__).resolve().parent / "fixtures"  # state-dict key listings of upstream-built FPDM UNets

FULL_CONFIGS = {
    # the first line of each key list gives these; attention "32,16,8" at 128 px -> ds {4, 8, 16}
    "brats_train": dict(
        image_size=128, in_channels=4, model_channels=128, out_channels=4, num_res_blocks=2,
        attention_resolutions={4, 8, 16}, dropout=0.1, channel_mult=(1, 1, 2, 3, 4), num_classes=2,
        num_heads=4, use_scale_shift_norm=True,
    ),
    "compare": dict(
        image_size=128, in_channels=4, model_channels=128, out_channels=4, num_res_blocks=2,
        attention_resolutions={4, 8, 16}, dropout=0.1, channel_mult=(1, 2, 4, 8), num_classes=None,
        num_heads=8, use_scale_shift_norm=False,
    ),
}
EXPECTED_PARAMS = {"brats_train": 103_082_500, "compare": 261_375_492}


def read_key_list(name: str) -> tuple[dict[str, tuple[int, ...]], int]:
    path = SPEC / f"fpdm_unet_v2_state_dict_{name}.txt"
    keys: dict[str, tuple[int, ...]] = {}
    total = -1
    for line in path.read_text().splitlines():
        if line.startswith("# total parameters:"):
            total = int(line.split(":")[1])
        if line.startswith("#") or not line.strip():
            continue
        key, shape = line.split("\t")
        keys[key] = tuple(ast.literal_eval(shape))
    return keys, total


def tiny(**overrides) -> UNetModel:
    cfg = dict(
        image_size=16, in_channels=3, model_channels=32, out_channels=3, num_res_blocks=1,
        attention_resolutions={2}, channel_mult=(1, 2), num_classes=2, num_heads=2,
        use_scale_shift_norm=True, dropout=0.0,
    )
    cfg.update(overrides)
    return UNetModel(**cfg)


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights everywhere (the zero-initialised convs would otherwise hide most of the network)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def inputs(batch: int = 2, side: int = 8, ch: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, ch, side, side, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    return x, t


# ---------------------------------------------------------------- full configs (meta device only)


@pytest.mark.parametrize("name", ["brats_train", "compare"])
def test_full_config_param_count_and_strict_load(name):
    ref, total = read_key_list(name)
    with torch.device("meta"):
        model = UNetModel(**FULL_CONFIGS[name])
    n = sum(p.numel() for p in model.parameters())
    assert n == EXPECTED_PARAMS[name] == total
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert list(got) == list(ref)
    assert got == ref
    with torch.device("meta"):
        sd = {k: torch.zeros(shape) for k, shape in ref.items()}
    result = model.load_state_dict(sd, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_encoder_kv_exists_without_classes():
    model = tiny(num_classes=None)
    blocks = [m for m in model.modules() if isinstance(m, AttentionBlock)]
    assert blocks and all(b.encoder_kv is not None for b in blocks)
    assert blocks[0].encoder_kv.weight.shape == (2 * blocks[0].channels, 4 * 32, 1)
    assert not hasattr(model, "label_emb") and not hasattr(model, "class_emb")


# ---------------------------------------------------------------- nn helpers


def test_timestep_embedding_formula():
    t = torch.tensor([0, 7, 999])
    emb = timestep_embedding(t, 16)
    assert emb.shape == (3, 16)
    i = 3
    freq = math.exp(-math.log(10000) * i / 8)
    assert emb[1, i].item() == pytest.approx(math.cos(7 * freq), abs=1e-6)
    assert emb[1, 8 + i].item() == pytest.approx(math.sin(7 * freq), abs=1e-6)
    assert torch.equal(emb[0, :8], torch.ones(8)) and torch.equal(emb[0, 8:], torch.zeros(8))
    odd = timestep_embedding(t, 7)
    assert odd.shape == (3, 7) and torch.all(odd[:, -1] == 0)


def test_groupnorm32_fp32_compute_and_dtype():
    norm = normalization(64)
    assert isinstance(norm, GroupNorm32) and norm.num_groups == 32
    x = torch.randn(2, 64, 4, 4) * 100 + 1000
    out = norm(x.bfloat16())
    assert out.dtype == torch.bfloat16
    ref = F.group_norm(x.bfloat16().float(), 32)
    assert torch.allclose(out.float(), ref, atol=2e-2)
    assert normalization(16).num_groups == 16


# ---------------------------------------------------------------- blocks vs explicit references


def reference_attention(blk: AttentionBlock, x: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
    """Upstream computation: outer product c⊗c through the Conv1d, legacy heads, manual softmax."""
    b, ch, *spatial = x.shape
    heads = blk.num_heads
    d = ch // heads
    xf = x.reshape(b, ch, -1)
    qkv = blk.qkv(blk.norm(xf))
    q, k, v = qkv.reshape(b * heads, 3 * d, -1).split(d, dim=1)
    if c is not None:
        outer = c[:, :, None] * c[:, None, :]  # [B, E, E]: E channels x E tokens
        ekv = F.conv1d(outer, blk.encoder_kv.weight, blk.encoder_kv.bias)
        ek, ev = ekv.reshape(b * heads, 2 * d, -1).split(d, dim=1)
        k = torch.cat([ek, k], dim=-1)
        v = torch.cat([ev, v], dim=-1)
    scale = 1 / math.sqrt(math.sqrt(d))
    w = torch.einsum("bct,bcs->bts", q * scale, k * scale)
    w = torch.softmax(w.float(), dim=-1).type(w.dtype)
    a = torch.einsum("bts,bcs->bct", w, v).reshape(b, ch, -1)
    return (xf + blk.proj_out(a)).reshape(b, ch, *spatial)


@pytest.mark.parametrize("with_cond", [True, False])
def test_attention_matches_explicit_reference(with_cond):
    torch.manual_seed(0)
    blk = randomize(AttentionBlock(32, num_heads=4, encoder_channels=64))
    x = torch.randn(3, 32, 4, 4)
    c = torch.randn(3, 64) if with_cond else None
    if with_cond:
        c[1] = 0  # a null row: condition tokens are just the bias
    with torch.no_grad():
        out = blk(x, c)
        ref = reference_attention(blk, x, c)
    assert out.shape == x.shape
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, x, atol=1e-3)  # the attention path contributes


@pytest.mark.parametrize("activation", [False, True])
@pytest.mark.parametrize("scale_shift", [True, False])
def test_resblock_matches_reference(activation, scale_shift):
    blk = randomize(ResBlock(32, 64, 0.0, out_channels=64, use_scale_shift_norm=scale_shift,
                             use_activation=activation))
    x, emb = torch.randn(2, 32, 4, 4), torch.randn(2, 64)
    act = F.silu if activation else (lambda z: z)
    h = blk.in_layers[2](act(blk.in_layers[0](x)))
    e = blk.emb_layers[1](F.silu(emb))[:, :, None, None]
    if scale_shift:
        scale, shift = e.chunk(2, dim=1)
        h = F.silu(blk.out_layers[0](h) * (1 + scale) + shift)
    else:
        h = act(blk.out_layers[0](h + e))
    ref = blk.skip_connection(x) + blk.out_layers[3](h)
    with torch.no_grad():
        assert torch.allclose(blk(x, emb), ref, atol=1e-5)
    assert isinstance(blk.in_layers[1], nn.SiLU if activation else nn.Identity)


def test_fpdm_missing_activation_quirk_in_modules():
    fpdm, hae = tiny(resblock_activation=False), tiny(resblock_activation=True)
    assert isinstance(fpdm.out[1], nn.Identity) and isinstance(hae.out[1], nn.SiLU)
    assert isinstance(fpdm.input_blocks[1][0].in_layers[1], nn.Identity)
    assert isinstance(fpdm.input_blocks[1][0].out_layers[1], nn.SiLU)  # scale-shift norm keeps this one
    assert isinstance(tiny(use_scale_shift_norm=False).input_blocks[1][0].out_layers[1], nn.Identity)


# ---------------------------------------------------------------- UNet forward, conditioning


def test_per_sample_null_equals_separate_calls():
    model = randomize(tiny())
    x, t = inputs(2)
    y = torch.tensor([1, 0])
    with torch.no_grad():
        cond = model(x, t, y=y)
        unc = model(x, t, null=True)
        unc_y = model(x, t, y=y, null=True)
        both = model(torch.cat([x, x]), torch.cat([t, t]), y=torch.cat([y, y]),
                     null=torch.tensor([False, False, True, True]))
    assert cond.shape == (2, 3, 8, 8)
    assert torch.allclose(both[:2], cond, atol=1e-5)
    assert torch.allclose(both[2:], unc, atol=1e-5)
    assert torch.equal(unc, unc_y)
    assert not torch.allclose(cond, unc, atol=1e-4)
    assert not torch.allclose(model(x, t, y=1 - y), cond, atol=1e-4)


def test_label_dropout_seeded_and_global_rng_untouched():
    model = randomize(tiny())
    x, t = inputs(6)
    y = torch.ones(6, dtype=torch.long)
    state = torch.get_rng_state()
    with torch.no_grad():
        a = model(x, t, y=y, threshold=0.5, generator=torch.Generator().manual_seed(3))
        b = model(x, t, y=y, threshold=0.5, generator=torch.Generator().manual_seed(3))
        cond = model(x, t, y=y)
        unc = model(x, t, null=True)
        all_dropped = model(x, t, y=y, threshold=1.0, generator=torch.Generator())
        sentinel = model(x, t, y=y, threshold=-1)  # upstream's "no dropout" sentinel, draws nothing
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(sentinel, cond)
    assert torch.equal(a, b)
    u = torch.rand(6, generator=torch.Generator().manual_seed(3))
    for i in range(6):
        expect = unc[i] if u[i] < 0.5 else cond[i]
        assert torch.allclose(a[i], expect, atol=1e-5)
    assert torch.allclose(all_dropped, unc, atol=1e-5)


def test_eval_determinism_and_train_dropout():
    model = randomize(tiny(dropout=0.5))
    x, t = inputs(2)
    y = torch.tensor([0, 1])
    with torch.no_grad():
        assert torch.equal(model(x, t, y=y), model(x, t, y=y))
        model.train()
        assert not torch.equal(model(x, t, y=y), model(x, t, y=y))


def test_unconditional_model():
    model = randomize(tiny(num_classes=None))
    x, t = inputs(2)
    with torch.no_grad():
        out = model(x, t)
        assert torch.equal(model(x, t, null=True), out)
        assert not torch.allclose(model(x, t + 100), out, atol=1e-4)
    assert out.shape == (2, 3, 8, 8) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="unconditional"):
        model(x, t, y=torch.tensor([0, 1]))


def test_three_class_model():
    model = randomize(tiny(num_classes=3))
    x, t = inputs(1)
    with torch.no_grad():
        outs = [model(x, t, y=torch.tensor([k])) for k in range(3)]
    assert model.label_emb.weight.shape == (3, 32)
    assert not torch.allclose(outs[0], outs[2], atol=1e-4) and not torch.allclose(outs[1], outs[2], atol=1e-4)
    with pytest.raises(ValueError, match="num_classes=3"):
        model(x, t, y=torch.tensor([3]))


def test_forward_errors():
    model = tiny()
    x, t = inputs(2)
    with pytest.raises(ValueError, match=r"\by\b"):
        model(x, t)
    with pytest.raises(ValueError, match=r"\by\b"):
        model(x, t, null=torch.tensor([True, False]))
    with pytest.raises(ValueError, match="num_classes=2"):
        model(x, t, y=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="num_classes=2"):
        model(x, t, y=torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match="multiple of 2"):
        model(torch.randn(2, 3, 7, 8), t, y=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="multiple of 16"):
        tiny(channel_mult=(1, 1, 1, 1, 1))(torch.randn(1, 3, 24, 24), t[:1], null=True)
    with pytest.raises(ValueError, match=r"tensor x has 4 channels.*in_channels=3"):
        model(torch.randn(2, 4, 8, 8), t, null=True)
    with pytest.raises(ValueError, match="threshold"):
        model(x, t, y=torch.tensor([0, 1]), threshold=1.5)
    with pytest.raises(ValueError, match="null"):
        model(x, t, y=torch.tensor([0, 1]), null=torch.tensor([True, False, True]))
    with pytest.raises(ValueError, match="timesteps"):
        model(x, t[:1].repeat(3), null=True)


def test_use_checkpoint_same_output_and_grads(monkeypatch):
    import torch.utils.checkpoint as tuc

    calls = []
    real = tuc.checkpoint

    def counting(*args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return real(*args, **kwargs)

    monkeypatch.setattr(tuc, "checkpoint", counting)
    plain = randomize(tiny(dropout=0.2)).train()
    ckpt = tiny(dropout=0.2, use_checkpoint=True).train()
    ckpt.load_state_dict(plain.state_dict())
    x, t = inputs(2)
    y = torch.tensor([0, 1])
    results = []
    for model in (plain, ckpt):
        torch.manual_seed(5)
        out = model(x, t, y=y)
        out.square().mean().backward()
        results.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    (o1, g1), (o2, g2) = results
    assert torch.allclose(o1, o2, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(g1, g2))
    assert any(g.abs().sum() > 0 for g in g1)
    n_blocks = sum(isinstance(m, (ResBlock, AttentionBlock)) for m in ckpt.modules())
    assert calls == [False] * n_blocks  # only the checkpointed model, every block, non-reentrant


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_forward_finite(dtype):
    model = randomize(tiny())
    x, t = inputs(2)
    with torch.no_grad():
        ref = model(x, t, y=torch.tensor([0, 1]))
        with torch.autocast("cpu", dtype=dtype):
            out = model(x, t, y=torch.tensor([0, 1]))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert torch.allclose(out, ref, atol=0.1 * ref.abs().max().item())


# ---------------------------------------------------------------- decoder_block hook


class Marker(TimestepBlock):
    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.calls = 0

    def forward(self, x, emb):
        assert x.shape[1] == self.channels and emb.shape[1] == 4 * 32
        self.calls += 1
        return x + 1.0


def test_decoder_block_hook_placement():
    made: list[tuple[int, int]] = []

    def factory(ch: int, level: int):
        made.append((ch, level))
        return Marker(ch) if level != 2 else None

    model = tiny(channel_mult=(1, 2, 3), decoder_block=factory, num_classes=None)
    assert made == [(96, 2), (64, 1)]
    ups = [(i, blk) for i, blk in enumerate(model.output_blocks) if isinstance(blk[-1], Upsample)]
    assert len(ups) == 2
    assert not any(isinstance(m, Marker) for m in ups[0][1])
    assert isinstance(ups[1][1][-2], Marker) and ups[1][1][-2].channels == 64
    assert sum(isinstance(m, Marker) for m in model.modules()) == 1
    x, t = inputs(1)
    model(x, t)
    assert ups[1][1][-2].calls == 1


def test_decoder_block_must_be_timestep_block():
    with pytest.raises(ValueError, match="TimestepBlock"):
        tiny(decoder_block=lambda ch, level: nn.Conv2d(ch, ch, 1))


def test_timestep_embed_sequential_routing():
    seq = TimestepEmbedSequential(Marker(32), nn.Identity(), AttentionBlock(32, encoder_channels=128))
    out = seq(torch.zeros(1, 32, 2, 2), torch.zeros(1, 128), torch.zeros(1, 128))
    assert torch.allclose(out, torch.ones(1, 32, 2, 2))  # proj_out is zero-initialised


def test_attention_channels_first_matches_sdpa_on_cpu_and_runs_contiguous_elsewhere():
    """On the CPU: bit for bit the strided call the blocks made before (pinned results stay); on another
    device (meta here) the inputs reach SDPA contiguous in [B, heads, T, d], the layout fused kernels take."""
    import torch.nn.functional as F

    from guided_diffusion.nn import attention_channels_first

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 8, 24, generator=g) for _ in range(3))  # [B, heads, d, T]
    want = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
    assert torch.equal(attention_channels_first(q, k, v), want)
    seen = []
    real = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append([a.is_contiguous() for a in args[:3]])
        return real(*args, **kwargs)

    F.scaled_dot_product_attention = spy
    try:
        out = attention_channels_first(*(z.to("meta") for z in (q, k, v)))
    finally:
        F.scaled_dot_product_attention = real
    assert out.shape == (2, 4, 24, 8) and seen == [[True, True, True]]
