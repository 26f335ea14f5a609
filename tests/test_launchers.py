"""Launchers config/run_translation_brats_fpdm*.sh (checks, flags, torchrun) and bench_inference.py."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCHERS = {
    "fpdm": (
        REPO / "config" / "run_translation_brats_fpdm.sh",
        "./logs/clf_free_guided",
        "config/run_train_brats_clf_free_guided.sh",
    ),
    "hae_v2": (
        REPO / "config" / "run_translation_brats_fpdm_hae_v2.sh",
        "./logs/clf_free_guided_hae_v2",
        "config/run_train_brats_clf_free_guided_hae_v2.sh",
    ),
}


def _run(script: Path, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("MODEL_NUM", "MODEL_DIR", "W", "NPROC")}
    return subprocess.run(
        ["bash", str(script)], env={**base, **env}, capture_output=True, text=True, timeout=60
    )


@pytest.fixture()
def layout(tmp_path):
    data = tmp_path / "data"
    for split in ("val", "test"):
        (data / "data_splits" / split).mkdir(parents=True)
    model = tmp_path / "model"
    model.mkdir()
    (model / "ema_0.9999_210000.pt").touch()
    (model / "model000010.pt").touch()
    return data, model, tmp_path


def test_launchers_parse():
    for path in [REPO / "config" / "_launch_common.sh", *(v[0] for v in LAUNCHERS.values())]:
        proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        text = path.read_text()
        assert "sbatch" not in text.lower() and "conda" not in text and "/data/amciilab" not in text
    for script, _, _ in LAUNCHERS.values():
        assert "set -euo pipefail" in script.read_text() and os.access(script, os.X_OK)


@pytest.mark.parametrize("kind", sorted(LAUNCHERS))
def test_launcher_missing_inputs_exit_2(kind, layout):
    script, default_model_dir, train = LAUNCHERS[kind]
    data, model, tmp = layout
    env = {"PYTHON": "/bin/false", "LOG_DIR": str(tmp / "out")}
    proc = _run(script, DATA_DIR=str(tmp / "nodata"), MODEL_DIR=str(model), **env)
    assert (
        proc.returncode == 2 and str(tmp / "nodata") in proc.stderr and "make_synthetic_brats" in proc.stderr
    )
    (tmp / "flat").mkdir()
    proc = _run(script, DATA_DIR=str(tmp / "flat"), MODEL_DIR=str(model), **env)
    assert proc.returncode == 2 and "data_splits/val" in proc.stderr
    proc = _run(script, DATA_DIR=str(data), MODEL_DIR=str(tmp / "nomodel"), **env)
    assert proc.returncode == 2 and str(tmp / "nomodel") in proc.stderr
    assert train in proc.stderr and default_model_dir in proc.stderr and "MODEL_NUM" in proc.stderr
    proc = _run(script, DATA_DIR=str(data), MODEL_DIR=str(model), MODEL_NUM="20", **env)
    assert proc.returncode == 2 and "ema_0.9999_000020.pt" in proc.stderr
    assert "ema_0.9999_210000.pt model000010.pt" in proc.stderr  # lists what is there
    proc = _run(script, DATA_DIR=str(data), MODEL_DIR=str(model), EMA="False", **env)
    assert proc.returncode == 2 and "model210000.pt" in proc.stderr
    assert not (tmp / "out").exists()  # nothing is created before the checks pass
    # default MODEL_DIR = the training launcher's log dir (train -> segment without renaming)
    proc = _run(script, DATA_DIR=str(data), PYTHON="echo", LOG_DIR=str(tmp / "out"))
    assert default_model_dir in proc.stdout + proc.stderr and proc.returncode in (0, 2)


@pytest.mark.parametrize("kind", sorted(LAUNCHERS))
def test_launcher_command_line(kind, layout):
    script, _, _ = LAUNCHERS[kind]
    data, model, tmp = layout
    env = {"DATA_DIR": str(data), "MODEL_DIR": str(model), "PYTHON": "echo", "LOG_DIR": str(tmp / "out")}
    proc = _run(script, W="1 2", EXTRA_FLAGS="--save_nifti True --num_slices 10", **env)
    assert proc.returncode == 0, proc.stderr
    cmd = proc.stdout.split()
    joined = " ".join(cmd)
    target = "scripts/translation_FPDM_hae_v2.py" if kind == "hae_v2" else "scripts/translation_FPDM.py"
    assert cmd[0] == target and (tmp / "out").is_dir()
    for flags in (
        "--w 1 2 --ema True",
        "--forward_steps 600 --d_reverse True --model_num 210000",
        "--image_size 128 --num_classes 2 --in_channels 4 --num_channels 128 --attention_resolutions 32,16,8",
        "--modality 0 3 --seed 0",
        "--diffusion_steps 1000 --noise_schedule linear",
        f"--data_dir {data} --model_dir {model} --log_dir {tmp / 'out'}",
        "--save_nifti True --num_slices 10",
    ):
        assert flags in joined, flags
    batch = "10" if kind == "hae_v2" else "50"
    assert f"--batch_size {batch} --batch_size_val {batch}" in joined
    assert ("--unet_ver hae_v2 --use_hae True" in joined) == (kind == "hae_v2")
    # several processes -> torchrun with the rendezvous settings
    proc = _run(script, NPROC="2", MASTER_PORT="29999", MODEL_NUM="", **env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("-m torch.distributed.run --nproc-per-node 2 --nnodes 1")
    assert "--master-port 29999" in proc.stdout and "--model_num" not in proc.stdout


@pytest.mark.parametrize("launcher", ["config/run_train_brats_clf_free_guided.sh",
                                      "config/run_translation_brats_fpdm.sh"])
@pytest.mark.parametrize("nproc", ["abc", "0", "-2", "1.5", ""])
def test_launcher_nproc_must_be_a_positive_integer(launcher, nproc, layout):
    """Issue 8 §6: NPROC that is not a positive integer stops the launcher (exit 2, one line naming
    NPROC) before anything runs; "" means the default 1 and is not an error."""
    data, model, tmp = layout
    (data / "data_splits" / "train").mkdir()
    proc = _run(REPO / launcher, NPROC=nproc, DATA_DIR=str(data), MODEL_DIR=str(model), PYTHON="echo",
                LOG_DIR=str(tmp / "out"))
    if nproc == "":
        assert proc.returncode == 0, proc.stderr
        assert not proc.stdout.startswith("-m torch.distributed.run")
    else:
        assert proc.returncode == 2 and "NPROC must be a positive integer" in proc.stderr, proc.stderr
        assert f"'{nproc}'" in proc.stderr and proc.stdout == ""


def test_bench_inference_tiny(tmp_path, run_script):
    out = tmp_path / "bench.json"
    argv = ["--config", "tiny", "--forward_steps", "3", "--repeats", "2", "--threads", "1"]
    res = run_script("benchmarks/bench_inference.py", *argv, "--skip_memory", "--json", out)
    stored = json.loads(out.read_text())
    assert stored["forward_steps"] == 3 and set(stored["modes"]) == {"faithful", "upstream", "legacy"}
    modes = stored["modes"]
    assert modes["faithful"]["calls_per_step"] == 1.0 and modes["legacy"]["calls_per_step"] == 1.0
    assert modes["upstream"]["calls_per_step"] == pytest.approx(11 / 3)  # 4, 4, 3 calls
    assert modes["faithful"]["samples_per_step"] == 2 * 2 and modes["upstream"]["samples_per_step"] > 7
    assert modes["upstream"]["state_mib"] > modes["faithful"]["state_mib"]
    assert len(modes["faithful"]["times_s"]) == 2 and modes["upstream"]["speedup_vs_upstream"] == 1.0
    assert stored["max_abs_div_diff_faithful_vs_upstream"] < 1e-5  # same x̂ sequences
    assert "speed-up" in res.stdout
    # the CPU memory probe (normally run in a fresh subprocess per mode) returns a finite, non-negative MiB
    child = run_script("benchmarks/bench_inference.py", *argv, "--child_mode", "faithful")
    peak = json.loads(child.stdout.strip().splitlines()[-1])["peak_mib"]
    assert math.isnan(peak) or peak >= 0
    bad = run_script("benchmarks/bench_inference.py", "--config", "huge", check=False)
    assert bad.returncode == 2 and "huge" in bad.stderr
    zero = run_script("benchmarks/bench_inference.py", "--repeats", "0", check=False)
    assert zero.returncode == 2 and "Traceback" not in zero.stderr
    lines = zero.stderr.strip().splitlines()
    assert len(lines) == 1 and "--repeats, --batch and --forward_steps must be >= 1" in lines[0]


def test_bench_inference_precision_and_early_stop_modes(tmp_path, run_script):
    out = tmp_path / "bench.json"
    argv = ["--config", "tiny", "--forward_steps", "6", "--repeats", "1", "--threads", "1", "--skip_memory"]
    run_script("benchmarks/bench_inference.py", *argv, "--modes", "faithful", "bf16", "early_stop",
               "--patience", "2", "--json", str(out))
    modes = json.loads(out.read_text())["modes"]
    assert modes["faithful"]["max_abs_div_diff_vs_faithful"] == 0.0
    assert modes["faithful"]["same_end_step_fraction"] == 1.0
    assert modes["bf16"]["precision"] == "bf16" and modes["bf16"]["max_abs_div_diff_vs_faithful"] > 0.0
    assert 0.0 <= modes["early_stop"]["same_end_step_fraction"] <= 1.0
    assert 1 <= modes["early_stop"]["steps_run"] <= 6 and "speedup_vs_faithful" in modes["bf16"]
    # the masks of segmentation.segment, same stand-in calibration for every mode: faithful agrees with itself
    assert modes["faithful"]["same_mask_pixel_fraction"] == 1.0
    assert all(0.5 <= m["same_mask_pixel_fraction"] <= 1.0 for m in modes.values())


def test_bench_inference_reports_progress_after_every_repetition():
    """With a time limit in mind (gpu_check): the results so far after each repetition but the last,
    marked incomplete; the final ones complete; warm-up (compilation) seconds per mode."""
    import importlib.util

    path = REPO / "benchmarks" / "bench_inference.py"
    spec = importlib.util.spec_from_file_location("bench_inference", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = bench.parse_args(["--config", "tiny", "--forward_steps", "2", "--repeats", "3", "--threads", "1",
                             "--skip_memory", "--modes", "faithful", "legacy"])
    seen = []
    final = bench.benchmark(args, on_progress=lambda r: seen.append(json.loads(json.dumps(r))))
    assert [(r["complete"], r["repeats_done"]) for r in seen] == [(False, 1), (False, 2)]
    assert [len(r["modes"]["faithful"]["times_s"]) for r in seen] == [1, 2]
    assert all(r["modes"]["legacy"]["s_per_slice"] > 0 for r in seen)
    assert final["complete"] and final["repeats_done"] == 3 and len(final["modes"]["legacy"]["times_s"]) == 3
    assert all(m["warmup_s"] > 0 for m in final["modes"].values())


@pytest.mark.parametrize("dataset", ["brats", "atlas"])
def test_table1_launchers(dataset, tmp_path):
    """config/run_table1_{brats,atlas}.sh: syntax, missing data -> exit 2, the paper-preset command line."""
    script = REPO / "config" / f"run_table1_{dataset}.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0 and os.access(script, os.X_OK)
    assert "set -euo pipefail" in script.read_text()
    base = {k: v for k, v in os.environ.items() if k not in ("NPROC", "NNODES", "OUT", "DATA_DIR", "DATASET")}
    proc = subprocess.run(["bash", str(script)], env={**base, "DATA_DIR": str(tmp_path / "nodata")},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and str(tmp_path / "nodata") in proc.stderr
    data = tmp_path / "data"
    for split in ("train", "val", "test"):
        (data / "data_splits" / split).mkdir(parents=True)
    env = {**base, "DATA_DIR": str(data), "PYTHON": "echo", "OUT": str(tmp_path / "o"), "NPROC": "4",
           "MASTER_PORT": "29997", "EXTRA_FLAGS": "--rows anofpdm_ddim"}
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.strip()
    head = (f"scripts/run_table1.py --preset paper --dataset {dataset} --data_dir {data} "
            f"--out {tmp_path / 'o'} --launcher echo -m torch.distributed.run --nproc-per-node 4 --nnodes 1")
    assert out.startswith(head) and out.endswith("--rows anofpdm_ddim")
    proc = subprocess.run(["bash", str(script)], env={**env, "NPROC": "zero"}, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "NPROC" in proc.stderr
