"""The typed-config machinery: flags from fields, run files, validation, upstream names."""

from __future__ import annotations

import argparse
import dataclasses
import json
import warnings

import pytest

from guided_diffusion import script_util as su
from guided_diffusion.configs import base as cf
from guided_diffusion.configs import config_flags as cfl


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    cfl.add_config_flag(p)
    cfl.add_flags(p, cf.ModelConfig)
    cfl.add_flags(p, cf.DiffusionConfig)
    cfl.add_compat_flags(p)
    return p


def test_field_names_match_the_legacy_defaults():
    legacy = su.model_and_diffusion_defaults()
    for cls in (cf.ModelConfig, cf.DiffusionConfig):
        for name, value in cls().to_dict().items():
            assert legacy[name] == value, name


def test_flags_types_and_defaults():
    argv = ["--image_size", "32", "--class_cond", "yes", "--timestep_respacing", "ddim5"]
    _, (m, d) = cfl.parse_configs(_parser(), argv, [cf.ModelConfig, cf.DiffusionConfig])
    assert (m.image_size, m.class_cond, m.num_channels) == (32, True, 128)
    assert d.timestep_respacing == "ddim5" and d.diffusion_steps == 1000
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.image_size = 8  # type: ignore[misc]


def test_dict_round_trip_and_unknown_key():
    m = cf.ModelConfig(image_size=16, num_channels=8)
    assert cf.ModelConfig.from_dict(json.loads(json.dumps(m.to_dict()))) == m
    with pytest.raises(ValueError, match="bogus"):
        cf.ModelConfig.from_dict({"bogus": 1})


def test_validation_names_the_flag():
    with pytest.raises(ValueError, match="--num_channels must be >= 1"):
        cf.ModelConfig(num_channels=0)
    with pytest.raises(ValueError, match="--dropout must be a finite"):
        cf.ModelConfig(dropout=float("nan"))
    with pytest.raises(ValueError, match="--image_size must be an integer"):
        cf.ModelConfig.from_dict({"image_size": "abc"})


def test_run_file_then_flag_overrides(tmp_path):
    path = str(tmp_path / "run.json")
    record = cf.run_record(cf.ModelConfig(image_size=16, num_channels=8), cf.DiffusionConfig())
    cf.save_run_config(path, record)
    _, (m, _) = cfl.parse_configs(_parser(), ["--config", path, "--num_channels", "16"],
                                 [cf.ModelConfig, cf.DiffusionConfig])
    assert (m.image_size, m.num_channels) == (16, 16)
    (tmp_path / "bad.json").write_text(json.dumps({"model": {"nope": 1}}))
    with pytest.raises(ValueError, match="nope.*bad.json"):
        cfl.parse_configs(_parser(), ["--config", str(tmp_path / "bad.json")], [cf.ModelConfig])
    (tmp_path / "notjson.json").write_text("{")
    with pytest.raises(ValueError, match="notjson.json is not a JSON"):
        cf.load_run_config(str(tmp_path / "notjson.json"))


def test_compat_names_warn_once_or_refuse():
    cfl._WARNED.discard("resblock_updown")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfl.parse_configs(_parser(), ["--resblock_updown", "False"], [cf.ModelConfig])
        cfl.parse_configs(_parser(), ["--resblock_updown", "False"], [cf.ModelConfig])
    assert sum("resblock_updown" in str(w.message) for w in caught) == 1
    with pytest.raises(ValueError, match="--resblock_updown True is not supported"):
        cfl.parse_configs(_parser(), ["--resblock_updown", "True"], [cf.ModelConfig])
    assert "--resblock_updown" not in _parser().format_help()


def test_script_util_builds_from_configs():
    m = cf.ModelConfig(image_size=16, num_channels=8, num_res_blocks=1, channel_mult="1,2",
                       attention_resolutions="8", num_heads=1)
    d = cf.DiffusionConfig(diffusion_steps=40, timestep_respacing="5")
    model, diffusion = su.create_from_configs(m, d)
    ref, _ = su.create_model_and_diffusion(**{**m.to_dict(), **d.to_dict()})
    assert [p.shape for p in model.parameters()] == [p.shape for p in ref.parameters()]
    assert diffusion.num_timesteps == 5
    assert su.model_config(m, d) == su.model_config({**m.to_dict(), **d.to_dict()})
