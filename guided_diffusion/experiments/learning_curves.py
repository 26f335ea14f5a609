"""Learning curves of an AnoFPDM model (issue 21 item 1): train a configuration and, every ``--eval_every``
K steps, measure the checkpoint on the first ``--eval_slices`` N slices of the validation and test splits.

Training is the training library itself (``training.train``, the flags of scripts/train.py): the run is
trained in chunks of K steps in ``--log_dir``, each chunk resuming exactly from the previous checkpoint
(train_util.TrainLoop), so the weights equal those of one uninterrupted run. Per checkpoint and split:

* ``loss``: the training loss (``diffusion.training_losses`` "loss", true label, no label dropout) averaged
  over ``--loss_draws`` (t, noise) pairs per slice, drawn from a generator seeded by (eval seed, split,
  slice index), so every checkpoint sees the same draws;
* ``cond_healthy`` / ``cond_unhealthy``: the strength of the learned conditioning, the mean over
  ``--cond_steps`` evenly spaced t of the training chain of mean_pixels (eps(x_t, healthy) - eps(x_t,
  null))^2, averaged over the healthy / unhealthy slices (x_t from seeded noise as above);
* AnoFPDM at the calibrated w, with the evaluation pipeline's own functions: ``anofpdm.run_forward_process``
  per batch (noise from ``anofpdm.pipeline.slice_generators``, as scripts/translation_FPDM.py),
  ``calibration.calibrate`` per ``--eval_w`` on the validation statistics and ``calibration.
  choose_primary_w`` (the paper's rule), ``segmentation.segment`` (test split: ``translation.
  process_batch``), ``evaluator.SegmentationEvaluator``: ``image_accuracy`` / ``image_recall`` /
  ``image_specificity``, unhealthy ``dice`` (mean per slice), ``dice_pooled`` and pixel ``auprc``
  (foreground pixels of the unhealthy slices). The validation numbers are in-sample (the calibration's own
  slices); the test numbers equal translation_FPDM.py's metrics.json for the same checkpoint and settings;
* ``te_inside``: the share of slices whose t_e (max over the modalities, as slices.csv) lies strictly
  inside the forward window, 0 < t_e < forward_steps - 1 (t_e at the last step: M_t still rising).

Outputs (``--curves_dir``, default LOG_DIR/curves): curves.json (settings + one row per evaluated step,
keyed by the checkpoint's sha256; rewritten atomically after every row) and curves.png. A rerun continues:
rows whose checkpoint is unchanged are kept, training resumes from the newest checkpoint; other settings
are refused naming them. Single process (CPU or one GPU). The measurements live in
``guided_diffusion.experiments.learning_curves_eval``.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from guided_diffusion.cli import ArgumentParser
from guided_diffusion.configs.base import (
    RESULT,
    DiffusionConfig,
    ModelConfig,
)
from guided_diffusion.configs.config_flags import add_flags, from_args
from guided_diffusion.configs.curves_config import CurvesConfig
from guided_diffusion.configs.train_config import parse_ema_rates
from guided_diffusion.experiments.experiments import described_differences
from guided_diffusion.experiments.learning_curves_eval import (
    conditioning_strength,
    denoising_loss,
    evaluate_checkpoint,
)
from guided_diffusion.nn import cpu_fused_attention
from guided_diffusion.reporting.plots import _pyplot, _save
from guided_diffusion.script_util import model_config
from guided_diffusion.training import run as training
from guided_diffusion.training.checkpoint import find_checkpoint, list_checkpoints
from guided_diffusion.training.train_resume import RUN_CHANGING_TRAIN_KEYS
from guided_diffusion.training.training_flags import build_arg_parser, parse_configs_for_training
from guided_diffusion.utils.io_util import atomic_write_json, file_sha256
from guided_diffusion.utils.run_lock import run_lock

__all__ = ["CurvesConfig", "conditioning_strength", "denoising_loss", "evaluate_checkpoint", "main",
           "run_curves", "schedule"]

CURVES_VERSION = 1
CURVES_JSON, CURVES_PNG = "curves.json", "curves.png"
METRICS = ("loss", "cond_healthy", "cond_unhealthy", "image_accuracy", "image_recall", "image_specificity",
           "dice", "dice_pooled", "auprc", "te_inside")


def run_settings(m: ModelConfig, d: DiffusionConfig, t: Any, c: CurvesConfig) -> dict[str, Any]:
    """Everything a row depends on besides the checkpoint: the architecture, the diffusion, the run-changing
    training flags, the data and the evaluation flags (not --max_steps: a rerun may train longer)."""

    train = t.to_dict()
    curves = {k: v for k, v in c.to_dict().items() if k in c.settings(RESULT)}
    return json.loads(json.dumps({
        "model": model_config(m, d),
        "diffusion": d.to_dict(),
        "train": {k: train[k] for k in RUN_CHANGING_TRAIN_KEYS},
        "data_dir": os.path.abspath(t.data_dir),
        "curves": curves,
    }))



def load_curves(path: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The curves file at ``path`` (a new one when absent); ValueError naming every setting that differs."""
    if not os.path.isfile(path):
        return {"version": CURVES_VERSION, "settings": dict(settings), "rows": []}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        stored, rows = data["settings"], list(data["rows"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a curves file ({type(err).__name__}: {err}); move it away or use "
                         "another --curves_dir") from None
    diffs = described_differences(stored, settings)
    if diffs:
        raise ValueError(f"{path} was computed with other settings ({'; '.join(diffs)}); rerun with the "
                         "stored settings or use another --curves_dir / --log_dir")
    return {"version": CURVES_VERSION, "settings": stored, "rows": rows}


def schedule(eval_every: int, max_steps: int) -> list[int]:
    """The evaluated steps: K, 2K, ... and ``max_steps``."""
    steps = list(range(eval_every, max_steps + 1, eval_every))
    if not steps or steps[-1] != max_steps:
        steps.append(max_steps)
    return steps


# ---------------------------------------------------------------------------------------------- plot
PANELS = (("denoising loss", ("loss",)), ("conditioning strength", ("cond_healthy", "cond_unhealthy")),
          ("image level", ("image_accuracy", "image_recall", "image_specificity")),
          ("segmentation (unhealthy slices)", ("dice", "dice_pooled", "auprc")),
          ("t_e inside the window", ("te_inside",)))


def write_png(data: Mapping[str, Any], path: str, title: str = "") -> None:
    """curves.png: one panel per group of METRICS against the training step; test solid, validation dashed."""

    rows = sorted(data["rows"], key=lambda r: r["step"])
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(PANELS), figsize=(3.4 * len(PANELS), 3.0), squeeze=False)
    steps = [r["step"] for r in rows]
    for ax, (name, keys) in zip(axes[0], PANELS):
        for j, key in enumerate(keys):
            for split, style in (("test", "-"), ("val", "--")):
                ys = [np.nan if r[split].get(key) is None else r[split][key] for r in rows]
                ax.plot(steps, ys, style, marker="o", ms=3, color=f"C{j}", label=f"{key} ({split})")
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("training step", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.legend(fontsize=5)
    fig.suptitle(title or "learning curves (scripts/learning_curves.py)", fontsize=8, y=1.04)
    _save(fig, path)


# ---------------------------------------------------------------------------------------------- driver
def _newest_step(log_dir: str) -> int:
    steps = list_checkpoints(log_dir)
    return steps[-1] if steps else 0


def _checked(m: ModelConfig, t: Any, c: CurvesConfig) -> None:
    if not t.log_dir:
        raise ValueError("--log_dir is required: the learning curves train and resume there")
    if t.max_steps <= 0:
        raise ValueError("--max_steps is required (> 0): the curves run from --eval_every to --max_steps")
    if t.resume != "auto" or t.resume_checkpoint:
        raise ValueError("--resume never / --resume_checkpoint are not supported: the learning curves "
                         "continue their own --log_dir; use a new --log_dir for a fresh run")
    if not m.num_classes:
        raise ValueError("--num_classes 0: the AnoFPDM evaluation needs a class-conditional model "
                         "(--num_classes 2)")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("learning_curves.py runs as one process (CPU or one GPU), not under torchrun")
    if c.modality and max(c.modality) >= m.in_channels:
        raise ValueError(f"--modality {list(c.modality)}: channel indices must be < --in_channels "
                         f"{m.in_channels}")


def run_curves(m: ModelConfig, d: DiffusionConfig, t: Any, c: CurvesConfig) -> dict[str, Any]:
    """Train in chunks of --eval_every steps and evaluate each chunk's checkpoint (resumable); returns the
    curves data (also written to curves.json / curves.png)."""

    _checked(m, t, c)
    out = c.curves_dir or os.path.join(t.log_dir, "curves")
    path, png = os.path.join(out, CURVES_JSON), os.path.join(out, CURVES_PNG)
    ema_rate = parse_ema_rates(t.ema_rate)[0]
    with run_lock(out, "--curves_dir"):
        data = load_curves(path, run_settings(m, d, t, c))
        done = {int(r["step"]): r for r in data["rows"]}
        for step in schedule(c.eval_every, t.max_steps):
            ckpt = _checkpoint_path(t.log_dir, step, c.eval_ema, ema_rate)
            if step in done and ckpt is not None and _sha(ckpt) == done[step]["checkpoint_sha256"]:
                continue
            if step in done and ckpt is None:
                continue  # the checkpoint was removed after its row was computed: keep the row
            if step in done:
                raise ValueError(f"{ckpt} changed since its row in {path} was computed (sha256 differs); "
                                 "use another --curves_dir")
            if _newest_step(t.log_dir) < step:
                training.train(m, d, t.replace(max_steps=step))
                if _newest_step(t.log_dir) < step:
                    print(f"training stopped at step {_newest_step(t.log_dir)} (--total_epochs) before step "
                          f"{step}; the curves end there", flush=True)
                    break
            if _checkpoint_path(t.log_dir, step, c.eval_ema, ema_rate) is None:
                raise FileNotFoundError(f"no checkpoint for step {step} in {t.log_dir} (newer ones exist); "
                                        "learning curves need the checkpoints of every --eval_every step")
            with cpu_fused_attention(t.cpu_fused_attention):
                row = evaluate_checkpoint(m, d, c, t.data_dir, t.log_dir, step, ema_rate)
            data["rows"] = sorted([*(r for r in data["rows"] if int(r["step"]) != step), row],
                                  key=lambda r: r["step"])
            atomic_write_json(data, path)
            print(f"step {step}: " + " ".join(f"{k}={row['test'][k]:.4g}" for k in METRICS
                                               if row["test"].get(k) is not None), flush=True)
        atomic_write_json(data, path)
        if data["rows"]:
            write_png(data, png, title=f"learning curves of {t.log_dir}")
    print(f"wrote {path} and {png}", flush=True)
    return data


def _checkpoint_path(log_dir: str, step: int, ema: bool, ema_rate: str) -> str | None:
    try:
        return find_checkpoint(log_dir, step=step, ema_rate=ema_rate if ema else None)
    except FileNotFoundError:
        return None


def _sha(path: str) -> str:
    return file_sha256(path)


def parse(argv: Sequence[str]) -> tuple[ModelConfig, DiffusionConfig, Any, CurvesConfig] | None:
    """The training configs (scripts/train.py's flags) and the CurvesConfig; None after --help."""

    parser = ArgumentParser(prog="learning_curves.py", add_help=False, allow_abbrev=False,
                            description="Learning curves: train (scripts/train.py's flags) and evaluate "
                            "every --eval_every steps")
    add_flags(parser, CurvesConfig)
    argv = list(argv)
    if "-h" in argv or "--help" in argv:
        parser.print_help()
        print("\nTraining flags (as scripts/train.py):")
        build_arg_parser().print_help()
        return None
    ns, rest = parser.parse_known_args(argv)
    c = from_args(CurvesConfig, ns)
    m, d, t = parse_configs_for_training(rest)
    return m, d, t, c


def main(argv: Sequence[str] | None = None) -> int:
    """scripts/learning_curves.py: parse the flags, train and evaluate (errors: see cli.run_cli)."""

    parsed = parse(sys.argv[1:] if argv is None else argv)
    if parsed is not None:
        run_curves(*parsed)
    return 0
