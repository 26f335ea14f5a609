"""AnoFPDM evaluation pipeline behind ``scripts/translation_FPDM.py`` (anofpdm_spec.md §5.1, fixes of §8).

Flow: setup_dist -> logger.configure -> model from the flags + checkpoint -> calibration on the validation
split (or ``--calibration FILE``) -> test split (rank-sharded, deterministic order) -> forward process +
segmentation per batch, each batch's per-slice results saved atomically under ``LOGDIR/results`` (so
``--resume`` skips them) -> gathered on rank 0 -> metrics.json, slices.csv, patients.csv, calibration.json,
panels/ (PNG + index.html), nifti/ (``--save_nifti``), arrays/ (``--save_data``). The flags live in
``guided_diffusion.translation_flags``, the writers in ``guided_diffusion.translation_outputs``.

Several ``--w``: one forward pass serves all of them; the primary setting (top-level metrics, panels, NIfTI)
is the w chosen by the paper's rule (calibration.select_guidance: largest w whose validation accuracy is
within ``--selection_tolerance`` (99 %) of the best, spec 5.8), and the selection table is stored in
metrics.json under "guidance_selection". ``scripts/select_guidance.py`` runs the calibration part alone.

Noise: each slice uses its own generator seeded from (seed, split, dataset index), so results do not
depend on the batch composition or the number of processes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from . import dist_util, logger
from .anofpdm import run_forward_process
from .calibration import (
    Calibration,
    calibrate,
    file_sha256,
    load_calibrations,
    save_calibrations,
    select_guidance,
)
from .gradient_sam import sam_mode_from_flags
from .io_util import atomic_torch_save
from .script_util import args_to_dict, create_model_and_diffusion, model_and_diffusion_defaults, model_config
from .segmentation import segment
from .translation_flags import (
    add_calibration_flags,
    create_argparser,
    finish_calibration_args,
    parse_args,
    run_settings,
)
from .translation_outputs import setting_key, write_outputs

__all__ = [
    "add_calibration_flags",
    "calibrate",
    "calibrate_for_ws",
    "choose_primary_w",
    "create_argparser",
    "finish_calibration_args",
    "guidance_selection",
    "load_model",
    "main",
    "parse_args",
    "run_settings",
    "save_calibrations",
    "setting_key",
    "write_outputs",
]

SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


def slice_generators(seed: int, split: str, indices: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per slice, seeded from (seed, split, dataset index)."""
    out = []
    for i in indices:
        state = np.random.SeedSequence([int(seed), SPLIT_CODES.get(split, 9), int(i)]).generate_state(
            2, np.uint32
        )
        out.append(torch.Generator().manual_seed(int(state[0]) << 31 ^ int(state[1])))
    return out


def _bar(iterable, **kw):
    show = dist_util.get_rank() == 0 and kw.pop("enabled", True)
    return tqdm(iterable, disable=not show, leave=sys.stderr.isatty(), **kw)


# ---------------------------------------------------------------------------------------------- model
def load_model(args: argparse.Namespace):
    """(model, diffusion, checkpoint path, sha256) built from the flags, weights loaded, eval mode."""
    from .checkpoint import find_checkpoint, load_model_checkpoint

    flags = args_to_dict(args, model_and_diffusion_defaults().keys())
    model, diffusion = create_model_and_diffusion(**flags)
    if not os.path.isdir(args.model_dir):
        raise FileNotFoundError(
            f"--model_dir {args.model_dir} does not exist; point it to the training log dir"
        )
    path = find_checkpoint(args.model_dir, step=args.model_num, ema_rate=args.ema_rate if args.ema else None)
    load_model_checkpoint(model, path, config=model_config(flags))
    model.to(dist_util.dev()).eval()
    return model, diffusion, path, file_sha256(path)


# ---------------------------------------------------------------------------------------------- calibration
def collect_statistics(
    model,
    diffusion,
    *,
    data_dir: str,
    split: str,
    ws: Sequence[float],
    settings: Mapping,
    batch_size: int,
    num_slices: int | None,
    seed: int,
    in_channels: int | None = None,
    progress: bool = True,
) -> dict:
    """Forward statistics of every slice of ``split`` (sharded by rank, gathered on every rank).

    Returns {"idx" [N], "label" [N], "mse_h" [N, nW, S, M], "mse_null" [N, S, M], "div" [N, nW, S, M]}
    sorted by dataset index.
    """
    from .data.brats import get_eval_loader

    loader, _ = get_eval_loader(data_dir, split, batch_size, num_slices=num_slices, in_channels=in_channels)
    dev = dist_util.dev()
    rows = []
    for x, _gt, lab, idx in _bar(loader, desc=f"{split} batches", enabled=progress):
        fr = run_forward_process(
            model,
            diffusion,
            x.to(dev),
            ws=list(ws),
            generator=slice_generators(seed, split, idx.tolist()),
            progress=progress and dist_util.get_rank() == 0,
            **settings,
        )
        rows.append((idx.cpu(), torch.as_tensor(lab).cpu(), fr.mse_h.cpu(), fr.mse_null.cpu(), fr.div.cpu()))
    local = [torch.cat(c) if rows else None for c in zip(*rows)] if rows else []
    parts = [p for p in dist_util.all_gather_object(local) if p]
    if not parts:
        raise ValueError(f"the {split} split of {data_dir} yielded no slices")
    cat = [torch.cat([p[i] for p in parts]) for i in range(5)]
    order = torch.argsort(cat[0])
    return dict(zip(("idx", "label", "mse_h", "mse_null", "div"), (c[order] for c in cat)))


def calibrate_for_ws(
    model,
    diffusion,
    *,
    data_dir: str,
    ws: Sequence[float],
    settings: Mapping,
    checkpoint_sha256: str,
    batch_size: int = 32,
    num_slices: int | None = None,
    seed: int = 0,
    in_channels: int | None = None,
    progress: bool = True,
) -> dict[float, Calibration]:
    """Calibrate every w of ``ws`` from ONE forward pass over the validation split -> {w: Calibration}."""
    stats = collect_statistics(
        model,
        diffusion,
        data_dir=data_dir,
        split="val",
        ws=ws,
        settings=settings,
        batch_size=batch_size,
        num_slices=num_slices,
        seed=seed,
        in_channels=in_channels,
        progress=progress,
    )
    return {
        float(w): calibrate(
            stats["mse_h"][:, i],
            stats["mse_null"],
            stats["div"][:, i],
            stats["label"],
            w=w,
            checkpoint_sha256=checkpoint_sha256,
            extra={"num_slices_val": num_slices, "seed": seed},
            **settings,
        )
        for i, w in enumerate(ws)
    }


def get_calibrations(args, model, diffusion, sha: str, log_dir: str) -> dict[float, Calibration]:
    settings = run_settings(args)
    expect = {**settings, "checkpoint_sha256": sha}
    stored = os.path.join(log_dir, "calibration.json")
    path = args.calibration or (stored if args.resume and os.path.isfile(stored) else None)
    if path:
        cals = load_calibrations(path)
        missing = [w for w in args.w if float(w) not in cals]
        if missing:
            raise ValueError(
                f"calibration {path} has no entry for w={missing} (it holds w={sorted(cals)}); "
                "recalibrate (omit --calibration)"
            )
        for w in args.w:
            cals[float(w)].check_matches({**expect, "w": float(w)}, source=f"calibration {path}")
        logger.log(f"using calibration {path}")
        return {float(w): cals[float(w)] for w in args.w}
    t0 = time.time()
    cals = calibrate_from_args(args, model, diffusion, sha)
    logger.log(f"calibration on the validation split took {time.time() - t0:.1f}s")
    return cals


def calibrate_from_args(args, model, diffusion, sha: str) -> dict[float, Calibration]:
    """``calibrate_for_ws`` with the run's flags: every ``--w`` from one pass over the validation split."""
    return calibrate_for_ws(
        model,
        diffusion,
        data_dir=args.data_dir,
        ws=args.w,
        settings=run_settings(args),
        checkpoint_sha256=sha,
        batch_size=args.batch_size_val,
        num_slices=args.num_slices_val,
        seed=args.seed,
        in_channels=args.in_channels,
        progress=args.progress,
    )


# ---------------------------------------------------------------------------------------------- test loop
def _batch_file(results_dir: str, idx: Sequence[int]) -> str:
    digest = hashlib.sha1(",".join(str(int(i)) for i in idx).encode()).hexdigest()[:10]
    return os.path.join(results_dir, f"slices_{int(idx[0]):06d}_{digest}.pt")


def load_finished(results_dir: str) -> dict[int, dict]:
    """Per-slice records of every saved batch file -> {dataset index: record}."""
    done: dict[int, dict] = {}
    if not os.path.isdir(results_dir):
        return done
    for name in sorted(os.listdir(results_dir)):
        if name.startswith("slices_") and name.endswith(".pt"):
            for rec in torch.load(os.path.join(results_dir, name), weights_only=False):
                done[int(rec["idx"])] = rec
    return done


def process_batch(
    args, model, diffusion, cals: Mapping[float, Calibration], x: torch.Tensor, idx: Sequence[int]
) -> list[dict]:
    """Forward process + segmentation of one batch -> one record per slice (CPU numpy/scalars)."""
    fr = run_forward_process(
        model,
        diffusion,
        x.to(dist_util.dev()),
        ws=args.w,
        generator=slice_generators(args.seed, "test", idx),
        subset_interval=args.subset_interval,
        keep_sam_stack=any(r != 1 for r in args.t_e_ratio),
        progress=args.progress and dist_util.get_rank() == 0,
        sam_mode=sam_mode_from_flags(args.use_gradient_sam, args.use_gradient_para_sam),
        legacy_gradient_schedule=args.legacy_segmentation,
        **run_settings(args),
    )
    records = [
        {
            "idx": int(i),
            "out": {},
            "mse_h": fr.mse_h[b].cpu().numpy(),
            "mse_null": fr.mse_null[b].cpu().numpy(),
            "div": fr.div[b].cpu().numpy(),
        }
        for b, i in enumerate(idx)
    ]
    for w in args.w:
        cal = cals[float(w)]
        for ratio in args.t_e_ratio:
            seg = segment(
                fr,
                w=w,
                thr_01=cal.thr_01,
                diff_max=cal.diff_max,
                t_e_ratio=ratio,
                median_filter=args.median_filter,
                last_only=args.last_only,
                subset_interval=args.subset_interval,
                legacy=args.legacy_segmentation,
            )
            for b, rec in enumerate(records):
                rec["out"][setting_key(w, ratio)] = {
                    "mask": seg.mask[b, 0].numpy().astype(bool),
                    "mask_all": seg.mask_all[b, 0].numpy().astype(bool),
                    "map": seg.anomaly_map[b, 0].numpy().astype(np.float32),
                    "pred_lab": int(seg.pred_lab[b]),
                    "cos": float(seg.cos[b]),
                    "end_steps": seg.end_steps[b].numpy(),
                    "threshold": float(seg.threshold[b]),
                    "quantile": seg.quantile[b].numpy(),
                }
    return records


def run_test(args, model, diffusion, cals, log_dir: str) -> tuple[dict[int, dict], dict]:
    """Evaluate the (rank-sharded) test split; returns (records by index gathered on rank 0, timing)."""
    from .data.brats import get_eval_loader

    results_dir = os.path.join(log_dir, "results")
    os.makedirs(results_dir, exist_ok=True)
    done = load_finished(results_dir) if args.resume else {}
    loader, dataset = get_eval_loader(
        args.data_dir, "test", args.batch_size, num_slices=args.num_slices, in_channels=args.in_channels
    )
    mine: dict[int, dict] = {}
    n_new, t0 = 0, time.time()
    for x, _gt, _lab, idx in _bar(loader, desc="test batches", enabled=args.progress):
        ids = [int(i) for i in idx]
        if all(i in done for i in ids):
            mine.update({i: done[i] for i in ids})
            continue
        records = process_batch(args, model, diffusion, cals, x, ids)
        atomic_torch_save(records, _batch_file(results_dir, ids))
        mine.update({r["idx"]: r for r in records})
        n_new += len(ids)
    seconds = time.time() - t0
    logger.log(dataset.data_summary())
    timing = {
        "new_slices": n_new,
        "seconds": seconds,
        "slices_per_s": n_new / seconds if n_new else None,
        "peak_memory_bytes": _peak_memory(),
    }
    gathered = dist_util.all_gather_object((mine, timing))
    merged: dict[int, dict] = {}
    for part, _ in gathered:
        merged.update(part)
    timing = {"per_rank": [t for _, t in gathered], "new_slices": sum(t["new_slices"] for _, t in gathered)}
    return merged, timing


def _peak_memory() -> int:
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


# ---------------------------------------------------------------------------------------------- selection
def guidance_selection(cals: Mapping[float, Calibration], tolerance: float = 0.99) -> dict:
    """Apply the paper's w-selection rule to calibrations {w: Calibration} and log the table.

    Returns {"chosen_w", "tolerance", "rule", "table"}; table: one row per w ascending (w, accuracy, n_min,
    n_val, thr_01, diff_max, selected) from calibration.select_guidance (largest w whose validation
    accuracy >= tolerance * best, spec 5.8).
    """
    chosen, table = select_guidance(cals, tolerance=tolerance)
    logger.log(f"guidance selection (largest w with val accuracy >= {tolerance:g} x best): w={chosen:g}")
    for row in table:
        logger.log(
            f"  w={row['w']:g}: accuracy={row['accuracy']:.4f} n_min={row['n_min']}/{row['n_val']} "
            f"thr_01={row['thr_01']:.6f}{'  <- chosen' if row['selected'] else ''}"
        )
    return {
        "chosen_w": chosen,
        "tolerance": float(tolerance),
        "rule": "largest w whose validation accuracy >= tolerance * best accuracy (anofpdm_spec 5.8)",
        "table": table,
    }


def choose_primary_w(
    ws: Sequence[float], cals: Mapping[float, Calibration], tolerance: float = 0.99
) -> tuple[float, dict | None]:
    """Primary guidance strength of a run -> (w, selection or None).

    One w: that w and None (no selection). Several: guidance_selection over ``ws`` -> (chosen w, selection).
    """
    ws = [float(w) for w in ws]
    if len(ws) == 1:
        return ws[0], None
    selection = guidance_selection({w: cals[w] for w in ws}, tolerance)
    return selection["chosen_w"], selection


# ---------------------------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None, overrides: Mapping[str, Any] | None = None) -> dict | None:
    """Run the evaluation; returns the metrics dict on rank 0 (None on other ranks)."""
    args = parse_args(argv, overrides)
    dist_util.setup_dist()
    logger.configure(dir=args.log_dir)
    log_dir = logger.get_dir()
    logger.log("args: " + json.dumps(vars(args), sort_keys=True, default=str))
    if args.null is not None:
        logger.log("note: --null is ignored; the DDIM inversion always uses the null condition (spec 8.15)")
    model, diffusion, path, sha = load_model(args)
    logger.log(f"loaded {path} (sha256 {sha[:12]}...) on {dist_util.dev()}")
    cals = get_calibrations(args, model, diffusion, sha, log_dir)
    for w, c in cals.items():
        logger.log(
            f"w={w:g}: thr_01={c.thr_01:.6f} n_min={c.n_min} val_acc={c.accuracy:.4f} "
            f"diff_min={c.diff_min} diff_max={c.diff_max}"
        )
    primary_w, selection = choose_primary_w(args.w, cals, args.selection_tolerance)
    if dist_util.get_rank() == 0:
        save_calibrations(os.path.join(log_dir, "calibration.json"), cals)
    records, timing = run_test(args, model, diffusion, cals, log_dir)
    for t in timing["per_rank"]:
        rate = f"{t['slices_per_s']:.3f}" if t["slices_per_s"] else "n/a"
        logger.log(
            f"test: {t['new_slices']} new slices in {t['seconds']:.1f}s ({rate} slices/s), "
            f"peak memory {t['peak_memory_bytes'] / 2**20:.1f} MiB"
        )
    metrics = None
    if dist_util.get_rank() == 0:
        extra = {
            "forward": run_settings(args),
            "timing": timing,
            "checkpoint": path,
            "checkpoint_sha256": sha,
        }
        metrics = write_outputs(
            args, records, cals, log_dir, extra, primary_w=primary_w, guidance_selection=selection
        )
        mixed, unh = metrics["mixed"], metrics["unhealthy"]
        logger.log(
            f"{metrics['primary_setting']}: mixed dice {mixed.get('dice')} | unhealthy dice "
            f"{unh.get('dice')} | image acc {metrics['image'].get('accuracy')}"
        )
        logger.log("evaluation complete")
    dist_util.barrier()
    return metrics
