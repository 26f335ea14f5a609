"""Command line of the AnoFPDM evaluation (``scripts/translation_FPDM.py``) and of the guidance selection
(``scripts/select_guidance.py``): the flags are generated from the typed configs of
``guided_diffusion.configs.eval_configs``; ``parse_run`` returns an ``EvalRun``. argparse stays in this
module.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from typing import Any

from guided_diffusion.cli import ArgumentParser
from guided_diffusion.configs.base import COMPAT, DiffusionConfig, ModelConfig
from guided_diffusion.configs.config_flags import add_compat_flags, add_config_flag, add_flags, parse_configs
from guided_diffusion.configs.eval_configs import (
    BATCH_FLAGS,
    INFERENCE_IGNORED,
    CheckpointConfig,
    EvalConfig,
    EvalRun,
    ForwardConfig,
    SegmentConfig,
)
from guided_diffusion.export.export import CONFIG_FILE, is_export_dir
from guided_diffusion.export.export_load import export_run_sections

# evaluation-only flags that the guidance selection (validation split only) does not have
TEST_ONLY = ("num_slices", "batch_size", "calibration", "save_nifti", "save_data", "num_panels")
_COMPAT_NAMES = ("d_reverse", "null", "use_weighted_sampler", "image_dir", "name", "num_batches",
                 "num_batches_val", "resblock_updown", "use_new_attention_order", *INFERENCE_IGNORED)


def add_calibration_flags(p: argparse.ArgumentParser, test_split: bool = False) -> argparse.ArgumentParser:
    """The flags shared by translation_FPDM.py and select_guidance.py (model, diffusion, checkpoint,
    forward process, run); with ``test_split`` also the segmentation and test-split flags."""
    add_config_flag(p)
    add_flags(p, ModelConfig, skip=INFERENCE_IGNORED)
    add_flags(p, DiffusionConfig, skip=INFERENCE_IGNORED)
    add_flags(p, CheckpointConfig)
    add_flags(p, ForwardConfig)
    if test_split:
        add_flags(p, SegmentConfig)
    add_flags(p, EvalConfig, skip=() if test_split else TEST_ONLY)
    for action in p._actions:  # N or "auto": EvalConfig parses (and names the flag on bad values)
        if action.dest in BATCH_FLAGS:
            action.type = str
    add_compat_flags(p, [n for n in _COMPAT_NAMES if n in COMPAT])
    return p


def create_argparser() -> argparse.ArgumentParser:
    """The flags of translation_FPDM.py (docs/method.md, 'Evaluation run')."""
    p = ArgumentParser(
        description="AnoFPDM anomaly segmentation (forward process of a classifier-free-guided diffusion "
        "model)"
    )
    return add_calibration_flags(p, test_split=True)


def create_selection_argparser() -> argparse.ArgumentParser:
    """The flags of select_guidance.py (validation split only)."""
    p = ArgumentParser(
        description="Choose the AnoFPDM guidance strength w on the validation split (paper §4.2 rule)"
    )
    return add_calibration_flags(p, test_split=False)


def export_base(ns: argparse.Namespace) -> tuple[dict, str]:
    """With ``--model_dir`` an export folder (and no ``--config``): the export's network, diffusion and
    evaluation settings as the values under the flags (docs/edges.md, 'An export is enough to evaluate');
    else nothing."""

    model_dir = getattr(ns, "model_dir", "")
    if not model_dir or not is_export_dir(model_dir):
        return {}, ""
    return export_run_sections(model_dir), os.path.join(model_dir, CONFIG_FILE)


def parse_run(
    argv: Sequence[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    test_split: bool = True,
) -> EvalRun:
    """Parse the flags (and ``--config FILE``) into an EvalRun.

    ``overrides`` force model settings of a variant script (e.g. unet_ver=hae_v2); a contradicting value
    given on the command line is refused. The network is always class-conditional
    (docs/method.md, 'Evaluation run').
    """
    parser = create_argparser() if test_split else create_selection_argparser()
    classes = [ModelConfig, DiffusionConfig, CheckpointConfig, ForwardConfig, EvalConfig]
    if test_split:
        classes.append(SegmentConfig)
    ns, cfgs = parse_configs(parser, argv, classes, base_of=export_base)
    model = cfgs[0]
    for key, value in (overrides or {}).items():
        if key in vars(ns) and getattr(ns, key) != value:
            raise ValueError(f"--{key} {getattr(ns, key)} contradicts this script, which always uses "
                             f"--{key} {value}; omit the flag")
    model = model.replace(**dict(overrides or {}), class_cond=True)
    return EvalRun(model=model, diffusion=cfgs[1], checkpoint=cfgs[2], forward=cfgs[3], eval=cfgs[4],
                   **({"segment": cfgs[5]} if test_split else {}))


def parse_args(argv: Sequence[str] | None = None, overrides: Mapping[str, Any] | None = None) -> EvalRun:
    """Alias of ``parse_run`` (the evaluation's flags)."""
    return parse_run(argv, overrides)
