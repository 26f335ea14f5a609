"""Guidance-strength selection (docs/method.md, 'Choosing the guidance strength'; automated):
calibrate every ``--w`` on the validation split in ONE forward pass and pick the largest w whose
validation accuracy (cosine-rule healthy/unhealthy classification) is within ``--selection_tolerance``
(99 %) of the best.

Writes to the log dir (``--log_dir`` or $OPENAI_LOGDIR), atomically:
  guidance_selection.json  chosen w, the rule, one row per w (accuracy, n_min, n_val, thr_01, diff_max),
                           the checkpoint and the forward settings;
  calibration.json         the calibrations of every w, reusable by
                           ``translation_FPDM.py --calibration LOGDIR/calibration.json --w <chosen>``.
Example:
    python scripts/select_guidance.py --data_dir DATA --model_dir LOGS/model --log_dir OUT --ema True \\
        --model_num 210000 --w 1 1.5 2 3 5 --image_size 128 --in_channels 4 --num_channels 128 \\
        --attention_resolutions 32,16,8 --num_slices_val 1000 --batch_size_val 50
"""

import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from guided_diffusion.anofpdm.translation import (
    calibrate_run,
    guidance_selection,
    load_model,
    prepare_inference,
    run_session,
    save_calibrations,
)
from guided_diffusion.anofpdm.translation_flags import create_selection_argparser, parse_run
from guided_diffusion.cli import run_cli
from guided_diffusion.configs.eval_configs import EvalRun
from guided_diffusion.utils import dist_util, logger
from guided_diffusion.utils.io_util import atomic_write_json

create_argparser = create_selection_argparser  # the model / checkpoint / forward / validation flags


def main(argv: Sequence[str] | None = None, overrides: Mapping[str, Any] | None = None) -> dict | None:
    """Parse the flags and run the selection; returns the guidance_selection.json content on rank 0."""
    return select(parse_run(argv, overrides, test_split=False))


def select(run: EvalRun) -> dict | None:
    """Calibrate every w of ``run`` in one (resumable) validation pass and apply the paper's rule.
    Rank 0 holds the run lock on the log dir for the whole run."""
    with run_session(run, kind="guidance selection") as log_dir:
        return _select_in(run, log_dir)


def _select_in(run: EvalRun, log_dir: str) -> dict | None:
    model, diffusion, path, sha = load_model(run.model, run.diffusion, run.checkpoint)
    logger.log(f"loaded {path} (sha256 {sha[:12]}...) on {dist_util.dev()}")
    run, model = prepare_inference(run, model, diffusion)
    cals = calibrate_run(run, model, diffusion, sha, log_dir)
    selection = guidance_selection(cals, run.eval.selection_tolerance)
    out = None
    if dist_util.get_rank() == 0:
        cal_path = os.path.join(log_dir, "calibration.json")
        save_calibrations(cal_path, cals)
        out = {
            **selection,
            "calibration_file": cal_path,
            "checkpoint": path,
            "checkpoint_sha256": sha,
            "forward": run.forward.settings_kwargs(),
            "compile": run.eval.compile,
            "num_slices_val": run.eval.num_slices_val,
            "n_val": next(iter(cals.values())).n_val,
            "seed": run.eval.seed,
            "config": run.record(),
        }
        atomic_write_json(out, os.path.join(log_dir, "guidance_selection.json"))
        logger.log(
            f"chosen w={selection['chosen_w']:g}; segment with translation_FPDM.py "
            f"--w {selection['chosen_w']:g} --calibration {cal_path} (same model and forward flags)"
        )
    dist_util.barrier()
    return out


if __name__ == "__main__":
    sys.exit(run_cli(main))
