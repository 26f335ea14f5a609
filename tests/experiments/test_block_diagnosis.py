"""scripts/diagnose_blocks.py (guided_diffusion.experiments.block_diagnosis) on a tiny hae_v2 run trained for
2 steps with a checkpoint after each: one row per (checkpoint, block) with finite values, the zero-initialised
fusion seen as 0 in a fresh network and positive once it got a gradient, identical files for the same seed,
rows reused on a rerun, other settings refused, and a v2 network (no hybrid block) measured per block."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import tiny_eval as te
import torch

from guided_diffusion.cli import run_cli
from guided_diffusion.configs.base import DiffusionConfig, ModelConfig
from guided_diffusion.experiments import block_diagnosis as bd
from guided_diffusion.hae_blocks import HybridCNNTransformerBlockBase
from guided_diffusion.script_util import create_from_configs
from guided_diffusion.training import run as training

HAE = "output_blocks.1.2"  # the one hybrid block of the tiny network (decoder level 1, before its Upsample)
TIMESTEPS = ["--timesteps", "5", "15", "30"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, Path]:
    """(data dir, log dir) of a 2-step hae_v2 training run with checkpoints at steps 1 and 2."""
    root = tmp_path_factory.mktemp("diag")
    data = root / "data"
    te.make_split(data, "train", {"T0": [False, True, False, True]}, seed=1)
    te.make_split(data, "val", {"V0": [False, True, True, False], "V1": [False, False, True, False]}, seed=2)
    log = root / "log"
    flags = ["--data_dir", str(data), "--log_dir", str(log), *te.MODEL_FLAGS, "--unet_ver", "hae_v2",
             "--batch_size", "2", "--max_steps", "2", "--save_interval", "1", "--log_interval", "100",
             "--threshold", "0.2", "--num_workers", "0", "--lr", "1e-3", "--ema_rate", "0.9"]
    assert training.main(flags) == 0
    return data, log


def _argv(data: Path, log: Path, out: Path, *extra: str) -> list[str]:
    return ["--model_dir", str(log), "--data_dir", str(data), "--out", str(out), "--slices", "6", *TIMESTEPS,
            *extra]


def _finite(obj) -> bool:
    if isinstance(obj, dict):
        return all(_finite(v) for v in obj.values())
    if isinstance(obj, float):
        return math.isfinite(obj)
    return True


def test_rows_finite_zero_init_determinism_and_png(tiny_run, tmp_path):
    data, log = tiny_run
    assert bd.main(_argv(data, log, tmp_path / "a")) == 0
    text = (tmp_path / "a" / bd.DIAG_JSON).read_text()
    diag = json.loads(text)
    blocks = diag["blocks"]
    assert [n for n, b in blocks.items() if b["kind"] == "hae"] == [HAE]
    assert blocks[HAE]["level"] == 1 and blocks[HAE]["part"] == "output"
    assert {f"{HAE}.fusion.weight", f"{HAE}.fusion.bias"} <= set(blocks[HAE]["zero_init"])
    assert [e["step"] for e in diag["checkpoints"]] == [1, 2]
    assert all(len(e["sha256"]) == 64 for e in diag["checkpoints"])
    assert diag["run_config"]["model"]["unet_ver"] == "hae_v2" and diag["seed"] == 0
    assert sorted(diag["batch"]["labels"]) == [0, 0, 0, 1, 1, 1]  # half unhealthy
    assert [(r["step"], r["block"]) for r in diag["rows"]] == [(s, n) for s in (1, 2) for n in blocks]
    for row in diag["rows"]:
        assert _finite(row), row
        assert set(row["grad_norm"]) == {"label", "null"} and row["param_norm"] > 0
        if row["kind"] == "hae":
            assert set(row["fusion_ratio"]["label"]) == {"5", "15", "30"}
    hae = {r["step"]: r for r in diag["rows"] if r["block"] == HAE}
    # step 1: the UNet's zero-initialised output conv passed no gradient to the fusion conv at step 0, so it
    # is still exactly 0 (the block is the identity) though it gets a gradient now
    assert hae[1]["fusion_weight_norm"] == 0.0 and hae[1]["fusion_bias_norm"] == 0.0
    assert hae[1]["fusion_ratio_mean"] == {"label": 0.0, "null": 0.0}
    assert hae[1]["grad_norm"]["label"] > 0
    # step 2: one step with that gradient: the fusion conv and the block's residual are no longer zero
    assert hae[2]["fusion_weight_norm"] > 0 and hae[2]["fusion_ratio_mean"]["label"] > 0
    assert 0 < hae[2]["fusion_ratio_mean"]["label"] < 1
    assert (tmp_path / "a" / bd.DIAG_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert bd.main(_argv(data, log, tmp_path / "b")) == 0  # same inputs and seed: the same file
    assert (tmp_path / "b" / bd.DIAG_JSON).read_text() == text
    assert bd.main(_argv(data, log, tmp_path / "c", "--seed", "1")) == 0
    assert json.loads((tmp_path / "c" / bd.DIAG_JSON).read_text())["rows"] != diag["rows"]


def test_fresh_network_fusion_is_zero_and_its_block_the_identity():
    m = ModelConfig(**{k: v for k, v in te.MODEL_KW.items() if k != "diffusion_steps"}, unet_ver="hae_v2")
    torch.manual_seed(0)
    model, diffusion = create_from_configs(m, DiffusionConfig(diffusion_steps=40))
    model.eval()
    blocks = bd.hybrid_blocks(model)
    assert list(blocks) == [HAE] and isinstance(blocks[HAE], HybridCNNTransformerBlockBase)
    zero_init = {HAE: bd.zero_init_names(model, HAE)}
    norms = bd.weight_norms(model.state_dict(), zero_init)[HAE]
    assert norms == {"fusion_weight_norm": 0.0, "fusion_bias_norm": 0.0, "zero_init_norm": 0.0}
    x = torch.rand(4, te.CHANNELS, te.SIDE, te.SIDE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    noise = [torch.randn(x.shape, generator=torch.Generator().manual_seed(t)) for t in (5, 30)]
    out = bd.fusion_measures(model, diffusion, x, torch.tensor([0, 1, 0, 1]), [5, 30], noise)[HAE]
    assert out["fusion_ratio"] == {"label": {"5": 0.0, "30": 0.0}, "null": {"5": 0.0, "30": 0.0}}
    assert out["cond_delta"] == {"5": 0.0, "30": 0.0}
    assert not blocks[HAE]._forward_pre_hooks and not blocks[HAE].fusion._forward_hooks  # hooks removed

    with torch.no_grad():  # a nonzero fusion conv is seen in both measures
        blocks[HAE].fusion.weight.normal_()
    norms = bd.weight_norms(model.state_dict(), zero_init)[HAE]
    assert norms["fusion_weight_norm"] == pytest.approx(float(blocks[HAE].fusion.weight.detach().norm()))
    out = bd.fusion_measures(model, diffusion, x, torch.tensor([0, 1, 0, 1]), [5, 30], noise)[HAE]
    assert out["fusion_ratio_mean"]["label"] > 0


def test_rerun_reuses_rows_and_refuses_other_settings(tiny_run, tmp_path, monkeypatch, capsys):
    data, log = tiny_run
    out = tmp_path / "out"
    assert bd.main(_argv(data, log, out, "--steps", "1")) == 0
    first = json.loads((out / bd.DIAG_JSON).read_text())
    assert [e["step"] for e in first["checkpoints"]] == [1]
    real, calls = bd.measure_checkpoint, []
    monkeypatch.setattr(bd, "measure_checkpoint", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    assert bd.main(_argv(data, log, out)) == 0
    assert calls == [2]  # step 1's rows were reused
    both = json.loads((out / bd.DIAG_JSON).read_text())
    assert [r for r in both["rows"] if r["step"] == 1] == first["rows"]
    calls.clear()
    assert bd.main(_argv(data, log, out)) == 0 and calls == []
    assert run_cli(bd.main, _argv(data, log, out, "--slices", "4")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "diagnose.slices: stored 6, now 4" in err[0] and "--out" in err[0], err
    assert json.loads((out / bd.DIAG_JSON).read_text()) == both
    assert bd.main(_argv(data, log, tmp_path / "ema", "--ema", "True", "--steps", "2")) == 0
    ema = json.loads((tmp_path / "ema" / bd.DIAG_JSON).read_text())["checkpoints"]
    assert [e["checkpoint"] for e in ema] == ["ema_0.9_000002.pt"]  # the run's --ema_rate
    assert ema[0]["sha256"] != both["checkpoints"][1]["sha256"]


def test_a_network_without_hybrid_blocks_reports_gradients_per_level(tmp_path):
    data, mdir = te.make_run(tmp_path)  # a seeded random v2 UNet, checkpoint at step 10
    kw = {k: v for k, v in te.MODEL_KW.items() if k != "diffusion_steps"}
    record = {"model": ModelConfig(**kw).to_dict(), "train": {"ema_rate": "0.9999"},
              "diffusion": DiffusionConfig(diffusion_steps=40).to_dict()}
    (mdir / "run_config.json").write_text(json.dumps(record))
    diag = bd.diagnose(bd.parse(_argv(data, mdir, tmp_path / "out")))
    assert not [b for b in diag["blocks"].values() if b["kind"] == "hae"]
    levels = {(r["part"], r["level"]) for r in diag["rows"] if r["kind"] == "res"}
    assert {("output", 0), ("output", 1), ("middle", 1), ("input", 0), ("input", 1)} <= levels
    res = [r for r in diag["rows"] if r["kind"] == "res"]
    assert all(r["grad_norm"]["label"] > 0 and "fusion_ratio" not in r for r in res)
    assert bd.plotted_blocks(diag) == ["output_blocks.0.0", "output_blocks.1.0"]
    assert (tmp_path / "out" / bd.DIAG_PNG).is_file()
