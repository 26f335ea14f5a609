"""The paper's Table 1 (Che et al., WACV-W 2025) in one command: AnoFPDM against the comparison methods.

Rows: AnoDDPM (G) and (S) (unconditional models on healthy slices, Gaussian / simplex noise), DDIM +
classifier guidance (learn_sigma model + noise-aware classifier), DDIM + classifier-free guidance (the
AnoFPDM model), AnoFPDM (DDIM), (DDPM), (DDIM S_te), (DDPM S_te), FLAIR intensity. Models are trained once
per method (``experiments.train_once``, keyed by their settings) and reused. The comparison rows tune
(L, s or w, threshold) on validation slices with PIXEL LABELS (table1_methods.tune_method, one "tune_*" row
per method; objective: the Dice pooled over the unhealthy validation slices) and are evaluated in this
process; AnoFPDM stays label-free and runs as scripts/translation_FPDM.py (its own validation calibration).
Every (row, seed) is resumable and never reused under other settings (``experiments.run_rows``). Outputs
in ``--out``: table1.md / .csv / .json (mean ± std over the evaluation seeds), fig4_panel.png, rows/,
work/, models/, data/.

Presets: ``smoke`` (tests; 16 px, 8 channels, a few steps and slices), ``demo`` (the embedded synthetic
data on a 2-core CPU, 32 px, 16 channels), ``paper`` (BraTS21 or ATLAS v2.0 with ``--dataset atlas``:
128 px, 1000 steps, 600 forward steps, the paper's model sizes; needs --data_dir; the train and AnoFPDM
commands go through ``--launcher``, e.g. torchrun; config/run_table1_{brats,atlas}.sh).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Callable, Mapping
from typing import Any

import torch

from guided_diffusion.cli import ArgumentParser
from guided_diffusion.experiments import denoiser_comparison as dc
from guided_diffusion.experiments import experiments as ex
from guided_diffusion.experiments.table1_rows import (
    ANOFPDM_ROWS,
    anofpdm_command,
    build_rows,
    panel_and_tables,
)
from guided_diffusion.utils.io_util import file_sha256

_MODEL_COMMON = dc._MODEL_COMMON
PRESETS: dict[str, dict[str, Any]] = {
    "smoke": dict(
        model=dict(_MODEL_COMMON, image_size=16, num_channels=8, channel_mult="1,2",
                   attention_resolutions="8", num_heads=2),
        classifier=dict(classifier_width=8, classifier_depth=1, classifier_attention_resolutions="8",
                        classifier_channel_mult="1,2", classifier_num_head_channels=8),
        data=dict(subjects=4, slice_step=12), train_steps=3, classifier_steps=3, batch_size=4, lr=5e-4,
        ema_rate="0.9", label_dropout=0.2, timestep_respacing="10", forward_steps=4, w=[1.0, 3.0],
        eval_seeds=[0, 1, 2], num_slices=6, num_slices_val=6, eval_batch=16, save_interval=3,
        anoddpm_levels=[2], clf_levels=[2], clf_scales=[1.0, 10.0], cfg_levels=[2], cfg_w=[1.0, 3.0],
        thresholds=21, simplex_frequency=8.0, panel_slices=3, comparison_unet="v1"),
    "demo": dict(
        model=dict(_MODEL_COMMON, image_size=32, num_channels=16, channel_mult="1,2,2",
                   attention_resolutions="16,8", num_heads=4),
        classifier=dict(classifier_width=16, classifier_depth=1, classifier_attention_resolutions="8",
                        classifier_channel_mult="1,2,2", classifier_num_head_channels=16),
        # as the denoiser comparison's demo: 500 steps, a 25-step chain, 15 forward steps (60 %)
        data=dict(subjects=20, slice_step=2), train_steps=500, classifier_steps=500, batch_size=16,
        lr=5e-4, ema_rate="0.995", label_dropout=0.2, timestep_respacing="25", forward_steps=15,
        w=[3.0, 6.0, 10.0, 15.0, 20.0], eval_seeds=[0, 1, 2], num_slices=None, num_slices_val=None,
        eval_batch=32, save_interval=250,
        # levels in steps of the 25-step chain: 5 and 8 ~ upstream's 200 / 300 of 1000
        anoddpm_levels=[5, 8], clf_levels=[5, 10], clf_scales=[10.0, 50.0], cfg_levels=[5, 10],
        cfg_w=[3.0, 10.0], thresholds=101, simplex_frequency=16.0, panel_slices=6, comparison_unet="v1"),
    "paper": dict(
        model=dict(_MODEL_COMMON, image_size=128, num_channels=128, channel_mult="",
                   attention_resolutions="32,16,8", num_heads=4, dropout=0.1),
        classifier=dict(classifier_width=128, classifier_depth=2, classifier_attention_resolutions="32,16,8",
                        classifier_channel_mult="", classifier_num_head_channels=64),
        data=None, train_steps=210000, classifier_steps=20000, batch_size=64, lr=1e-4, ema_rate="0.9999",
        label_dropout=0.1, timestep_respacing="", forward_steps=600, w=[1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0],
        eval_seeds=[0, 1, 2], num_slices=None, num_slices_val=1000, eval_batch=50, save_interval=5000,
        anoddpm_levels=[200, 300], clf_levels=[200, 300, 400], clf_scales=[10.0, 50.0, 100.0],
        cfg_levels=[200, 300, 400], cfg_w=[1.0, 2.0, 3.0], thresholds=101, simplex_frequency=64.0,
        panel_slices=8, comparison_unet="v1"),
}
ROWS = ("anoddpm_gaussian", "anoddpm_simplex", "ddim_classifier", "ddim_cfg", *ANOFPDM_ROWS, "flair")
# model key -> the rows that need it
MODEL_USERS = {"fpdm": ("ddim_cfg", *ANOFPDM_ROWS), "anoddpm_gaussian": ("anoddpm_gaussian",),
               "anoddpm_simplex": ("anoddpm_simplex",), "clf_model": ("ddim_classifier",),
               "classifier": ("ddim_classifier",)}


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    p.add_argument("--out", default=None, help="output folder (default runs/table1_<preset>)")
    p.add_argument("--data_dir", default=None, help="preprocessed data root (default: build the synthetic "
                   "dataset in OUT/data; required for --preset paper)")
    p.add_argument("--dataset", choices=["brats", "atlas"], default="brats",
                   help="atlas: T1 only (1 channel, --modality 0, no FLAIR row, the paper's w = 30)")
    p.add_argument("--rows", nargs="+", choices=ROWS, default=None, help="rows to compute (default all)")
    p.add_argument("--eval_seeds", type=int, nargs="+", default=None, help="default: the preset's (0 1 2)")
    p.add_argument("--train_steps", type=int, default=None, help="override the preset's training steps")
    p.add_argument("--w", type=float, nargs="+", default=None, help="override AnoFPDM's w list")
    p.add_argument("--num_slices", type=int, default=None, help="first N test slices (default: preset's)")
    p.add_argument("--recompute", action="store_true",
                   help="recompute rows stored under other settings (default: refuse with the differences)")
    p.add_argument("--launcher", default="", help="prefix of the train / AnoFPDM commands, e.g. "
                   "'python -m torch.distributed.run --nproc-per-node 8' (default: plain python)")
    p.add_argument("--threads", type=int, default=0, help="OMP threads per process (0: leave as is)")
    p.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    return p


def resolve(options: Mapping[str, Any]) -> dict[str, Any]:
    """The preset with the dataset and command-line overrides (``build_parser``'s options as a dict)
    applied and checked."""
    o = dict(options)
    cfg = json.loads(json.dumps(PRESETS[o["preset"]]))
    for key in ("eval_seeds", "train_steps", "w", "num_slices"):
        if o.get(key) is not None:
            cfg[key] = o.get(key)
    cfg["modality"] = [0, 3]
    rows = list(o.get("rows") or ROWS)
    if o.get("dataset") == "atlas":
        cfg["model"]["in_channels"], cfg["modality"] = 1, [0]
        if o.get("w") is None:
            cfg["w"] = [30.0]
        if "flair" in rows:
            if o.get("rows"):
                raise ValueError("--rows flair: --dataset atlas has no FLAIR channel (T1 only)")
            rows.remove("flair")
        if cfg["data"] is not None:
            raise ValueError(f"--dataset atlas needs --preset paper (the synthetic data of --preset "
                             f"{o['preset']} has 4 modalities)")
    if cfg["train_steps"] < 1:
        raise ValueError(f"--train_steps must be >= 1, got {cfg['train_steps']}")
    if len(set(cfg["eval_seeds"])) != len(cfg["eval_seeds"]):
        raise ValueError(f"--eval_seeds has repeated values {cfg['eval_seeds']}")
    ex.check_run_options(cfg, o)
    if cfg["data"] is None and not o.get("data_dir"):
        raise ValueError(f"--preset {o['preset']} needs --data_dir (the preprocessed BraTS21 / ATLAS root)")
    data_dir = o.get("data_dir")
    if data_dir and not o.get("dry_run") and not os.path.isdir(os.path.join(data_dir, "data_splits")):
        raise FileNotFoundError(f"--data_dir {data_dir} has no data_splits/: not a preprocessed data root")
    cfg["save_interval"] = min(cfg["save_interval"], cfg["train_steps"])
    cfg["rows"] = [r for r in ROWS if r in rows]
    return cfg


# ---------------------------------------------------------------------------------------------- commands
def train_commands(cfg: Mapping[str, Any], data_dir: str, prefix: list[str]) -> dict[str, Any]:
    """{model key: (settings, command builder log_dir -> argv)} of the models the selected rows need."""
    comp = cfg["comparison_unet"]
    uncond = {**cfg, "model": {**cfg["model"], "num_classes": 0}, "label_dropout": -1}
    healthy = ["--mixed", "False", "--n_unhealthy_patients", "0", "--ret_lab", "False"]
    extra = {
        "fpdm": ("v2", cfg, []),
        "anoddpm_gaussian": (comp, uncond, [*healthy, "--noise_type", "gaussian"]),
        "anoddpm_simplex": (comp, uncond, [*healthy, "--noise_type", "simplex", "--simplex_frequency",
                                           f"{cfg['simplex_frequency']:g}"]),
        "clf_model": (comp, uncond, ["--ret_lab", "False", "--learn_sigma", "True"]),
    }
    out: dict[str, Any] = {}
    needed = {k for k, users in MODEL_USERS.items() if set(users) & set(cfg["rows"])}
    base = {"model": cfg["model"], "timestep_respacing": cfg["timestep_respacing"],
            **{k: cfg[k] for k in ("train_steps", "batch_size", "lr", "ema_rate", "label_dropout")}}
    for key, (ver, c, flags) in extra.items():
        if key in needed:
            settings = {**base, "unet_ver": ver, "num_classes": c["model"]["num_classes"],
                        "label_dropout": c["label_dropout"], "extra_flags": flags}
            out[key] = (settings, lambda d, v=ver, c=c, f=flags: [
                *dc.train_command(c, dc.NetworkRow(v, v), data_dir, d, 0, prefix), *f])
    if "classifier" in needed:
        settings = {"classifier": cfg["classifier"], "image_size": cfg["model"]["image_size"],
                    "in_channels": cfg["model"]["in_channels"], "steps": cfg["classifier_steps"],
                    "batch_size": cfg["batch_size"]}
        out["classifier"] = (settings, lambda d: [
            sys.executable, "scripts/train_classifier.py", "--data_dir", data_dir, "--log_dir", d,
            *dc._flags(cfg["classifier"]), "--image_size", str(cfg["model"]["image_size"]),
            "--in_channels", str(cfg["model"]["in_channels"]), "--max_steps", str(cfg["classifier_steps"]),
            "--save_interval", str(cfg["classifier_steps"]), "--batch_size", str(cfg["batch_size"]),
            "--log_interval", "100", "--seed", "0"])
    return out


def train_classifier_once(settings: Mapping[str, Any], cmd: Callable[[str], list[str]], models_dir: str,
                          steps: int, env: Mapping[str, str]) -> tuple[str, str]:
    """train_once for scripts/train_classifier.py (its checkpoint is classifier_<step>.pt)."""
    fp = ex.fingerprint({"name": "classifier", "settings": settings})
    log_dir = os.path.join(models_dir, f"classifier-{fp[:12]}")
    ckpt = os.path.join(log_dir, f"classifier_{steps:06d}.pt")
    if os.path.isfile(ckpt):
        print(f"[train] classifier: {ckpt} exists, reused")
        return log_dir, ckpt
    os.makedirs(log_dir, exist_ok=True)
    ex.run_command(cmd(log_dir), str(dc.REPO), env)
    if not os.path.isfile(ckpt):
        raise RuntimeError(f"classifier training finished without writing {ckpt}")
    return log_dir, ckpt


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = resolve(vars(args))
    out = os.path.abspath(args.out or f"runs/table1_{args.preset}")
    pypath = os.pathsep.join(filter(None, [str(dc.REPO), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=pypath)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)  # the rows evaluated in this process
    prefix = shlex.split(args.launcher) if args.launcher else [sys.executable]
    data_dir = os.path.abspath(args.data_dir) if args.data_dir else os.path.join(out, "data")
    command = "python scripts/run_table1.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    trains = train_commands(cfg, data_dir, prefix)
    if args.dry_run:
        for key, (_, cmd) in trains.items():
            print(shlex.join(cmd(os.path.join(out, "models", f"{key}-<fingerprint>"))))
        for row in (r for r in cfg["rows"] if r in ANOFPDM_ROWS):
            for seed in cfg["eval_seeds"]:
                ev = os.path.join(out, "work", f"{row}_seed{seed}-<fingerprint>", "eval")
                model_dir = os.path.join(out, "models", "fpdm-<fingerprint>")
                print(shlex.join(anofpdm_command(cfg, row, data_dir, model_dir, ev, seed, prefix)))
        rest = [r for r in cfg["rows"] if r not in ANOFPDM_ROWS]
        if rest:
            print(f"# then in this process: tune on validation slices with pixel labels and evaluate "
                  f"{', '.join(rest)} (seeds {cfg['eval_seeds']})")
        return 0
    if not args.data_dir:
        dc.build_synthetic(data_dir, cfg, env)
    data_id = dc.data_identity(data_dir)
    if not args.recompute:
        ex.refuse_rows_on_other_data(out, data_dir, data_id)
    models: dict[str, tuple[str, str]] = {}
    for key, (settings, cmd) in trains.items():
        settings = {**settings, "data_dir": data_dir, "data_sha256": data_id}
        if key == "classifier":
            models[key] = train_classifier_once(settings, cmd, os.path.join(out, "models"),
                                                cfg["classifier_steps"], env)
        else:
            models[key] = ex.train_once(key, cmd, settings, os.path.join(out, "models"), cfg["train_steps"],
                                        cfg["ema_rate"], str(dc.REPO), env)
    shas = {k: file_sha256(ckpt) for k, (_, ckpt) in models.items()}

    base = {"preset": args.preset, "dataset": args.dataset, "data_dir": data_dir, "data_sha256": data_id}
    records = build_rows(cfg, base, models, shas, out, data_dir, prefix, env, args.recompute)
    prov = {"command": command, "preset": args.preset, "dataset": args.dataset, "settings": cfg,
            "checkpoint_sha256": shas, "model_dirs": {k: v[0] for k, v in models.items()}}
    panel_and_tables(cfg, records, out, data_dir, prov)
    return 0
