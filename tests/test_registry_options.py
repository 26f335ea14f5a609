"""A variant owns its options: declared by its builder, handed to it alone, refused for another variant.

Also: the three HAE variants are built one way (subclassing the parent's classes) and give the same
networks as the block composition they replaced; older records (run files, resumes, exports) that list
another variant's option still load; a toy variant with an option of its own needs only its module.
"""

from __future__ import annotations

import ast
import functools
import importlib
import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from guided_diffusion import registry
from guided_diffusion import script_util as su
from guided_diffusion.cli import run_cli
from guided_diffusion.configs import base as cf
from guided_diffusion.configs import config_flags as cfl
from guided_diffusion.export.export import flags_from_config
from guided_diffusion.export.export_load import config_differences as export_differences
from guided_diffusion.hae_blocks import (
    HAEUNetBase,
    HybridCNNTransformerBlockBase,
    MultiScaleSparseTransformerBlockBase,
    TokenMLP,
)
from guided_diffusion.training.train_resume import config_differences as resume_differences
from guided_diffusion.training.training_flags import parse_configs_for_training
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

REPO = Path(__file__).resolve().parents[1]


def tiny_flags(**overrides):
    flags = dict(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2",
                 attention_resolutions="8", num_heads=2, in_channels=3)
    flags.update(overrides)
    return flags


def _state_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------------------- declarations


def test_each_variant_declares_its_own_options():
    assert registry.variant_options("v2") == {}
    assert registry.variant_options("v1") == {"resblock_updown": False, "use_new_attention_order": False}
    assert registry.variant_options("hae") == {"use_hae": True}
    assert registry.variant_options("hae_lite") == {"use_hae": True}
    assert list(registry.variant_options("hae_v2").items()) == [("use_hae", True), ("bottleneck_ratio", 0.25)]
    assert registry.option_owners("use_hae") == ["hae", "hae_lite", "hae_v2"]
    assert registry.option_owners("bottleneck_ratio") == ["hae_v2"]


def test_flag_defaults_agree_with_the_declared_defaults():
    defaults = su.model_and_diffusion_defaults()
    for option, default in registry.all_options().items():
        assert defaults[option] == default, option
    model_fields = cf.ModelConfig().to_dict()
    for option in ("use_hae", "bottleneck_ratio"):
        assert model_fields[option] == registry.all_options()[option]


def test_script_util_has_no_branch_on_a_variant_name():
    tree = ast.parse((REPO / "guided_diffusion" / "script_util.py").read_text())
    names = {"v1", "hae", "hae_lite", "hae_v2"}
    literals = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    assert not names & literals
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            text = " ".join(ast.unparse(s) for s in sides)
            assert "unet_ver" not in text, ast.unparse(node)


def test_registration_needs_a_default_and_one_default_per_option():
    with pytest.raises(ValueError, match="'gain' of its builder needs a default"):
        @registry.register_model("_no_default")
        def build(*, gain, **kwargs):  # pragma: no cover - never called
            return None
    with pytest.raises(ValueError, match="'use_hae' defaults to False.*'hae' declares it with default True"):
        @registry.register_model("_other_default")
        def build2(*, use_hae: bool = False, **kwargs):  # pragma: no cover - never called
            return None
    assert "_no_default" not in registry.MODEL_REGISTRY and "_other_default" not in registry.MODEL_REGISTRY


# ---------------------------------------------------------------------------------------- refusal


@pytest.mark.parametrize("unet_ver, option, value, line", [
    ("v2", "bottleneck_ratio", 0.5, "--bottleneck_ratio is an option of hae_v2, not of v2"),
    ("hae", "bottleneck_ratio", 0.5, "--bottleneck_ratio is an option of hae_v2, not of hae"),
    ("hae_lite", "bottleneck_ratio", 1.0, "--bottleneck_ratio is an option of hae_v2, not of hae_lite"),
    ("v1", "use_hae", False, "--use_hae is an option of hae, hae_lite, hae_v2, not of v1"),
    ("v2", "use_hae", False, "--use_hae is an option of hae, hae_lite, hae_v2, not of v2"),
    ("hae_v2", "resblock_updown", True, "--resblock_updown is an option of v1, not of hae_v2"),
    ("v2", "use_new_attention_order", True, "--use_new_attention_order is an option of v1, not of v2"),
])
def test_an_option_of_another_variant_is_refused_in_one_line(unet_ver, option, value, line):
    with pytest.raises(ValueError) as err:
        su.create_model(**tiny_flags(unet_ver=unet_ver, **{option: value}))
    assert str(err.value) == line


def test_an_option_no_variant_declares_is_refused():
    with pytest.raises(ValueError, match="--gain is not an option of any network variant"):
        su.create_model(**tiny_flags(gain=2.0))


def test_another_variants_option_at_its_default_is_ignored():
    torch.manual_seed(0)
    plain = su.create_model(**tiny_flags(unet_ver="v2"))
    torch.manual_seed(0)
    flagged = su.create_model(**tiny_flags(unet_ver="v2", bottleneck_ratio=0.25, use_hae=True,
                                           resblock_updown=False, use_new_attention_order=False))
    assert _state_equal(plain, flagged)
    su.create_model(**tiny_flags(unet_ver="v1", bottleneck_ratio=None, use_hae=None))  # None: not given
    model, _ = su.create_model_and_diffusion(**tiny_flags(unet_ver="hae_lite"))  # every default passed
    assert isinstance(model, HAEUNetModelLite)


def test_own_options_reach_the_variant():
    model = su.create_model(**tiny_flags(unet_ver="hae_v2", bottleneck_ratio=0.5, use_hae=False))
    assert isinstance(model, HAEUNetModelV2) and model.bottleneck_ratio == 0.5 and not model.use_hae
    n_params = [sum(p.numel() for p in su.create_model(**tiny_flags(unet_ver="v1", resblock_updown=r))
                    .parameters()) for r in (False, True)]
    assert n_params[1] > n_params[0]  # ResBlock up/down-sampling built


def test_refusal_from_the_command_line_is_one_line_and_exit_2(capsys):
    def main(argv: list[str]) -> None:
        m, _, _ = parse_configs_for_training(argv)
        su.create_model(m)

    small = ["--image_size", "16", "--num_channels", "32", "--num_res_blocks", "1", "--channel_mult", "1,2",
             "--attention_resolutions", "8", "--num_heads", "2"]
    assert run_cli(main, [*small, "--unet_ver", "v2", "--bottleneck_ratio", "0.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--bottleneck_ratio is an option of hae_v2, not of v2" in err[0]
    # the same flag at its default, or for its own variant, builds
    assert run_cli(main, [*small, "--unet_ver", "v2", "--bottleneck_ratio", "0.25", "--use_hae", "True"]) == 0
    assert run_cli(main, [*small, "--unet_ver", "hae_v2", "--bottleneck_ratio", "0.5"]) == 0


# -------------------------------------------------------------------------------- one way, same nets


def test_the_hae_variants_subclass_their_parent():
    chains = [(HAEUNetModel, HAEUNetModelLite, HAEUNetModelV2),
              (HybridCNNTransformerBlock, HybridCNNTransformerBlockLite, HybridCNNTransformerBlockV2),
              (MultiScaleSparseTransformerBlock, MultiScaleSparseTransformerBlockLite,
               MultiScaleSparseTransformerBlockV2)]
    for parent, child, grandchild in chains:
        assert child.__bases__ == (parent,) and grandchild.__bases__ == (child,)
    assert "functools" not in (REPO / "guided_diffusion" / "unet_hae_v2.py").read_text()


def _old_block(channels: int, emb_channels: int, dropout: float = 0.0, use_checkpoint: bool = False, *,
               patch_embed: bool, fusion: str, ratio: float | None) -> HybridCNNTransformerBlockBase:
    """The composition the variants used before (MLP, then MSTB, then the hybrid block)."""
    if ratio is None:
        mlp: torch.nn.Module = TokenMLP(channels, 4 * channels, dropout)
    else:
        mlp = BottleneckMLP(channels, ratio, dropout)
    mstb = MultiScaleSparseTransformerBlockBase(channels, mlp, patch_embed=patch_embed,
                                                local_proj=not patch_embed)
    return HybridCNNTransformerBlockBase(channels, emb_channels, mstb, fusion=fusion,
                                         use_checkpoint=use_checkpoint)


@pytest.mark.parametrize("cls, patch_embed, fusion, ratio", [
    (HAEUNetModel, True, "concat", None),
    (HAEUNetModelLite, False, "average", None),
    (HAEUNetModelV2, False, "average", 0.5),
])
def test_same_init_and_output_as_the_old_composition(cls, patch_embed, fusion, ratio):
    kw = dict(image_size=24, in_channels=2, model_channels=32, out_channels=2, num_res_blocks=1,
              attention_resolutions={2}, dropout=0.0, channel_mult=(1, 2), num_heads=2, num_classes=2)
    torch.manual_seed(0)
    old = HAEUNetBase(**kw, hybrid_block=functools.partial(_old_block, patch_embed=patch_embed, fusion=fusion,
                                                           ratio=ratio))
    torch.manual_seed(0)
    new = cls(**kw, **({} if ratio is None else {"bottleneck_ratio": ratio}))
    assert _state_equal(old, new)
    with torch.no_grad():
        for p in new.parameters():  # the zero-initialised fusion convs too
            p.add_(0.01 * torch.randn_like(p))
        old.load_state_dict(new.state_dict())
        x, t, y = torch.randn(2, 2, 24, 24), torch.tensor([3, 9]), torch.tensor([0, 1])
        assert torch.equal(old.eval()(x, t, y=y), new.eval()(x, t, y=y))


# ------------------------------------------------------------------------------------ older records


def test_model_config_lists_only_the_variants_own_options():
    base = tiny_flags(bottleneck_ratio=0.5, use_hae=False, resblock_updown=True)
    assert "use_hae" not in su.model_config({**base, "unet_ver": "v2"})
    assert "bottleneck_ratio" not in su.model_config({**base, "unet_ver": "hae"})
    v2 = su.model_config({**base, "unet_ver": "hae_v2"})
    assert (v2["use_hae"], v2["bottleneck_ratio"]) == (False, 0.5) and "resblock_updown" not in v2


def test_a_run_file_written_the_old_way_loads(tmp_path):
    """A v2 run file that records bottleneck_ratio/use_hae (as ModelConfig always wrote them, here at
    values the network never used) gives the same v2 model; a flag given on top is still judged."""
    small = dict(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2",
                 attention_resolutions="8", num_heads=2)
    path = tmp_path / "config.json"
    model = {**cf.ModelConfig(**small).to_dict(), "bottleneck_ratio": 0.5, "use_hae": False}
    path.write_text(json.dumps({"model": model, "diffusion": cf.DiffusionConfig().to_dict()}))
    parser = argparse_parser()
    _, (m, _) = cfl.parse_configs(parser, ["--config", str(path)], [cf.ModelConfig, cf.DiffusionConfig])
    assert m.unet_ver == "v2" and (m.bottleneck_ratio, m.use_hae) == (0.25, True)
    torch.manual_seed(0)
    loaded = su.create_model(m)
    torch.manual_seed(0)
    assert _state_equal(loaded, su.create_model(cf.ModelConfig(**small)))
    m2, _, _ = parse_configs_for_training(["--config", str(path)])
    assert (m2.unet_ver, m2.bottleneck_ratio, m2.use_hae) == ("v2", 0.25, True)
    # switching the file's network on the command line: the file's hae_v2 options stay its own
    path.write_text(json.dumps({"model": {**model, "unet_ver": "hae_v2"}}))
    _, (m3,) = cfl.parse_configs(argparse_parser(), ["--config", str(path), "--unet_ver", "v2"],
                                 [cf.ModelConfig])
    su.create_model(m3)
    _, (m4,) = cfl.parse_configs(argparse_parser(), ["--config", str(path)], [cf.ModelConfig])
    assert (m4.unet_ver, m4.bottleneck_ratio, m4.use_hae) == ("hae_v2", 0.5, False)
    with pytest.raises(ValueError, match="--bottleneck_ratio is an option of hae_v2, not of v2"):
        _, (m5,) = cfl.parse_configs(argparse_parser(), ["--config", str(path), "--unet_ver", "v2",
                                                         "--bottleneck_ratio", "0.125"], [cf.ModelConfig])
        su.create_model(m5)


def argparse_parser():
    import argparse

    p = argparse.ArgumentParser()
    cfl.add_config_flag(p)
    cfl.add_flags(p, cf.ModelConfig)
    cfl.add_flags(p, cf.DiffusionConfig)
    return p


@pytest.mark.parametrize("unet_ver", ["v2", "hae", "hae_lite", "v1"])
def test_resolved_configs_written_the_old_way_still_match(unet_ver):
    """Checkpoints and exports of today record use_hae/bottleneck_ratio for every HAE variant (and older
    ones for v2 too): resuming and loading an export with the same flags still finds no difference."""
    flags = {**su.model_and_diffusion_defaults(), **tiny_flags(unet_ver=unet_ver)}
    now = su.model_config(flags)
    old = {**now, "use_hae": flags["use_hae"], "bottleneck_ratio": 0.25}
    assert resume_differences({"model": old}, {"model": now}) == []
    assert flags_from_config(old, {})["unet_ver"] == unet_ver
    m = cf.ModelConfig.from_dict({k: v for k, v in flags.items() if k in cf.field_names(cf.ModelConfig)})
    assert export_differences({"model": old, "diffusion": cf.DiffusionConfig().to_dict()}, m,
                              cf.DiffusionConfig()) == []
    # a setting that did change is still named
    changed = {**old, "num_channels": 64}
    assert resume_differences({"model": changed}, {"model": now}) == [
        "model.num_channels: checkpoint 64, flags 32"]


# -------------------------------------------------------------------------------------- a new variant

TOY_MODULE = '''
"""A toy variant: the FPDM UNet with its output scaled by ``gain``, an option of its own."""

from guided_diffusion.registry import register_model
from guided_diffusion.unet import UNetModel


@register_model("toy_gain")
class ToyGainUNet(UNetModel):
    def __init__(self, *args, gain: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.gain = gain

    def forward(self, *args, **kwargs):
        return super().forward(*args, **kwargs) * self.gain
'''


def test_a_toy_variant_with_its_own_option_needs_only_its_module(tmp_path, monkeypatch):
    """Its module (one ``register_model`` call) is all: the factory, the flag defaults, the argparse
    helpers and the resolved config pick its option up; other variants refuse it."""
    (tmp_path / "toy_gain_variant.py").write_text(textwrap.dedent(TOY_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        importlib.import_module("toy_gain_variant")
        assert registry.variant_options("toy_gain") == {"gain": 1.0}
        torch.manual_seed(0)
        toy = su.create_model(**tiny_flags(unet_ver="toy_gain", gain=2.0))
        torch.manual_seed(0)
        plain = su.create_model(**tiny_flags(unet_ver="v2"))
        x, t = torch.randn(1, 3, 16, 16), torch.tensor([5])
        assert toy.gain == 2.0 and torch.equal(toy(x, t), 2.0 * plain(x, t))
        assert su.model_and_diffusion_defaults()["gain"] == 1.0
        assert su.model_config(tiny_flags(unet_ver="toy_gain", gain=2.0))["gain"] == 2.0
        assert "gain" not in su.model_config(tiny_flags(unet_ver="hae_v2"))
        model, _ = su.create_model_and_diffusion(**tiny_flags(unet_ver="toy_gain", gain=3.0))
        assert model.gain == 3.0
        with pytest.raises(ValueError) as err:
            su.create_model(**tiny_flags(unet_ver="hae_v2", gain=2.0))
        assert str(err.value) == "--gain is an option of toy_gain, not of hae_v2"
        su.create_model(**tiny_flags(unet_ver="hae_v2", gain=1.0))  # at its default: ignored
    finally:
        registry.MODEL_REGISTRY.pop("toy_gain", None)
        sys.modules.pop("toy_gain_variant", None)
    assert "gain" not in su.model_and_diffusion_defaults()


def test_the_parameter_count_tools_sweep_the_ratio_of_hae_v2_only(monkeypatch):
    """compare_hae_versions / bench_models hand --bottleneck_ratio to the variant that owns it."""
    monkeypatch.syspath_prepend(str(REPO))
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    compare = importlib.import_module("compare_hae_versions")
    bench = importlib.import_module("bench_models")
    rows, rows_half = compare.measure("brats"), compare.measure("brats", 0.5)
    assert rows["v2"]["total"] == rows_half["v2"]["total"] == 103_082_500
    assert (rows["hae_v2"]["total"], rows_half["hae_v2"]["total"]) == (115_808_580, 116_054_660)
    assert isinstance(bench.build_model("v2", "small", "cpu", 0.5), torch.nn.Module)


def test_a_table1_run_config_written_the_old_way_loads(tmp_path):
    """run_config.json (ModelConfig.to_dict) of a v2 run with --bottleneck_ratio/--use_hae given, back when
    v2 accepted and ignored them: table1's loader rebuilds the same v2 network and loads its weights."""
    from guided_diffusion.baselines.table1_methods import load_trained

    small = cf.ModelConfig(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2",
                           attention_resolutions="8", num_heads=2, num_classes=2, class_cond=True)
    torch.manual_seed(0)
    model = su.create_model(small)
    torch.save(model.state_dict(), tmp_path / "model000001.pt")
    record = {"model": {**small.to_dict(), "bottleneck_ratio": 0.5, "use_hae": False},
              "diffusion": cf.DiffusionConfig(diffusion_steps=50).to_dict()}
    (tmp_path / "run_config.json").write_text(json.dumps(record))
    loaded, diffusion = load_trained(str(tmp_path), str(tmp_path / "model000001.pt"), "")
    assert _state_equal(loaded.cpu(), model) and diffusion.num_timesteps == 50
