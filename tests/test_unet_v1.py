"""The guided-diffusion UNet ``unet_ver v1`` (guided_diffusion/unet_v1.py): upstream key names, shapes."""

import pytest
import torch

from guided_diffusion.script_util import MODEL_REGISTRY, create_model, model_config
from guided_diffusion.unet_v1 import AttentionBlockV1, ResBlockV1, UNetV1


def _tiny(**kw) -> UNetV1:
    args = dict(image_size=16, in_channels=2, model_channels=8, out_channels=2, num_res_blocks=1,
                attention_resolutions={2}, channel_mult=(1, 2), num_heads=2, use_scale_shift_norm=True)
    args.update(kw)
    return UNetV1(**args)


def _randomise(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def test_registered_and_built_from_flags_with_learn_sigma():
    assert "v1" in MODEL_REGISTRY
    model = create_model(image_size=16, num_channels=8, num_res_blocks=1, channel_mult="1,2",
                         attention_resolutions="8", in_channels=3, learn_sigma=True, unet_ver="v1",
                         resblock_updown=True, use_new_attention_order=True, num_heads=2)
    assert isinstance(model, UNetV1) and model.out_channels == 6
    out = model(torch.randn(2, 3, 16, 16), torch.tensor([3, 7]))
    assert out.shape == (2, 6, 16, 16)
    cfg = model_config(dict(unet_ver="v1", image_size=16, channel_mult="1,2", attention_resolutions="8",
                            resblock_updown=True))
    assert cfg["resblock_updown"] is True and "use_hae" not in cfg


def test_upstream_key_names_with_resblock_updown():
    keys = set(_tiny(num_classes=2, resblock_updown=True).state_dict())
    expected = {
        "time_embed.0.weight", "time_embed.2.weight", "label_emb.weight", "input_blocks.0.0.weight",
        "input_blocks.1.0.in_layers.0.weight", "input_blocks.1.0.in_layers.2.weight",
        "input_blocks.1.0.emb_layers.1.weight", "input_blocks.1.0.out_layers.3.weight",
        "input_blocks.2.0.in_layers.2.weight",  # the down-sampling ResBlock
        "input_blocks.3.0.skip_connection.weight", "input_blocks.3.1.qkv.weight",
        "input_blocks.3.1.proj_out.weight", "input_blocks.3.1.norm.weight",
        "middle_block.0.in_layers.2.weight", "middle_block.1.qkv.weight",
        "middle_block.2.out_layers.3.weight",
        "output_blocks.1.2.in_layers.2.weight",  # the up-sampling ResBlock
        "output_blocks.3.0.skip_connection.weight", "out.0.weight", "out.2.weight", "out.2.bias",
    }
    assert expected <= keys, sorted(expected - keys)
    assert not any("encoder_kv" in k or "class_emb" in k or ".op." in k for k in keys)
    assert not any(k.startswith("output_blocks.1.2.conv") for k in keys)


def test_plain_resampling_keys_and_unconditional():
    keys = set(_tiny().state_dict())
    assert {"input_blocks.2.0.op.weight", "output_blocks.1.2.conv.weight"} <= keys
    assert "label_emb.weight" not in keys
    assert _tiny(num_classes=3).state_dict()["label_emb.weight"].shape == (3, 32)


def test_forward_shapes_and_conditioning():
    model = _tiny(num_classes=2, resblock_updown=True, out_channels=4)
    _randomise(model)
    x, t = torch.randn(3, 2, 16, 16), torch.tensor([1, 5, 9])
    a = model(x, t, y=torch.tensor([0, 0, 1]))
    b = model(x, t, y=torch.tensor([1, 0, 1]))
    assert a.shape == (3, 4, 16, 16)
    assert not torch.allclose(a[0], b[0]) and torch.allclose(a[1:], b[1:], atol=1e-6)
    with pytest.raises(ValueError, match="class-conditional"):
        model(x, t)
    with pytest.raises(ValueError, match="unconditional"):
        _tiny()(x, t, y=torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match="valid labels 0..1"):
        model(x, t, y=torch.tensor([0, 2, 1]))
    with pytest.raises(ValueError, match="no classifier-free null condition"):
        model(x, t, y=torch.tensor([0, 0, 1]), null=True)
    with pytest.raises(ValueError, match="no classifier-free null condition"):
        model(x, t, y=torch.tensor([0, 0, 1]), threshold=0.1)
    assert torch.equal(model(x, t, y=torch.tensor([0, 0, 1]), threshold=-1.0), a)  # upstream's "off"


def test_strict_state_dict_round_trip():
    src = _tiny(num_classes=2, resblock_updown=True)
    _randomise(src, 1)
    dst = _tiny(num_classes=2, resblock_updown=True)
    dst.load_state_dict(src.state_dict(), strict=True)
    x, t, y = torch.randn(2, 2, 16, 16), torch.tensor([2, 4]), torch.tensor([0, 1])
    assert torch.equal(src(x, t, y=y), dst(x, t, y=y))
    with pytest.raises(RuntimeError):
        _tiny(num_classes=2).load_state_dict(src.state_dict(), strict=True)


def test_resblock_updown_resamples():
    up = ResBlockV1(8, 32, 0.0, up=True)
    down = ResBlockV1(8, 32, 0.0, out_channels=16, down=True, use_scale_shift_norm=True)
    x, emb = torch.randn(2, 8, 8, 8), torch.randn(2, 32)
    assert up(x, emb).shape == (2, 8, 16, 16)
    assert down(x, emb).shape == (2, 16, 4, 4)


def test_new_attention_order_same_keys_differs_only_with_several_heads():
    x = torch.randn(2, 8, 4, 4)
    for heads, same in ((1, True), (2, False)):
        legacy = AttentionBlockV1(8, num_heads=heads)
        _randomise(legacy, 2)
        new = AttentionBlockV1(8, num_heads=heads, new_order=True)
        new.load_state_dict(legacy.state_dict(), strict=True)
        assert torch.allclose(legacy(x), new(x), atol=1e-5) == same


def test_forward_reads_no_device_values():
    """On an accelerator the label and null checks are not read back (issue 11): the whole call runs on
    the data-less ``meta`` device, where any host read of a value raises. On the host they still run
    (test_forward_shapes_and_conditioning)."""
    model = _tiny(num_classes=2).to("meta")
    x, t = torch.zeros(3, 2, 16, 16, device="meta"), torch.zeros(3, dtype=torch.long, device="meta")
    y, null = torch.zeros(3, dtype=torch.long, device="meta"), torch.zeros(3, dtype=torch.bool, device="meta")
    out = model(x, t, y=y, null=null)
    assert out.device.type == "meta" and out.shape == (3, 2, 16, 16)
