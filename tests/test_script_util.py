"""Tests for guided_diffusion.script_util: defaults, registry, factories, argparse helpers."""

from __future__ import annotations

import argparse
import warnings

import pytest
import torch

from guided_diffusion import script_util as su
from guided_diffusion.unet import UNetModel

SPEC_FLAGS = {
    "image_size": 64, "num_channels": 128, "num_res_blocks": 2, "num_heads": 4, "num_heads_upsample": -1,
    "num_head_channels": -1, "attention_resolutions": "16,8", "channel_mult": "", "dropout": 0.0,
    "class_cond": False, "use_checkpoint": False, "use_scale_shift_norm": True, "resblock_updown": False,
    "use_fp16": False, "use_new_attention_order": False, "in_channels": 3, "num_classes": 2,
    "unet_ver": "v2", "clf_free": True, "learn_sigma": False, "diffusion_steps": 1000,
    "noise_schedule": "linear", "timestep_respacing": "", "use_kl": False, "predict_xstart": False,
    "rescale_timesteps": False, "rescale_learned_sigmas": False, "bottleneck_ratio": 0.25, "use_hae": True,
}

BRATS_FLAGS = dict(
    image_size=128, num_channels=128, num_res_blocks=2, attention_resolutions="32,16,8", num_heads=4,
    use_scale_shift_norm=True, dropout=0.1, class_cond=True, num_classes=2, in_channels=4,
)


def tiny_flags(**overrides):
    flags = dict(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2",
                 attention_resolutions="8", num_heads=2, in_channels=3)
    flags.update(overrides)
    return flags


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_defaults_cover_spec_flags():
    d = su.model_and_diffusion_defaults()
    assert d == SPEC_FLAGS
    assert set(su.diffusion_defaults()) <= set(d)


def test_parse_channel_mult_and_attention_factors():
    assert su.parse_channel_mult(128, "") == (1, 1, 2, 3, 4)
    assert su.parse_channel_mult(64, "") == (1, 2, 3, 4)
    assert su.parse_channel_mult(32, "") == (1, 2, 2, 2)
    assert su.parse_channel_mult(256, "") == (1, 1, 2, 2, 4, 4)
    assert su.parse_channel_mult(512, "") == (0.5, 1, 1, 2, 2, 4, 4)
    assert su.parse_channel_mult(128, "1,2,4") == (1, 2, 4)
    assert su.parse_channel_mult(128, (1, 2)) == (1, 2)
    with pytest.raises(ValueError, match="channel_mult"):
        su.parse_channel_mult(96, "")
    with pytest.raises(ValueError, match="channel_mult"):
        su.parse_channel_mult(64, "1,x")
    assert su.attention_downsample_factors(128, "32,16,8") == {4, 8, 16}
    assert su.attention_downsample_factors(64, "16,8") == {4, 8}
    with pytest.raises(ValueError, match="attention_resolutions"):
        su.attention_downsample_factors(64, "12")


def test_create_model_full_configs_on_meta():
    with torch.device("meta"):
        brats = su.create_model(**BRATS_FLAGS)
        atlas = su.create_model(**{**BRATS_FLAGS, "in_channels": 1})
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            compare = su.create_model(**{**BRATS_FLAGS, "channel_mult": "1,2,4,8", "num_heads": 8,
                                         "use_scale_shift_norm": False, "class_cond": False})
    assert n_params(brats) == 103_082_500
    assert n_params(atlas) == 103_075_585
    assert n_params(compare) == 261_375_492
    assert any("attention_resolutions 8" in str(w.message) for w in caught)  # ds 16 unreachable: ignored
    assert isinstance(brats, UNetModel) and brats.num_classes == 2 and compare.num_classes is None
    assert brats.attention_resolutions == {4, 8, 16} and brats.channel_mult == (1, 1, 2, 3, 4)
    assert isinstance(brats.out[1], torch.nn.Identity)  # FPDM: no SiLU in the head


@pytest.mark.parametrize("in_channels", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("learn_sigma", [False, True])
def test_out_channels_any_in_channels(in_channels, learn_sigma):
    model = su.create_model(**tiny_flags(in_channels=in_channels, learn_sigma=learn_sigma))
    assert model.out_channels == in_channels * (2 if learn_sigma else 1)
    out = model(torch.randn(1, in_channels, 8, 8), torch.tensor([3]))
    assert out.shape == (1, model.out_channels, 8, 8)


def test_num_classes_resolution():
    assert su.create_model(**tiny_flags(class_cond=False, num_classes=2)).num_classes is None
    assert su.create_model(**tiny_flags(class_cond=True, num_classes=0)).num_classes is None
    assert su.create_model(**tiny_flags(class_cond=True, num_classes=3)).num_classes == 3


def test_create_model_unsupported_flags():
    with pytest.raises(ValueError, match="resblock_updown"):
        su.create_model(**tiny_flags(resblock_updown=True))
    with pytest.raises(ValueError, match="use_new_attention_order"):
        su.create_model(**tiny_flags(use_new_attention_order=True))
    with pytest.raises(ValueError, match="clf_free"):
        su.create_model(**tiny_flags(class_cond=True, clf_free=False))
    su.create_model(**tiny_flags(class_cond=False, clf_free=False))  # no classes: nothing to build
    with pytest.raises(ValueError, match="in_channels"):
        su.create_model(**tiny_flags(in_channels=0))


def test_registry_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as err:
        su.create_model(**tiny_flags(unet_ver="nope"))
    msg = str(err.value)
    assert "nope" in msg
    for name in su.MODEL_REGISTRY:
        assert name in msg
    assert "v2" in su.MODEL_REGISTRY


def test_register_model_decorator():
    name = "_test_only_model"
    try:
        @su.register_model(name)
        def build(**kwargs):
            return torch.nn.Linear(kwargs["in_channels"], kwargs["out_channels"])

        model = su.create_model(**tiny_flags(unet_ver=name, in_channels=2))
        assert isinstance(model, torch.nn.Linear) and model.out_features == 2
        with pytest.raises(ValueError, match="already registered"):
            @su.register_model(name)
            def other(**kwargs):  # pragma: no cover - never called
                return None
    finally:
        su.MODEL_REGISTRY.pop(name, None)


def test_argparser_roundtrip_and_str2bool():
    parser = argparse.ArgumentParser()
    extra = {"model_num": None, "steps": (1, 2)}
    su.add_dict_to_argparser(parser, {**su.model_and_diffusion_defaults(), **extra})
    args = parser.parse_args(["--class_cond", "yes", "--num_classes", "3", "--use_fp16", "0",
                              "--model_num", "10", "--steps", "4", "5", "6", "--dropout", "0.1"])
    assert args.class_cond is True and args.use_fp16 is False and args.num_classes == 3
    assert args.model_num == "10" and args.steps == [4, 5, 6] and args.dropout == 0.1
    d = su.args_to_dict(args, su.model_and_diffusion_defaults().keys())
    assert set(d) == set(SPEC_FLAGS) and d["class_cond"] is True
    with pytest.raises(ValueError, match="missing_flag"):
        su.args_to_dict(args, ["missing_flag"])
    for text in ("True", "t", "Y", "1", "yes"):
        assert su.str2bool(text) is True
    for text in ("False", "f", "N", "0", "no"):
        assert su.str2bool(text) is False
    with pytest.raises(argparse.ArgumentTypeError, match="maybe"):
        su.str2bool("maybe")
    with pytest.raises(SystemExit):
        parser.parse_args(["--class_cond", "maybe"])


def test_model_config_resolves_equivalent_spellings():
    base = {**su.model_and_diffusion_defaults(), **BRATS_FLAGS}
    cfg = su.model_config(base)
    assert cfg["channel_mult"] == [1, 1, 2, 3, 4]
    assert cfg["attention_resolutions"] == [4, 8, 16]
    assert cfg["num_classes"] == 2 and cfg["num_heads_upsample"] == 4
    assert "dropout" not in cfg and "use_checkpoint" not in cfg
    assert su.model_config({**base, "channel_mult": "1,1,2,3,4", "dropout": 0.3}) == cfg
    assert su.model_config(vars(argparse.Namespace(**base))) == cfg
    assert su.model_config({**base, "in_channels": 1}) != cfg
    assert su.model_config({**base, "class_cond": False})["num_classes"] is None


def test_create_model_and_diffusion():
    model, diffusion = su.create_model_and_diffusion(**tiny_flags(timestep_respacing="10", class_cond=True))
    assert isinstance(model, UNetModel) and model.num_classes == 2
    assert diffusion.num_timesteps == 10
    with pytest.raises(ValueError, match="bogus"):
        su.create_model_and_diffusion(bogus=1)
