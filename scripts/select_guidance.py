"""Guidance-strength selection (anofpdm_spec.md §5.8, automated): calibrate every ``--w`` on the validation
split in ONE forward pass and pick the largest w whose validation accuracy (cosine-rule healthy/unhealthy
classification) is within ``--selection_tolerance`` (99 %) of the best.

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

import argparse
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from guided_diffusion import dist_util, logger
from guided_diffusion.io_util import atomic_write_json
from guided_diffusion.translation import (
    add_calibration_flags,
    calibrate_from_args,
    finish_calibration_args,
    guidance_selection,
    load_model,
    run_settings,
    save_calibrations,
)


def create_argparser() -> argparse.ArgumentParser:
    """The model / checkpoint / forward-process / validation flags of translation_FPDM.py."""
    p = argparse.ArgumentParser(
        description="Choose the AnoFPDM guidance strength w on the validation split (paper §4.2 rule)"
    )
    return add_calibration_flags(p)


def main(argv: Sequence[str] | None = None, overrides: Mapping[str, Any] | None = None) -> dict | None:
    """Run the selection; returns the guidance_selection.json content on rank 0 (None elsewhere)."""
    args = finish_calibration_args(create_argparser().parse_args(argv), overrides)
    dist_util.setup_dist()
    logger.configure(dir=args.log_dir)
    log_dir = logger.get_dir()
    logger.log("args: " + json.dumps(vars(args), sort_keys=True, default=str))
    model, diffusion, path, sha = load_model(args)
    logger.log(f"loaded {path} (sha256 {sha[:12]}...) on {dist_util.dev()}")
    cals = calibrate_from_args(args, model, diffusion, sha)
    selection = guidance_selection(cals, args.selection_tolerance)
    out = None
    if dist_util.get_rank() == 0:
        cal_path = os.path.join(log_dir, "calibration.json")
        save_calibrations(cal_path, cals)
        out = {
            **selection,
            "calibration_file": cal_path,
            "checkpoint": path,
            "checkpoint_sha256": sha,
            "forward": run_settings(args),
            "num_slices_val": args.num_slices_val,
            "n_val": next(iter(cals.values())).n_val,
            "seed": args.seed,
        }
        atomic_write_json(out, os.path.join(log_dir, "guidance_selection.json"))
        logger.log(
            f"chosen w={selection['chosen_w']:g}; segment with translation_FPDM.py "
            f"--w {selection['chosen_w']:g} --calibration {cal_path} (same model and forward flags)"
        )
    dist_util.barrier()
    return out


if __name__ == "__main__":
    main()
