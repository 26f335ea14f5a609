"""Inputs checked where they enter (docs/edges.md, 'Every entry point'): each case is a value a new user may
pass that used to end in a traceback, an obscure library message, a silently ignored or wrong setting, or
in another run's files written over. Each must now end in one ``error: ...`` line naming the flag or file,
exit status 2, with nothing written."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tiny_eval as te

from guided_diffusion.anofpdm import anofpdm_plots, translation
from guided_diffusion.baselines import classifier_training
from guided_diffusion.cli import run_cli
from guided_diffusion.configs.base import DiffusionConfig, ModelConfig
from guided_diffusion.experiments import (
    block_diagnosis,
    denoiser_comparison,
    forward_window,
    learning_curves,
    table1,
)
from guided_diffusion.script_util import model_config
from guided_diffusion.training import run as training

REPO = Path(__file__).resolve().parents[1]


def _load(rel: str):
    spec = importlib.util.spec_from_file_location(Path(rel).stem + "_entry", REPO / rel)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


synthetic_script = _load("scripts/make_synthetic_brats.py")
main_job = _load("scripts/run_main_job.py")
select_script = _load("scripts/select_guidance.py")
compare_hae = _load("compare_hae_versions.py")


def refused(capsys, main, argv, *needles) -> str:
    """Run ``main`` as its script does; assert exit 2 and one stderr line holding every needle."""
    assert run_cli(main, [str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    for needle in needles:
        assert needle in err[0], err[0]
    return err[0]


# ------------------------------------------------------------------------------------ training flags
TRAIN_CASES = [
    (["--microbatch", "0"], "--microbatch must be -1 (off) or >= 1"),  # was: silently off
    (["--lr_anneal_steps", "-1"], "--lr_anneal_steps must be >= 0"),  # was: silently off
    (["--max_steps", "-1"], "--max_steps must be >= 0"),  # was: no step limit at all
    (["--total_epochs", "-1"], "--total_epochs must be >= 0"),
    (["--n_unhealthy_patients", "-5"], "--n_unhealthy_patients must be -1 (all) or >= 0"),
    (["--n_healthy_patients", "0"], "--n_healthy_patients 0 applies only with --mixed False"),  # was ignored
    (["--num_classes", "-1"], "--num_classes must be >= 0"),  # was: 'y was given but ... unconditional'
    (["--preview_steps", "0", "--sample_shape", "1", "4", "16", "16"], "--preview_steps must be >= 1"),
    (["--weight_decay", "-1"], "--weight_decay must be >= 0"),  # was: torch's 'Invalid weight_decay value'
    (["--grad_clip", "-1"], "--grad_clip must be >= 0"),  # was: silently off
    (["--w", "nan"], "--w must be a finite number"),  # was: a message without the flag, after training
    (["--seed", "-1"], "--seed must be >= 0"),  # was: numpy's 'expected non-negative integer'
]


@pytest.mark.parametrize("extra,text", TRAIN_CASES, ids=[c[0][0] for c in TRAIN_CASES])
def test_train_flags(capsys, tmp_path, extra, text):
    argv = ["--data_dir", tmp_path / "data", "--log_dir", tmp_path / "log", *te.MODEL_FLAGS, *extra]
    refused(capsys, training.main, argv, text)
    assert not (tmp_path / "log").exists()


def test_classifier_free_training_refuses_other_runs_and_files(capsys, tmp_path):
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "metrics.json").write_text("{}")
    (tmp_path / "file").write_text("x")
    base = ["--data_dir", tmp_path, *te.MODEL_FLAGS, "--max_steps", "1"]
    refused(capsys, training.main, [*base, "--log_dir", tmp_path / "eval"], "--log_dir",
            "holds an evaluation")
    assert sorted(os.listdir(tmp_path / "eval")) == ["metrics.json"]
    refused(capsys, training.main, [*base, "--log_dir", tmp_path / "file"], "is a file; expected a folder")


# ------------------------------------------------------------------------------------ evaluation
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    data, mdir = te.make_run(root)
    return data, mdir, root


@pytest.mark.parametrize("extra,text", [
    (["--modality", "0", "0"], "--modality has repeated channel indices [0, 0]"),  # was: counted twice
    (["--seed", "-1"], "--seed must be >= 0"),  # was: 'expected non-negative integer'
])
def test_evaluation_flags(capsys, tiny, extra, text):
    data, mdir, root = tiny
    refused(capsys, translation.main, [*te.run_argv(data, mdir, root / "flags"), *extra], text)
    assert not (root / "flags").exists()


def test_evaluation_refuses_a_checkpoint_trained_with_other_diffusion_or_heads(capsys, tiny, tmp_path):
    data, mdir, _ = tiny
    trained = tmp_path / "model"
    trained.mkdir()
    (trained / "model000010.pt").write_bytes((mdir / "model000010.pt").read_bytes())
    kw = {k: v for k, v in te.MODEL_KW.items() if k != "diffusion_steps"}
    saved = {"model": model_config(ModelConfig(**kw), DiffusionConfig(diffusion_steps=40)),
             "diffusion": DiffusionConfig(diffusion_steps=40).to_dict()}
    (trained / "config.json").write_text(json.dumps(saved))  # as a training run saves it
    argv = te.run_argv(data, trained, tmp_path / "out")
    for flag, value, text in (("--diffusion_steps", "50", "--diffusion_steps 50 (trained with 40)"),
                              ("--num_heads", "2", "--num_heads 2 (trained with 1)")):
        line = refused(capsys, translation.main, [*argv, flag, value], str(trained / "model000010.pt"), text)
        assert "was trained with other settings" in line  # was: exit 0 with the weights misread


def test_evaluation_and_selection_refuse_the_folders_of_other_runs(capsys, tiny, tmp_path):
    data, mdir, _ = tiny
    before = sorted(os.listdir(mdir))
    refused(capsys, translation.main, te.run_argv(data, mdir, mdir), f"--log_dir {mdir} holds a training run",
            "an evaluation there would write over its files")
    assert sorted(os.listdir(mdir)) == before  # was: config.json, log.txt, metrics.json written into it
    done = tmp_path / "eval"
    done.mkdir()
    (done / "metrics.json").write_text("{}")
    sel = [*te.MODEL_FLAGS, "--data_dir", data, "--model_dir", mdir, "--log_dir", done, "--w", "1",
           "--forward_steps", "5", "--timestep_respacing", "10", "--progress", "False"]
    refused(capsys, select_script.main, sel, "holds an evaluation (metrics.json)",
            "a guidance selection there would write over its files")
    assert os.listdir(done) == ["metrics.json"]


def test_learning_curves_eval_seed(capsys, tmp_path):
    argv = ["--data_dir", tmp_path, "--log_dir", tmp_path / "log", *te.MODEL_FLAGS, "--max_steps", "2",
            "--eval_every", "2", "--eval_w", "2", "--forward_steps", "3"]
    refused(capsys, learning_curves.main, [*argv, "--eval_seed", "-1"], "--eval_seed must be >= 0")
    refused(capsys, learning_curves.main, [*argv, "--modality", "3", "3"], "--modality has repeated")


FORWARD_WINDOW_CASES = [
    (["--draws", "0"], "--draws must be >= 1"),
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--respacings", "1"], "--respacings must be distinct chain lengths >= 2"),
    (["--respacings", "100"], "--respacings [100]: longer than the 40 training steps"),
    (["--val_sizes", "1"], "--val_sizes must be distinct sizes >= 2"),
    (["--val_sizes", "4", "50"], "--val_sizes [50]: the validation split of"),
    (["--num_slices", "3"], "--num_slices / --num_slices_val: the study uses every"),
    (["--w", "nan"], "--w"),
    (["--forward_steps", "10"], "--forward_steps 10 must be < the 10 steps"),
]


@pytest.mark.parametrize("extra,text", FORWARD_WINDOW_CASES,
                         ids=[" ".join(c[0]) for c in FORWARD_WINDOW_CASES])
def test_forward_window_study_flags(capsys, tiny, extra, text):
    data, mdir, root = tiny
    argv = [*te.MODEL_FLAGS, "--data_dir", data, "--model_dir", mdir, "--out", root / "fw", "--w", "1",
            "--forward_steps", "5", "--timestep_respacing", "10", "--respacings", "6", "--val_sizes", "4",
            *extra]
    refused(capsys, forward_window.main, argv, text)
    assert not (root / "fw").exists()


def test_forward_window_study_paths(capsys, tiny, tmp_path):
    data, mdir, _ = tiny
    (tmp_path / "file").write_text("x")
    base = [*te.MODEL_FLAGS, "--w", "1", "--forward_steps", "5", "--timestep_respacing", "10"]
    refused(capsys, forward_window.main, [*base, "--data_dir", data, "--model_dir", mdir, "--out",
                                          tmp_path / "file"], "--out", "is a file; expected a folder")
    refused(capsys, forward_window.main, [*base, "--data_dir", tmp_path / "none", "--model_dir", mdir,
                                          "--out", tmp_path / "o"], "--data_dir", "does not exist")
    refused(capsys, forward_window.main, [*base, "--data_dir", data, "--model_dir", tmp_path / "none",
                                          "--out", tmp_path / "o"], "--model_dir", "does not exist")
    assert not (tmp_path / "o").exists()


def test_plots_name_a_missing_data_dir_and_an_out_file(capsys, tmp_path):
    (tmp_path / "file").write_text("x")
    # was: exit 0, the ground-truth plots skipped with a log line
    refused(capsys, anofpdm_plots.main, [tmp_path / "log", "--data_dir", tmp_path / "nope"],
            f"--data_dir {tmp_path / 'nope'} is not a folder")
    refused(capsys, anofpdm_plots.main, [tmp_path / "log", "--out", tmp_path / "file"],
            "--out", "is a file; expected a folder")  # was: '[Errno 17] File exists'


# ------------------------------------------------------------------------------------ data
def test_synthetic_data_flags(capsys, tmp_path):
    (tmp_path / "file").write_text("x")
    raw = tmp_path / "raw"
    (raw / "SYN_00000").mkdir(parents=True)
    base = ["--subjects", "3", "--image_size", "16", "--slice_step", "8", "--quiet", "--no_baseline"]
    out = tmp_path / "out"
    refused(capsys, synthetic_script.main, ["--out", out, *base, "--seed", "-1"], "--seed must be >= 0")
    refused(capsys, synthetic_script.main, ["--out", tmp_path / "file", *base], "--out", "is a file")
    refused(capsys, synthetic_script.main, ["--out", out, *base, "--raw_nifti", tmp_path / "file"],
            "--raw_nifti", "is a file")  # was: '[Errno 20] Not a directory' after the first subject
    refused(capsys, synthetic_script.main, ["--out", out, *base, "--raw_nifti", raw],
            f"--raw_nifti {raw} already holds NIfTI subjects (SYN_00000)")  # was: written over
    assert not out.exists() and os.listdir(raw) == ["SYN_00000"]


# ------------------------------------------------------------------------------------ experiments
@pytest.mark.parametrize("main", [table1.main, denoiser_comparison.main], ids=["table1", "compare_denoisers"])
@pytest.mark.parametrize("extra,text", [
    (["--w", "-1"], "--w must be distinct finite numbers >= 0"),  # was: accepted, refused after training
    (["--w", "nan"], "--w must be distinct finite numbers >= 0"),
    (["--num_slices", "0"], "--num_slices must be >= 1"),
    (["--eval_seeds", "-1"], "--eval_seeds must be >= 0"),
    (["--threads", "-2"], "--threads must be >= 0"),  # table1: was torch's RuntimeError with a traceback
])
def test_experiment_flags(capsys, tmp_path, main, extra, text):
    refused(capsys, main, ["--preset", "demo", "--out", tmp_path / "out", "--dry_run", *extra], text)


def test_experiment_out_file_and_train_seed(capsys, tmp_path):
    (tmp_path / "file").write_text("x")
    for main in (table1.main, denoiser_comparison.main):
        refused(capsys, main, ["--preset", "demo", "--out", tmp_path / "file", "--dry_run"],
                "--out", "is a file; expected a folder")  # was: '[Errno 20] Not a directory: .../work'
    refused(capsys, denoiser_comparison.main, ["--preset", "demo", "--dry_run", "--train_seed", "-1"],
            "--train_seed must be >= 0")


def test_diagnose_blocks_inputs(capsys, tiny, tmp_path):
    data, mdir, _ = tiny
    run = tmp_path / "run"
    run.mkdir()
    kw = {k: v for k, v in te.MODEL_KW.items() if k != "diffusion_steps"}
    record = {"model": ModelConfig(**kw).to_dict(),
              "diffusion": DiffusionConfig(diffusion_steps=40).to_dict()}
    (run / "run_config.json").write_text(json.dumps(record))
    (tmp_path / "file").write_text("x")
    out, nope, diag = tmp_path / "out", tmp_path / "nope", block_diagnosis.main

    def argv(model_dir, *extra):
        return ["--model_dir", model_dir, "--data_dir", data, "--out", out, "--slices", "4", "--timesteps",
                "5", "15", *extra]

    refused(capsys, diag, argv(nope), f"--model_dir {nope} does not exist")
    refused(capsys, diag, argv(mdir), "--model_dir", "holds no run_config.json")
    refused(capsys, diag, argv(run), f"--model_dir {run} holds no checkpoints")
    (run / "model000010.pt").write_bytes((mdir / "model000010.pt").read_bytes())
    refused(capsys, diag, argv(run, "--steps", "10", "7"), "--steps 7: no checkpoint for this step",
            "steps present: 10")
    refused(capsys, diag, argv(run, "--slices", "0"), "--slices must be >= 1")
    refused(capsys, diag, argv(run, "--slices", "9"), "--slices 9 is more than the 8 slices")
    refused(capsys, diag, argv(run, "--timesteps", "5", "40"), "--timesteps 40", "40 steps")
    refused(capsys, diag, argv(run, "--ema", "True"), "--ema True", "no EMA checkpoint")
    refused(capsys, diag, [*argv(run), "--data_dir", nope], f"--data_dir {nope} does not exist")
    refused(capsys, diag, [*argv(run), "--out", tmp_path / "file"], "--out", "is a file")
    refused(capsys, diag, ["--data_dir", data, "--out", out], "--model_dir is required")
    assert not out.exists()


@pytest.mark.parametrize("extra,text", [
    (["--rows", "v2", "hae_v3"], "--rows: unknown row 'hae_v3'; expected some of v2, hae,"),
    (["--rows", "hae_v2", "hae_v2_b0.25"], "--rows lists hae_v2 twice (hae_v2_b0.25 is hae_v2)"),
    (["--rows", "v2", "v2"], "--rows lists v2 twice"),
    (["--train_seeds", "0", "1", "0"], "--train_seeds has repeated values [0, 1, 0]"),
    (["--train_seeds", "-3"], "--train_seeds must be >= 0"),
    (["--train_seeds", "0", "--train_seed", "1"], "--train_seed and --train_seeds: give one of them"),
])
def test_denoiser_rows_and_train_seeds(capsys, tmp_path, extra, text):
    """Unknown or repeated rows and repeated training seeds: refused before anything runs or is written."""
    out = tmp_path / "out"
    refused(capsys, denoiser_comparison.main, ["--preset", "smoke", "--out", out, *extra], text)
    assert not out.exists()


@pytest.mark.parametrize("extra,text", [
    (["--unet_ver", "nope"], "unknown --unet_ver 'nope'"),  # was: a traceback after building the data
    (["--w", "-1"], "--w must be >= 0"),
    (["--num_slices", "0"], "--num_slices must be >= 1"),  # was: 0 read as 'all slices'
    (["--label_dropout", "2"], "--label_dropout must be <= 1.0"),
    (["--forward_steps", "60"], "--forward_steps 60 must be < the 50 steps of --timestep_respacing 50"),
    (["--image_size", "20"], "image_size=20"),
    (["--subjects", "0"], "--subjects must be >= 3"),
])
def test_main_job_checks_every_stage_before_the_first(capsys, tmp_path, extra, text):
    refused(capsys, main_job.main, ["--out", tmp_path / "job", *extra], text)
    assert not (tmp_path / "job").exists()


def test_main_job_stage_failure_ends_without_traceback(tmp_path):
    data = tmp_path / "job" / "data"  # a dataset of 16 px slices: train.py refuses --image_size 32
    te.make_split(data, "train", {"T0": [False, True]}, seed=1)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, str(REPO / "scripts/run_main_job.py"), "--out", str(tmp_path / "job"),
           "--train", "--train_steps", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "--image_size 32 does not match the data" in errors[0]
    assert errors[-1].startswith("error: scripts/train.py exited with status 2")


# ------------------------------------------------------------------------------------ classifier
@pytest.mark.parametrize("extra,text", [
    (["--lr", "nan"], "--lr must be a finite number"),  # was: torch's 'Invalid learning rate: nan'
    (["--weight_decay", "-1"], "--weight_decay must be >= 0.0"),
    (["--log_interval", "0"], "--log_interval must be >= 1"),  # was: ZeroDivisionError traceback
    (["--save_interval", "0"], "--save_interval must be >= 1"),
    (["--num_workers", "-1"], "--num_workers must be >= 0"),
    (["--device", "tpu"], "--device 'tpu': expected cpu, cuda or cuda:N"),  # was: RuntimeError traceback
])
def test_classifier_flags(capsys, tmp_path, extra, text):
    argv = ["--data_dir", tmp_path, "--log_dir", tmp_path / "clf", "--max_steps", "1", *extra]
    refused(capsys, classifier_training.main, argv, text)
    assert not (tmp_path / "clf").exists()


def test_classifier_log_dir_and_image_size(capsys, tmp_path):
    data = tmp_path / "data"
    te.make_split(data, "train", {"T0": [False, True]}, seed=1)
    clf = tmp_path / "clf"
    clf.mkdir()
    (clf / "classifier_000010.pt").write_bytes(b"earlier run")
    small = ["--classifier_channel_mult", "1,2", "--classifier_attention_resolutions", "8",
             "--classifier_width", "8", "--classifier_num_head_channels", "8", "--in_channels", "4"]
    base = ["--data_dir", data, "--max_steps", "1", *small]
    refused(capsys, classifier_training.main, [*base, "--log_dir", clf, "--image_size", "16"],
            f"--log_dir {clf} already holds classifier checkpoints (classifier_000010.pt)")
    assert (clf / "classifier_000010.pt").read_bytes() == b"earlier run"
    # was: 'attention pooling was built for 16x16 features' from the first training step
    refused(capsys, classifier_training.main, [*base, "--log_dir", tmp_path / "new", "--image_size", "32"],
            "--image_size 32 does not match the data")


def test_compare_hae_versions_json_folder(capsys, tmp_path):
    # was: every table measured, then '[Errno 21] Is a directory' from the atomic write
    refused(capsys, compare_hae.main, ["--json", tmp_path], f"--json {tmp_path} is a folder")


@pytest.mark.parametrize("env,text", [
    ({"GPU_CHECK_ONLY": "env tran"}, "GPU_CHECK_ONLY names an unknown stage 'tran'"),  # was: all skipped, ok
    ({"TIMED_STEPS": "0"}, "TIMED_STEPS must be a positive integer"),
    ({"INFER_BATCH": "abc"}, "INFER_BATCH must be a positive integer"),
])
def test_gpu_check_environment(tmp_path, env, text):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(REPO / "scripts/gpu_check.sh")], capture_output=True, text=True,
                          env={**os.environ, "OUT": str(out), **env}, timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0]
    assert not out.exists()
