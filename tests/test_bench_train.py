"""benchmarks/bench_train.py at the tiny config: every mode runs, ratios are to fp32 eager, the loader-only
rate is measured on a data dir, and the JSON is written."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from tests.training.test_train import write_fake_brats

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_train", ROOT / "benchmarks" / "bench_train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_train_tiny_table_and_json(tmp_path, capsys, monkeypatch):
    bench = _bench()
    lines = []

    def no_compiler(*a, **k):  # keeps the test fast; the fallback is what an unsupported platform gets
        lines.append("compile asked")
        raise RuntimeError("no compiler in this test")

    monkeypatch.setattr(torch, "compile", no_compiler)
    data = write_fake_brats(tmp_path / "data", channels=4)
    out_json = tmp_path / "bench.json"
    out = bench.main(["--config", "tiny", "--batch", "2", "--steps", "2", "--warmup", "0", "--threads", "1",
                      "--modes", "fp32,bf16,channels_last,compile", "--data_dir", str(data),
                      "--loader_batches", "3", "--num_workers", "0", "--json", str(out_json)])
    text = capsys.readouterr()
    assert "running eagerly" in text.err and lines == ["compile asked"]
    assert [r["mode"] for r in out["train"]] == ["fp32", "bf16", "channels_last", "compile"]
    assert out["train"][0]["ratio_to_fp32"] == 1.0
    for r in out["train"]:
        assert r["images_per_s"] > 0 and r["final_loss"] == r["final_loss"]  # finite, not NaN
        assert abs(r["ratio_to_fp32"] - r["images_per_s"] / out["train"][0]["images_per_s"]) < 1e-9
    assert out["train"][2]["channels_last"] and out["train"][3]["compile"]
    assert out["base_mode"] == "fp32" and all(r["ratio_to_base"] == r["ratio_to_fp32"] for r in out["train"])
    assert out["loader"]["batches"] == 3 and out["loader"]["images_per_s"] > 0
    assert "loader only" in text.out and "channels_last" in text.out
    assert json.loads(out_json.read_text()) == json.loads(json.dumps(out))
    # the JSON names the CPU and the SIMD level of torch's kernels (float results depend on them)
    assert out["device_name"].endswith(f"({torch.backends.cpu.get_cpu_capability()})")


def test_bench_train_bad_mode_names_the_flag(capsys):
    with pytest.raises(ValueError, match="--modes"):
        _bench().parse_mode("fp32+fast")
    with pytest.raises(SystemExit) as stop:  # on the command line: one usage line, exit 2, no traceback
        _bench().main(["--config", "tiny", "--modes", "fp32,fp32+fast"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "unknown part 'fast'" in err and "Traceback" not in err


def test_bench_train_models_and_base_mode(tmp_path):
    """Rows per (network, mode); ratios are taken within one network, fp32 found wherever it is listed."""
    out_json = tmp_path / "bench.json"
    argv = ["--config", "tiny", "--batch", "2", "--steps", "1", "--warmup", "0", "--threads", "1"]
    out = _bench().main([*argv, "--modes", "bf16,fp32", "--models", "v2,hae_v2", "--json", str(out_json)])
    assert [(r["model"], r["mode"]) for r in out["train"]] == [("v2", "bf16"), ("v2", "fp32"),
                                                                 ("hae_v2", "bf16"), ("hae_v2", "fp32")]
    rate = {(r["model"], r["mode"]): r["images_per_s"] for r in out["train"]}
    for r in out["train"]:
        assert r["ratio_to_base"] == pytest.approx(r["images_per_s"] / rate[(r["model"], "bf16")])
        assert r["ratio_to_fp32"] == pytest.approx(r["images_per_s"] / rate[(r["model"], "fp32")])
    assert out["base_mode"] == "bf16" and json.loads(out_json.read_text())["train"] == out["train"]


def test_bench_train_loop_mode_runs_the_training_library(monkeypatch):
    """"+loop" goes through TrainLoop.run_step (EMA, label dropout, logging) on the same seeded network;
    the bare step does not."""
    from guided_diffusion.training import train_util

    calls = []
    run_step = train_util.TrainLoop.run_step
    monkeypatch.setattr(train_util.TrainLoop, "run_step", lambda self, b: (calls.append(b[0].shape),
                                                                          run_step(self, b)))
    argv = ["--config", "tiny", "--batch", "2", "--steps", "2", "--warmup", "1", "--threads", "1"]
    out = _bench().main([*argv, "--modes", "fp32,fp32+loop"])
    bare, loop = out["train"]
    assert not bare["loop"] and loop["loop"] and loop["mode"] == "fp32+loop"
    assert calls == [torch.Size([2, 4, 16, 16])] * 3  # 1 warm-up + 2 timed steps, only in the loop mode
    assert loop["images_per_s"] > 0 and 0 < loop["final_loss"] < 10
    # the warm-up step (where compilation happens) is timed apart: at least one real step long
    assert bare["warmup_s"] > 0.5 * bare["step_s"] and loop["warmup_s"] > 0.5 * loop["step_s"]
