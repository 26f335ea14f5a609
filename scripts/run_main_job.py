"""The main job, end to end, on the embedded synthetic dataset (the README's first Quickstart command).

By default it shows the method at work with the model shipped in ``models/`` (HAE V2 trained with the
recipe of the README's "Learning curves and the recipe"):
  1. build the synthetic BraTS-like dataset    scripts/make_synthetic_brats.py
  2. segment the test split with the shipped export: its network, diffusion, forward settings and
     calibration come from the export folder     scripts/translation_FPDM.py --model_dir models/...
     (on another CPU type than the export's the synthetic data differ in the last bits, so the export's
     calibration does not apply and the validation split is calibrated again: about a minute)
and prints its metrics beside the FLAIR-threshold baseline of the same split (a few minutes on 2 cores).

``--train`` trains the recipe from scratch instead (scripts/train.py; 46 minutes on 2 cores for the
shipped model's steps) and evaluates that model the same way: on the same CPU type it reproduces the
shipped model's metrics bit for bit. Rerunning a command continues where a killed run stopped. The
paper-scale path (128 px, 600 forward steps, BraTS21) is the launchers in config/.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from guided_diffusion.anofpdm.translation_flags import parse_run
from guided_diffusion.cli import ArgumentParser, run_cli
from guided_diffusion.configs.base import require, require_finite
from guided_diffusion.configs.recipe import RECIPE_DATA, RECIPE_EVAL, RECIPE_MODEL, RECIPE_STEPS, RECIPE_TRAIN
from guided_diffusion.data.synthetic import check_build_options
from guided_diffusion.script_util import create_from_configs
from guided_diffusion.training.training_flags import parse_configs_for_training

REPO = Path(__file__).resolve().parents[1]
SHIPPED_MODEL = REPO / "models" / "hae_v2_synth32"


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/quickstart", help="folder for data, checkpoints and the report")
    p.add_argument("--model", default=str(SHIPPED_MODEL),
                   help="export folder to evaluate (scripts/export_model.py); ignored with --train")
    p.add_argument("--train", action="store_true",
                   help="train the recipe from scratch into OUT/train and evaluate that model instead")
    p.add_argument("--subjects", type=int, default=RECIPE_DATA["subjects"],
                   help="synthetic subjects (train/val/test 75/5/20)")
    p.add_argument("--image_size", type=int, default=RECIPE_DATA["image_size"])
    p.add_argument("--slice_step", type=int, default=RECIPE_DATA["slice_step"],
                   help="keep every N-th axial slice (synthetic data)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--unet_ver", default="hae_v2", help="v2 | hae | hae_lite | hae_v2 (with --train)")
    p.add_argument("--num_channels", type=int, default=RECIPE_MODEL["num_channels"])
    p.add_argument("--channel_mult", default=RECIPE_MODEL["channel_mult"])
    p.add_argument("--attention_resolutions", default=RECIPE_MODEL["attention_resolutions"])
    p.add_argument("--train_steps", type=int, default=RECIPE_STEPS)
    p.add_argument("--batch_size", type=int, default=RECIPE_TRAIN["batch_size"])
    p.add_argument("--lr", type=float, default=RECIPE_TRAIN["lr"])
    p.add_argument("--label_dropout", type=float, default=RECIPE_TRAIN["label_dropout"],
                   help="--threshold of train.py (paper: 0.1)")
    p.add_argument("--ema_rate", default=RECIPE_TRAIN["ema_rate"],
                   help="short runs need a faster EMA than the paper's 0.9999")
    p.add_argument("--timestep_respacing", default=RECIPE_EVAL["timestep_respacing"],
                   help="inference chain (of 1000 training steps)")
    p.add_argument("--forward_steps", type=int, default=RECIPE_EVAL["forward_steps"],
                   help="forward steps of the respaced chain (30 of 50 = the paper's 600 of 1000)")
    p.add_argument("--w", type=float, nargs="+", default=list(RECIPE_EVAL["w"]),
                   help="guidance strengths to calibrate; the paper's rule picks one (one forward pass)")
    p.add_argument("--num_slices", type=int, default=None, help="first N test slices (default: all)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per process (0: all cores)")
    return p


def model_flags(args: argparse.Namespace) -> list[str]:
    """The network and diffusion flags of the recipe (train.py and translation_FPDM.py share them)."""
    return [
        "--image_size", str(args.image_size), "--in_channels", str(RECIPE_MODEL["in_channels"]),
        "--num_classes", str(RECIPE_MODEL["num_classes"]), "--num_channels", str(args.num_channels),
        "--channel_mult", args.channel_mult, "--attention_resolutions", args.attention_resolutions,
        "--num_heads", str(RECIPE_MODEL["num_heads"]), "--diffusion_steps",
        str(RECIPE_MODEL["diffusion_steps"]), "--noise_schedule", RECIPE_MODEL["noise_schedule"],
        "--unet_ver", args.unet_ver,
    ]


def train_flags(args: argparse.Namespace) -> list[str]:
    """train.py's optimisation flags of the recipe (after the model flags)."""
    return ["--dropout", str(RECIPE_MODEL["dropout"]), "--batch_size", str(args.batch_size),
            "--lr", str(args.lr), "--ema_rate", args.ema_rate, "--threshold", str(args.label_dropout),
            "--max_steps", str(args.train_steps), "--save_interval", "1000", "--log_interval", "100",
            "--seed", str(args.seed)]


def eval_flags(args: argparse.Namespace) -> list[str]:
    """translation_FPDM.py's evaluation flags of the recipe (the shipped export records the same)."""
    return ["--timestep_respacing", args.timestep_respacing, "--ema", "True", "--ema_rate", args.ema_rate,
            "--forward_steps", str(args.forward_steps), "--w", *[str(w) for w in args.w],
            "--modality", "0", "3", "--batch_size", "32", "--batch_size_val", "32", "--seed", str(args.seed)]


class StageFailed(Exception):
    """A stage's command exited non-zero (it printed its own error)."""

    def __init__(self, cmd: list[str], status: int):
        super().__init__(f"{cmd[1] if len(cmd) > 1 else cmd[0]} exited with status {status}")
        self.status = status


def run(cmd: list[str], env: dict) -> None:
    print("$ " + shlex.join(cmd), flush=True)
    status = subprocess.run(cmd, cwd=REPO, env=env).returncode
    if status:
        raise StageFailed(cmd, status)


def check_flags(args: argparse.Namespace, train_argv: list[str], seg_argv: list[str]) -> None:
    """Every flag checked before the first stage starts (ValueError naming this script's flag): a value
    a later stage would refuse must not cost the data build and the training first."""
    check_build_options(args.subjects, args.image_size, args.slice_step, args.seed)
    require(args.train_steps >= 1, f"--train_steps must be >= 1, got {args.train_steps}")
    require_finite("label_dropout", args.label_dropout, 0.0, 1.0)
    require(args.num_slices is None or args.num_slices >= 1,
            f"--num_slices must be >= 1, got {args.num_slices}")
    require(args.threads >= 0, f"--threads must be >= 0, got {args.threads}")
    m, d, _ = parse_configs_for_training(train_argv)  # the flags train.py gets, checked as it checks them
    evaluation = parse_run(seg_argv)
    with torch.device("meta"):  # the network is built (image size vs levels, heads, ...) without memory
        create_from_configs(m, d)
        _, diffusion = create_from_configs(evaluation.model, evaluation.diffusion)
    require(args.forward_steps < diffusion.num_timesteps,
            f"--forward_steps {args.forward_steps} must be < the {diffusion.num_timesteps} steps of "
            f"--timestep_respacing {args.timestep_respacing}")


def flair_baseline(data_dir: Path) -> dict:
    """The FLAIR-threshold baseline of the test split, as the data generator recorded it."""
    summary = json.loads((data_dir / "dataset_summary.json").read_text())
    return summary.get("test", {}).get("flair_baseline", {})


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise NotADirectoryError(f"--out {args.out} is a file; expected a folder")
    try:
        return _main(args)
    except StageFailed as err:  # the stage printed its one line; no traceback of this script on top
        print(f"error: {err} (its message is above); fix it and rerun this command, which continues "
              "where it stopped", file=sys.stderr)
        return err.status


def _main(args: argparse.Namespace) -> int:
    out = Path(args.out).resolve()
    data_dir, train_dir = out / "data", out / "train"
    model = Path(args.model).resolve()
    env = dict(os.environ)
    # the entry points import the package: from this checkout, also without `pip install -e .`
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    py = sys.executable
    train = [py, "scripts/train.py", "--data_dir", str(data_dir), "--log_dir", str(train_dir),
             *model_flags(args), *train_flags(args)]
    seg_trained = [py, "scripts/translation_FPDM.py", "--data_dir", str(data_dir), "--model_dir",
                   str(train_dir), "--log_dir", str(out / "segment"), *model_flags(args), *eval_flags(args)]
    if args.train:
        eval_dir, seg = out / "segment", seg_trained
    else:  # the export brings its network, diffusion, evaluation settings and calibration
        eval_dir = out / "segment_shipped"
        seg = [py, "scripts/translation_FPDM.py", "--data_dir", str(data_dir), "--model_dir", str(model),
               "--log_dir", str(eval_dir)]
    seg += ["--resume", "True", "--save_nifti", "True"]
    if args.num_slices is not None:
        seg += ["--num_slices", str(args.num_slices)]
    check_flags(args, train[2:], seg_trained[2:])
    if not args.train and not (model / "config.json").is_file():
        raise FileNotFoundError(f"--model {model}: no export there (config.json missing); "
                                "give an export folder of scripts/export_model.py, or --train")
    start = time.time()
    stage_times = {}

    t0 = time.time()
    if not (data_dir / "data_splits").is_dir():
        run([py, "scripts/make_synthetic_brats.py", "--out", str(data_dir), "--subjects", str(args.subjects),
             "--seed", str(args.seed), "--image_size", str(args.image_size), "--slice_step",
             str(args.slice_step), "--quiet", "--overwrite"], env)
    stage_times["data_s"] = time.time() - t0

    if args.train:
        t0 = time.time()
        run(train, env)
        stage_times["train_s"] = time.time() - t0

    t0 = time.time()
    run(seg, env)
    stage_times["segment_s"] = time.time() - t0

    metrics = json.loads((eval_dir / "metrics.json").read_text())
    flair = flair_baseline(data_dir)
    total = time.time() - start
    summary = {"model": str(train_dir if args.train else model),
               "wall_time_s": round(total, 1), **{k: round(v, 1) for k, v in stage_times.items()},
               "setting": metrics.get("primary_setting"),
               "unhealthy_dice": metrics["unhealthy"].get("dice"),
               "mixed_dice": metrics["mixed"].get("dice"),
               "unhealthy_auprc": metrics["unhealthy"].get("auprc"),
               "image_accuracy": metrics["image"].get("accuracy"),
               "image_recall": metrics["image"].get("recall"),
               "volume_dice_3d": metrics.get("volume", {}).get("dice_3d_mean"),
               "volume_hd95_mm": metrics.get("volume", {}).get("hd95_mm_mean"),
               "lesion_f1": metrics.get("volume", {}).get("lesion_f1_mean"),
               "flair_dice_best_t": flair.get("best_dice"),
               "flair_auprc": flair.get("auprc")}
    print("\n== main job finished ==")
    for key, value in summary.items():
        print(f"{key:>20}: {value}")
    print("flair_dice_best_t: FLAIR > t with t chosen on the test split itself (an upper bound; "
          "with t tuned on validation the README's Table 1 gives 0.574)")
    print(f"report: {eval_dir / 'panels' / 'index.html'}")
    print(f"metrics: {eval_dir / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
