"""Command-line flags of the AnoFPDM evaluation (``scripts/translation_FPDM.py``) and of the guidance
selection (``scripts/select_guidance.py``), which share the model, checkpoint, forward-process and
validation flags (add_calibration_flags / finish_calibration_args).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from typing import Any

from .anofpdm import ENCODINGS, UGP_MODES, forward_settings
from .gradient_sam import sam_mode_from_flags
from .script_util import add_dict_to_argparser, model_and_diffusion_defaults, str2bool
from .translation_outputs import resolve_min_cc_size


def add_calibration_flags(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags shared by translation_FPDM.py and select_guidance.py: the model/diffusion flags of script_util,
    the checkpoint, the forward-process settings, the validation split and the w-selection rule."""
    add_dict_to_argparser(p, model_and_diffusion_defaults())
    p.add_argument(
        "--w",
        type=float,
        nargs="+",
        required=True,
        help="guidance strength(s); several values -> one forward pass, results per w",
    )
    p.add_argument("--name", default="brats")
    p.add_argument("--data_dir", required=True)
    p.add_argument("--model_dir", required=True)
    p.add_argument("--log_dir", default=None, help="output folder (default $OPENAI_LOGDIR)")
    p.add_argument("--model_num", default=None, help="checkpoint step (default: newest)")
    p.add_argument("--ema", type=str2bool, default=False)
    p.add_argument("--ema_rate", default="0.9999")
    p.add_argument("--forward_steps", type=int, default=600)
    p.add_argument("--modality", type=int, nargs="+", default=[0, 3])
    p.add_argument("--encoding", choices=ENCODINGS, default=None, help="ddim (default) or ddpm")
    p.add_argument("--d_reverse", type=str2bool, default=None, help="alias: True = ddim, False = ddpm")
    p.add_argument(
        "--ugp", choices=UGP_MODES, default="null", help="null (paper Eq. 10) or healthy_w0 (upstream code)"
    )
    p.add_argument("--legacy_indexing", type=str2bool, default=False)
    p.add_argument("--clip_denoised", type=str2bool, default=True)
    p.add_argument("--dynamic_clip", type=str2bool, default=False)
    p.add_argument("--num_slices_val", type=int, default=None, help="first N validation slices (default all)")
    p.add_argument(
        "--num_batches_val",
        type=int,
        default=None,
        help="compat: num_slices_val = num_batches_val*batch_size_val",
    )
    p.add_argument("--batch_size_val", type=int, default=32)
    p.add_argument(
        "--selection_tolerance",
        type=float,
        default=0.99,
        help="several --w: choose the largest w whose validation accuracy >= this * best (spec 5.8)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress", type=str2bool, default=True)
    p.add_argument(
        "--null", type=str2bool, default=None, help="ignored: the inversion is always unconditional"
    )
    return p


def create_argparser() -> argparse.ArgumentParser:
    """All model/diffusion flags of script_util plus the inference flags (spec 5.1 with fixes)."""
    p = argparse.ArgumentParser(
        description="AnoFPDM anomaly segmentation (forward process of a "
        "classifier-free-guided diffusion model)"
    )
    add_calibration_flags(p)
    p.add_argument("--image_dir", default=None, help="accepted for compatibility; outputs go to the log dir")
    p.add_argument("--t_e_ratio", type=float, nargs="+", default=[1.0])
    p.add_argument("--median_filter", type=str2bool, default=True)
    p.add_argument("--last_only", type=str2bool, default=False)
    p.add_argument("--subset_interval", type=int, default=-1)
    p.add_argument("--legacy_segmentation", type=str2bool, default=False)
    p.add_argument("--legacy_metrics", type=str2bool, default=False)
    p.add_argument(
        "--min_cc_size",
        type=int,
        default=-1,
        help="drop predicted connected components of <= this many px; -1 = the paper's 40 px at 128 px "
        "scaled by area to --image_size (10 at 64 px)",
    )
    p.add_argument("--calibration", default=None, help="reuse this calibration JSON instead of calibrating")
    p.add_argument("--num_slices", type=int, default=None, help="first N test slices (default all)")
    p.add_argument(
        "--num_batches", type=int, default=None, help="compat: num_slices = num_batches*batch_size"
    )
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--save_nifti", type=str2bool, default=False)
    p.add_argument("--save_data", type=str2bool, default=False)
    p.add_argument("--num_panels", type=int, default=8)
    p.add_argument("--resume", type=str2bool, default=False)
    p.add_argument(
        "--use_weighted_sampler", type=str2bool, default=False, help="ignored (deterministic order)"
    )
    p.add_argument(
        "--use_gradient_sam",
        type=str2bool,
        default=False,
        help="ablation: SAM = (x̂h - x̂∅)² / (B_t² (1+w)²) (spec 5.5 step 1; B_t from the model's schedule, "
        "upstream's linear one with --legacy_segmentation)",
    )
    p.add_argument(
        "--use_gradient_para_sam", type=str2bool, default=False, help="with --use_gradient_sam: undivided"
    )
    return p


def finish_calibration_args(
    args: argparse.Namespace, overrides: Mapping[str, Any] | None = None
) -> argparse.Namespace:
    """Apply ``overrides`` and validate the flags of add_calibration_flags (in place; returns args)."""
    for k, v in (overrides or {}).items():
        setattr(args, k, v)
    args.class_cond = True  # the AnoFPDM network is always class-conditional (spec 5.1 step 2)
    if args.d_reverse is not None:
        enc = "ddim" if args.d_reverse else "ddpm"
        if args.encoding is not None and args.encoding != enc:
            raise ValueError(f"--d_reverse {args.d_reverse} contradicts --encoding {args.encoding}; give one")
        args.encoding = enc
    args.encoding = args.encoding or "ddim"
    if args.num_slices_val is None and args.num_batches_val:
        args.num_slices_val = args.num_batches_val * args.batch_size_val
    for flag in ("batch_size_val", "forward_steps"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if len(set(args.w)) != len(args.w):
        raise ValueError(f"--w has repeated values {args.w}")
    if not 0.0 < args.selection_tolerance <= 1.0:
        raise ValueError(f"--selection_tolerance must be in (0, 1], got {args.selection_tolerance}")
    return args


def parse_args(
    argv: Sequence[str] | None = None, overrides: Mapping[str, Any] | None = None
) -> argparse.Namespace:
    """Parse and validate the flags; ``overrides`` are applied after parsing (e.g. unet_ver=hae_v2)."""
    args = finish_calibration_args(create_argparser().parse_args(argv), overrides)
    sam_mode_from_flags(args.use_gradient_sam, args.use_gradient_para_sam)  # ValueError for para alone
    if args.num_slices is None and args.num_batches is not None:
        args.num_slices = args.num_batches * args.batch_size
    if args.last_only and args.subset_interval > 0:
        raise ValueError("--last_only True cannot be combined with --subset_interval > 0")
    if args.subset_interval == 0 or args.subset_interval < -1:
        raise ValueError(f"--subset_interval must be -1 (off) or > 0, got {args.subset_interval}")
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {args.batch_size}")
    resolve_min_cc_size(args.min_cc_size, args.image_size)  # ValueError for values < -1
    return args


def run_settings(args: argparse.Namespace) -> dict:
    """Forward-process settings that a calibration must match."""
    return forward_settings(
        forward_steps=args.forward_steps,
        modality=args.modality,
        encoding=args.encoding,
        ugp=args.ugp,
        legacy_indexing=args.legacy_indexing,
        clip_denoised=args.clip_denoised,
        dynamic_clip=args.dynamic_clip,
    )
