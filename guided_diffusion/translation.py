"""AnoFPDM evaluation pipeline behind ``scripts/translation_FPDM.py`` (anofpdm_spec.md §5.1, fixes of §8).

Flow: setup_dist -> logger.configure -> model from the flags + checkpoint -> calibration on the validation
split (or ``--calibration FILE``) -> test split (rank-sharded, deterministic order) -> forward process +
segmentation per batch, each batch's per-slice results saved atomically under ``LOGDIR/results`` (so
``--resume`` skips them) -> gathered on rank 0 -> metrics.json, slices.csv, patients.csv, calibration.json,
panels/ (PNG + index.html), nifti/ (``--save_nifti``), arrays/ (``--save_data``).

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
from .anofpdm import ENCODINGS, UGP_MODES, forward_settings, run_forward_process
from .calibration import Calibration, calibrate, file_sha256, load_calibrations, save_calibrations
from .io_util import atomic_torch_save
from .script_util import (
    add_dict_to_argparser,
    args_to_dict,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
    model_config,
    str2bool,
)
from .segmentation import segment

SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
MODALITY_NAMES = {4: ["FLAIR", "T1", "T1ce", "T2"], 1: ["T1"]}


# ---------------------------------------------------------------------------------------------- flags
def create_argparser() -> argparse.ArgumentParser:
    """All model/diffusion flags of script_util plus the inference flags (spec 5.1 with fixes)."""
    p = argparse.ArgumentParser(
        description="AnoFPDM anomaly segmentation (forward process of a "
        "classifier-free-guided diffusion model)"
    )
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
    p.add_argument("--image_dir", default=None, help="accepted for compatibility; outputs go to the log dir")
    p.add_argument("--model_num", default=None, help="checkpoint step (default: newest)")
    p.add_argument("--ema", type=str2bool, default=False)
    p.add_argument("--ema_rate", default="0.9999")
    p.add_argument("--forward_steps", type=int, default=600)
    p.add_argument("--modality", type=int, nargs="+", default=[0, 3])
    p.add_argument("--t_e_ratio", type=float, nargs="+", default=[1.0])
    p.add_argument("--median_filter", type=str2bool, default=True)
    p.add_argument("--last_only", type=str2bool, default=False)
    p.add_argument("--subset_interval", type=int, default=-1)
    p.add_argument("--encoding", choices=ENCODINGS, default=None, help="ddim (default) or ddpm")
    p.add_argument("--d_reverse", type=str2bool, default=None, help="alias: True = ddim, False = ddpm")
    p.add_argument(
        "--ugp", choices=UGP_MODES, default="null", help="null (paper Eq. 10) or healthy_w0 (upstream code)"
    )
    p.add_argument("--legacy_indexing", type=str2bool, default=False)
    p.add_argument("--legacy_segmentation", type=str2bool, default=False)
    p.add_argument("--legacy_metrics", type=str2bool, default=False)
    p.add_argument("--clip_denoised", type=str2bool, default=True)
    p.add_argument("--dynamic_clip", type=str2bool, default=False)
    p.add_argument("--calibration", default=None, help="reuse this calibration JSON instead of calibrating")
    p.add_argument("--num_slices_val", type=int, default=None, help="first N validation slices (default all)")
    p.add_argument("--num_slices", type=int, default=None, help="first N test slices (default all)")
    p.add_argument(
        "--num_batches", type=int, default=None, help="compat: num_slices = num_batches*batch_size"
    )
    p.add_argument(
        "--num_batches_val",
        type=int,
        default=None,
        help="compat: num_slices_val = num_batches_val*batch_size_val",
    )
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--batch_size_val", type=int, default=32)
    p.add_argument("--save_nifti", type=str2bool, default=False)
    p.add_argument("--save_data", type=str2bool, default=False)
    p.add_argument("--num_panels", type=int, default=8)
    p.add_argument("--resume", type=str2bool, default=False)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress", type=str2bool, default=True)
    p.add_argument(
        "--null", type=str2bool, default=None, help="ignored: the inversion is always unconditional"
    )
    p.add_argument(
        "--use_weighted_sampler", type=str2bool, default=False, help="ignored (deterministic order)"
    )
    p.add_argument("--use_gradient_sam", type=str2bool, default=False, help="not implemented")
    p.add_argument("--use_gradient_para_sam", type=str2bool, default=False, help="not implemented")
    return p


def parse_args(
    argv: Sequence[str] | None = None, overrides: Mapping[str, Any] | None = None
) -> argparse.Namespace:
    """Parse and validate the flags; ``overrides`` are applied after parsing (e.g. unet_ver=hae_v2)."""
    args = create_argparser().parse_args(argv)
    for k, v in (overrides or {}).items():
        setattr(args, k, v)
    args.class_cond = True  # the AnoFPDM network is always class-conditional (spec 5.1 step 2)
    if args.d_reverse is not None:
        enc = "ddim" if args.d_reverse else "ddpm"
        if args.encoding is not None and args.encoding != enc:
            raise ValueError(f"--d_reverse {args.d_reverse} contradicts --encoding {args.encoding}; give one")
        args.encoding = enc
    args.encoding = args.encoding or "ddim"
    if args.use_gradient_sam or args.use_gradient_para_sam:
        raise ValueError("--use_gradient_sam / --use_gradient_para_sam are not implemented in this version")
    if args.num_slices is None and args.num_batches is not None:
        args.num_slices = args.num_batches * args.batch_size
    if args.num_slices_val is None and args.num_batches_val:
        args.num_slices_val = args.num_batches_val * args.batch_size_val
    if args.last_only and args.subset_interval > 0:
        raise ValueError("--last_only True cannot be combined with --subset_interval > 0")
    if args.subset_interval == 0 or args.subset_interval < -1:
        raise ValueError(f"--subset_interval must be -1 (off) or > 0, got {args.subset_interval}")
    for flag in ("batch_size", "batch_size_val", "forward_steps"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if len(set(args.w)) != len(args.w):
        raise ValueError(f"--w has repeated values {args.w}")
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
    cals = calibrate_for_ws(
        model,
        diffusion,
        data_dir=args.data_dir,
        ws=args.w,
        settings=settings,
        checkpoint_sha256=sha,
        batch_size=args.batch_size_val,
        num_slices=args.num_slices_val,
        seed=args.seed,
        in_channels=args.in_channels,
        progress=args.progress,
    )
    logger.log(f"calibration on the validation split took {time.time() - t0:.1f}s")
    return cals


# ---------------------------------------------------------------------------------------------- test loop
def setting_key(w: float, ratio: float) -> str:
    return f"w={w:g},t_e_ratio={ratio:g}"


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
    loader, _ = get_eval_loader(
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


# ---------------------------------------------------------------------------------------------- outputs
def write_outputs(
    args,
    records: Mapping[int, dict],
    cals: Mapping[float, Calibration],
    log_dir: str,
    extra: Mapping[str, Any],
) -> dict:
    """Rank 0: metrics (E1 evaluator), CSVs, panels, NIfTI, arrays. Returns the metrics dict."""
    from . import report
    from .data.brats import get_eval_loader
    from .metrics import LegacyRunningMetrics, SegmentationEvaluator

    _, dataset = get_eval_loader(
        args.data_dir, "test", args.batch_size, num_slices=args.num_slices, in_channels=args.in_channels
    )
    order = sorted(records)
    keys = [setting_key(w, r) for w in args.w for r in args.t_e_ratio]
    evals = {k: SegmentationEvaluator() for k in keys}
    legacy = {k: LegacyRunningMetrics() for k in keys} if args.legacy_metrics else {}
    filtered: dict[str, dict[int, np.ndarray]] = {k: {} for k in keys}
    cache: dict[int, tuple] = {}
    for start in range(0, len(order), args.batch_size):
        chunk = order[start : start + args.batch_size]
        items = [dataset[i] for i in chunk]
        src = torch.stack([it[0] for it in items])
        gt = torch.stack([it[1] for it in items])
        lab = torch.as_tensor([int(it[2]) for it in items])
        ids = [tuple(dataset.slice_info(i)) for i in chunk]
        for i, it, sid in zip(chunk, items, ids):
            cache[i] = (it, sid)
        for k in keys:
            outs = [records[i]["out"][k] for i in chunk]
            stack = {f: np.stack([o[f] for o in outs]) for f in ("mask", "mask_all", "map")}
            pred = np.array([o["pred_lab"] for o in outs])
            res = evals[k].add_batch(
                pred_mask_gated=stack["mask"],
                pred_mask_all=stack["mask_all"],
                anomaly_map=stack["map"],
                gt=gt,
                source=src,
                label=lab,
                pred_label=pred,
                slice_ids=ids,
                extra={
                    "index": chunk,
                    "cos": [o["cos"] for o in outs],
                    "t_e": [int(np.max(o["end_steps"])) for o in outs],
                },
            )
            for i, m in zip(chunk, res["pred_mask_gated"]):
                filtered[k][i] = m
            if k in legacy:
                legacy[k].add_batch(gt, stack["mask"], stack["mask_all"], src, stack["map"], lab, pred)
    results = {k: evals[k].results() for k in keys}
    primary = keys[0]
    metrics = {
        **results[primary],
        "primary_setting": primary,
        "settings_results": results,
        "calibration": {f"{w:g}": vars(cals[float(w)]) for w in args.w},
        "run": {
            "forward": run_settings(args),
            "legacy_segmentation": args.legacy_segmentation,
            "median_filter": args.median_filter,
            "last_only": args.last_only,
            "subset_interval": args.subset_interval,
            "seed": args.seed,
            **extra,
        },
    }
    if legacy:
        metrics["legacy"] = {k: v.running() for k, v in legacy.items()}
    report.write_metrics_json(os.path.join(log_dir, "metrics.json"), metrics)
    slice_rows, patient_rows = [], []
    for k in keys:
        slice_rows += [{"setting": k, **r} for r in evals[k].slice_records()]
        patient_rows += [{"setting": k, **r} for r in evals[k].patient_records()]
    report.write_csv(os.path.join(log_dir, "slices.csv"), slice_rows)
    report.write_csv(os.path.join(log_dir, "patients.csv"), patient_rows)
    _write_panels(args, records, cache, filtered[primary], primary, results[primary], log_dir)
    if args.save_nifti:
        _write_nifti(args, records, cache, filtered[primary], primary, log_dir)
    if args.save_data:
        for k in keys:
            outs = [records[i]["out"][k] for i in order]
            report.save_arrays(
                os.path.join(log_dir, "arrays", f"{k.replace(',', '_')}.npz"),
                index=np.array(order),
                anomaly_map=np.stack([o["map"] for o in outs]),
                pred_mask=np.stack([o["mask"] for o in outs]),
                pred_mask_all=np.stack([o["mask_all"] for o in outs]),
                pred_mask_cc=np.stack([filtered[k][i] for i in order]),
                pred_label=np.array([o["pred_lab"] for o in outs]),
                cos=np.array([o["cos"] for o in outs]),
                end_steps=np.stack([o["end_steps"] for o in outs]),
                mse_h=np.stack([records[i]["mse_h"] for i in order]),
                mse_null=np.stack([records[i]["mse_null"] for i in order]),
                div=np.stack([records[i]["div"] for i in order]),
            )
    return metrics


def _write_panels(args, records, cache, filtered, key, results, log_dir) -> None:
    from . import report

    order = sorted(records)
    unhealthy = [i for i in order if int(cache[i][0][2]) == 1]
    healthy = [i for i in order if int(cache[i][0][2]) != 1]
    n_u = min(len(unhealthy), (args.num_panels + 1) // 2 if healthy else args.num_panels)
    pick = _spread(unhealthy, n_u) + _spread(healthy, args.num_panels - n_u)
    items = []
    for i in sorted(pick):
        (x, gt, lab, *_), (pid, sl) = cache[i]
        out = records[i]["out"][key]
        items.append(
            {
                "source": x.numpy(),
                "gt": gt[0].numpy(),
                "anomaly_map": out["map"],
                "pred_mask": filtered[i],
                "patient": pid,
                "slice": sl,
                "label": int(lab),
                "pred_label": out["pred_lab"],
            }
        )
    names = MODALITY_NAMES.get(args.in_channels, [f"ch{c}" for c in range(args.in_channels)])
    report.save_panels(
        os.path.join(log_dir, "panels"), items, names, modalities=args.modality, metrics=results
    )


def _spread(ids: list[int], n: int) -> list[int]:
    if n <= 0 or not ids:
        return []
    pos = np.linspace(0, len(ids) - 1, min(n, len(ids))).round().astype(int)
    return [ids[p] for p in sorted(set(pos.tolist()))]


def _write_nifti(args, records, cache, filtered, key, log_dir) -> None:
    from . import report

    by_patient: dict[str, list[int]] = {}
    for i in sorted(records):
        by_patient.setdefault(str(cache[i][1][0]), []).append(i)
    for pid, ids in by_patient.items():
        ids = sorted(ids, key=lambda i: cache[i][1][1])
        meta = os.path.join(args.data_dir, "npy_test", f"patient_{pid}", "meta.json")
        report.save_nifti_volumes(
            os.path.join(log_dir, "nifti"),
            pid,
            [int(cache[i][1][1]) for i in ids],
            np.stack([records[i]["out"][key]["map"] for i in ids]),
            np.stack([filtered[i] for i in ids]).astype(np.uint8),
            meta=meta if os.path.isfile(meta) else None,
            gt=np.stack([cache[i][0][1][0].numpy() for i in ids]),
        )


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
        metrics = write_outputs(
            args, records, cals, log_dir, {"timing": timing, "checkpoint": path, "checkpoint_sha256": sha}
        )
        mixed, unh = metrics["mixed"], metrics["unhealthy"]
        logger.log(
            f"{metrics['primary_setting']}: mixed dice {mixed.get('dice')} | unhealthy dice "
            f"{unh.get('dice')} | image acc {metrics['image'].get('accuracy')}"
        )
        logger.log("evaluation complete")
    dist_util.barrier()
    return metrics
