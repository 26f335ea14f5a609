#!/usr/bin/env python
"""Evaluation modes of issue 11 on a trained model and the real test split: agreement with fp32 and speed.

Every mode is one full AnoFPDM evaluation (``guided_diffusion.anofpdm.translation.main``, the pipeline of
scripts/translation_FPDM.py) on the same model, data, slices and seed; only the mode flag differs:
  fp32            --precision fp32 (a second fp32 run: the determinism / calibration-reuse check)
  bf16, fp16      --precision bf16 / fp16 (autocast of the network; fp16 needs CUDA, else skipped)
  early_stop_K    --early_stop_patience K for every K of --patience (changes results)
  compile         --compile True (optional; eager fallback where torch.compile fails)

Calibration: a reference run (fp32, full forward process, folder OUT/reference) calibrates once on the
validation split; every mode then runs with ``--calibration`` pointing to a copy of that calibration whose
recorded precision / early_stop_patience are relabelled to the mode's (translation refuses a calibration
made with other statistics settings; here reusing the fp32 one on purpose keeps w, thr_01 and M_max fixed).

Per mode, against the reference run (its primary setting; arrays/ via --save_data True): seconds per test
slice (test loop, metrics.json) and speed-up vs the fp32 row; fractions of slices with identical t_e (all
modalities) and identical final masks (gated, CC-filtered), of identical final / ungated mask pixels and of
identical image labels; max |Δ anomaly map| and max |Δ M_t| (all S stored steps: an early stop's held tail
counts); Dice / IoU / AUPRC (mixed, unhealthy), image accuracy and their Δ; CUDA peak memory (CPU: NaN).
The reference's full M_t curves also give ``reference.early_stop_outlook``: where each slice's curves peak
(the share peaking at the last step, which no early stop can cut) and the steps an early stop with each K
runs per slice alone and in the test loop's batches (``predicted_steps_run_mean`` of the early_stop rows,
equal to their measured ``steps_run_mean``).

Translation runs on CUDA whenever CUDA is visible: ``--device`` only checks that device (benchmark the CPU
of a GPU machine with CUDA_VISIBLE_DEVICES=). Every flag not listed below goes to translation unchanged
(model flags, --w, --forward_steps, --num_slices, or ``--config RUN/segment/config.json``); every run
writes arrays/ but no panels or NIfTI.

Usage:
    python benchmarks/bench_eval_modes.py --model_dir RUN/train --data_dir RUN/data \\
        --config RUN/segment/config.json --num_slices 40 --patience 2,4,8 --threads 2
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import numpy as np
import torch

from guided_diffusion.anofpdm import translation
from guided_diffusion.cli import run_cli
from guided_diffusion.configs.calibration import load_calibrations, save_calibrations
from guided_diffusion.data.brats import ShardSampler
from guided_diffusion.utils import dist_util
from guided_diffusion.utils.io_util import atomic_write_json

MODE_FLAGS: dict[str, dict[str, str]] = {
    "fp32": {"precision": "fp32"},
    "bf16": {"precision": "bf16"},
    "fp16": {"precision": "fp16"},
    "compile": {"precision": "fp32", "compile": "True"},
}
REFERENCE = "reference"
OWN_FLAGS = ("log_dir", "precision", "early_stop_patience", "compile", "calibration", "resume", "save_data")
METRICS = (("mixed", "dice"), ("unhealthy", "dice"), ("mixed", "iou"), ("unhealthy", "iou"),
           ("mixed", "auprc"), ("unhealthy", "auprc"), ("image", "accuracy"))
COLUMNS = (("s/slice", "s_per_slice", ".4f"), ("speed-up", "speedup_vs_fp32", ".2f"),
           ("same t_e", "same_t_e", ".3f"), ("same mask", "same_mask_slices", ".3f"),
           ("same mask px", "same_mask_pixels", ".4f"), ("same label", "same_pred_label", ".3f"),
           ("max|Δmap|", "max_abs_map_diff", ".2e"),
           ("max|ΔM_t|", "max_abs_div_diff", ".2e"), ("unh. Dice", "unhealthy_dice", ".4f"),
           ("Δ unh. Dice", "delta_unhealthy_dice", "+.4f"), ("Δ mixed Dice", "delta_mixed_dice", "+.4f"),
           ("Δ unh. AUPRC", "delta_unhealthy_auprc", "+.4f"), ("Δ accuracy", "delta_image_accuracy", "+.4f"))


def parse_modes(modes: str, patience: str) -> list[str]:
    """Mode names from ``--modes`` (comma list; ``early_stop`` expands to early_stop_K per K)."""
    out = []
    for name in filter(None, (m.strip() for m in modes.split(","))):
        if name == "early_stop":
            ks = [int(k) for k in patience.split(",") if k.strip()]
            if not ks or min(ks) < 1:
                raise ValueError(f"--patience must list integers >= 1, got {patience!r}")
            out += [f"early_stop_{k}" for k in ks]
        elif name in MODE_FLAGS:
            out.append(name)
        else:
            known = ", ".join([*MODE_FLAGS, "early_stop"])
            raise ValueError(f"--modes: unknown mode {name!r} (choose from {known})")
    return ["fp32", *[m for m in dict.fromkeys(out) if m != "fp32"]]


def mode_flags(mode: str) -> dict[str, str]:
    """The translation flags of ``mode`` (precision, early_stop_patience, compile)."""
    flags = {"precision": "fp32", "early_stop_patience": "0", "compile": "False"}
    if mode.startswith("early_stop_"):
        flags["early_stop_patience"] = mode.rsplit("_", 1)[1]
    elif mode != REFERENCE:
        flags.update(MODE_FLAGS[mode])
    return flags


def check_passthrough(extra: list[str]) -> None:
    """ValueError when a translation flag this benchmark sets per mode is given by hand."""
    given = [a.split("=", 1)[0][2:] for a in extra if a.startswith("--")]
    clash = [f"--{f}" for f in OWN_FLAGS if f in given]
    if clash:
        raise ValueError(f"{', '.join(clash)}: set by the benchmark for every mode; omit them")


def reuse_calibration(src: str, dst: str, flags: dict[str, str]) -> str:
    """Copy the reference calibration to ``dst`` with the mode's precision / early_stop_patience recorded
    (the values are the reference's; ``extra.bench_eval_modes`` says so). Returns ``dst``."""
    cals = load_calibrations(src)
    for c in cals.values():
        c.settings.update(precision=flags["precision"], early_stop_patience=int(flags["early_stop_patience"]))
        c.extra["bench_eval_modes"] = f"fp32 reference calibration {src}, relabelled for reuse"
    save_calibrations(dst, cals)
    return dst


def run_eval(argv: list[str], log_dir: str, flags: dict[str, str], calibration: str | None) -> dict:
    """One translation run -> its metrics.json dict with ``bench_wall_s`` and ``bench_peak_mib`` added."""
    cmd = [*argv, "--log_dir", log_dir, "--save_data", "True", "--resume", "False", "--save_nifti", "False",
           "--num_panels", "0",
           *[a for k, v in flags.items() for a in (f"--{k}", v)]]
    if calibration:
        cmd += ["--calibration", calibration]
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    metrics = translation.main(cmd)
    metrics["bench_wall_s"] = time.perf_counter() - t0
    metrics["bench_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20 if cuda else math.nan
    return metrics


def load_arrays(log_dir: str, setting: str) -> dict[str, np.ndarray]:
    """arrays/<setting>.npz of a run (written by --save_data True)."""
    with np.load(os.path.join(log_dir, "arrays", setting.replace(",", "_") + ".npz")) as f:
        return {k: f[k] for k in f.files}


def seconds_per_slice(metrics: dict) -> float:
    """Seconds per test slice of the test loop (metrics.json timing)."""
    ranks = metrics["run"]["timing"]["per_rank"]
    n = sum(r["new_slices"] for r in ranks)
    return sum(r["seconds"] for r in ranks) / n if n else math.nan


def _same_slices(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of slices (first axis) whose entries are all equal."""
    return float(np.mean((a == b).reshape(len(a), -1).all(axis=1)))


def compare(ref: dict[str, np.ndarray], arr: dict[str, np.ndarray]) -> dict[str, float]:
    """Per-slice agreement of a mode's arrays with the reference's (same slices, same order)."""
    if not np.array_equal(ref["index"], arr["index"]):
        raise ValueError("the mode evaluated other test slices than the reference")
    return {
        "same_t_e": _same_slices(ref["end_steps"], arr["end_steps"]),
        "same_mask_slices": _same_slices(ref["pred_mask_cc"], arr["pred_mask_cc"]),
        "same_mask_pixels": float(np.mean(ref["pred_mask_cc"] == arr["pred_mask_cc"])),
        "same_mask_all_pixels": float(np.mean(ref["pred_mask_all"] == arr["pred_mask_all"])),
        "same_pred_label": float(np.mean(ref["pred_label"] == arr["pred_label"])),
        "max_abs_map_diff": float(np.max(np.abs(ref["anomaly_map"] - arr["anomaly_map"]))),
        "max_abs_div_diff": float(np.max(np.abs(ref["div"] - arr["div"]))),
    }


def running_end_steps(div: np.ndarray) -> np.ndarray:
    """End step at every step: [N, nW, S, M] M_t -> [N, nW * M, S] int, the step of each curve's running
    maximum up to t (the forward process's rule: a step is a new maximum when strictly above all before)."""
    n, _, steps, _ = div.shape
    curves = np.moveaxis(div, 2, -1).reshape(n, -1, steps)
    start = np.full(curves.shape[:-1] + (1,), -np.inf, curves.dtype)
    best_before = np.concatenate([start, np.maximum.accumulate(curves, axis=-1)[..., :-1]], axis=-1)
    new = curves > best_before
    return np.maximum.accumulate(np.where(new, np.arange(steps), 0), axis=-1)


def _steps_until_settled(settled: np.ndarray, k: int) -> np.ndarray:
    """[..., S] bool (every curve K steps past its running maximum) -> steps run: 1 + the first step t
    with (t + 1) % K == 0 at which it holds, else S."""
    steps = settled.shape[-1]
    hit = settled & ((np.arange(steps) + 1) % k == 0)
    return np.where(hit.any(axis=-1), hit.argmax(axis=-1) + 1, steps)


def early_stop_outlook(index: np.ndarray, div: np.ndarray, patience: list[int], batch_size: int,
                       world_size: int = 1) -> dict[str, Any]:
    """Where the reference's full M_t curves peak, and the steps ``--early_stop_patience K`` runs on them.

    Args:
        index: [N] test-slice indices 0 .. N-1 of the arrays' rows, in any order (each rank evaluated its
            ShardSampler's indices in batches of ``batch_size``: the eval loader's order).
        div: [N, nW, S, M] M_t of every w of the pass and modality over all S steps (fp32, no early stop).
        patience: the K values; batch_size / world_size: the test loop's.
    Returns: forward_steps S; ``peak_at_last_step``: fraction of slices whose latest t_e (over w and
    modality) is step S - 1 (no early stop can end such a slice before S without changing its t_e);
    ``latest_t_e`` min / median / max; per K, the mean steps a slice runs alone (``solo_steps_mean``) and in
    its batch (``batched_steps_mean``: a batch stops at the first check, every K steps, at which every
    curve of every slice has been below its running maximum for K steps: possibly before a later, higher
    peak). The second is the run's ``steps_run_mean`` when the early-stopped run's curves are the
    reference's (fp32 on the same slices).
    """
    n, _, steps, _ = div.shape
    ends = running_end_steps(div)
    peak = ends[..., -1].max(axis=1)  # the full curves' t_e, latest over w and modality
    out: dict[str, Any] = {
        "forward_steps": int(steps),
        "peak_at_last_step": float(np.mean(peak == steps - 1)),
        "latest_t_e": {"min": int(peak.min()), "median": float(np.median(peak)), "max": int(peak.max())},
        "patience": {},
    }
    row_of = {int(i): r for r, i in enumerate(index)}
    if sorted(row_of) != list(range(n)):
        raise ValueError(f"index must hold each test slice 0 .. {n - 1} once (the arrays' rows), got {index}")
    shards = [[row_of[i] for i in ShardSampler(n, world_size, rank)] for rank in range(world_size)]
    for k in patience:
        settled = (np.arange(steps) - ends >= k).all(axis=1)  # [N, S]
        batched = np.empty(n, dtype=np.int64)
        for mine in shards:
            for start in range(0, len(mine), batch_size):
                chunk = mine[start : start + batch_size]
                batched[chunk] = _steps_until_settled(settled[chunk].all(axis=0), k)
        out["patience"][str(k)] = {"solo_steps_mean": float(_steps_until_settled(settled, k).mean()),
                                   "batched_steps_mean": float(batched.mean())}
    return out


def metric_values(metrics: dict) -> dict[str, float]:
    """The segmentation metrics compared across modes, e.g. {"unhealthy_dice": ...} (NaN when absent)."""
    out = {}
    for group, key in METRICS:
        value = metrics.get(group, {}).get(key)
        out[f"{group}_{key}"] = float(value) if value is not None else math.nan
    return out


def mode_row(mode: str, metrics_list: list[dict], ref: dict, ref_arrays: dict) -> dict[str, Any]:
    """The results of one mode (first run: agreement and metrics; every run: timing)."""
    first = metrics_list[0]
    if first["primary_setting"] != ref["primary_setting"]:
        raise ValueError(f"{mode}: primary setting {first['primary_setting']} != {ref['primary_setting']}")
    values, ref_values = metric_values(first), metric_values(ref)
    row: dict[str, Any] = {
        "mode": mode,
        "flags": mode_flags(mode),
        "s_per_slice": statistics.median(seconds_per_slice(m) for m in metrics_list),
        "wall_s": [m["bench_wall_s"] for m in metrics_list],
        "peak_mib": max(m["bench_peak_mib"] for m in metrics_list),
        "steps_run_mean": first["run"]["timing"].get("steps_run_mean"),
        **compare(ref_arrays, load_arrays(first["bench_log_dir"], ref["primary_setting"])),
        **values,
    }
    row.update({f"delta_{k}": values[k] - ref_values[k] for k in values})
    return row


def benchmark(argv: list[str], modes: list[str], out: str, repeats: int = 1) -> dict[str, Any]:
    """Reference run, then every mode ``repeats`` times (alternating) -> results dict."""
    ref_dir = os.path.join(out, REFERENCE)
    ref = run_eval(argv, ref_dir, mode_flags(REFERENCE), None)
    ref_arrays = load_arrays(ref_dir, ref["primary_setting"])
    cal_dir = os.path.join(out, "calibrations")
    os.makedirs(cal_dir, exist_ok=True)
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    skipped: dict[str, str] = {}
    for rep in range(repeats):
        for mode in [m for m in modes if m not in skipped]:
            flags = mode_flags(mode)
            cal = reuse_calibration(os.path.join(ref_dir, "calibration.json"),
                                    os.path.join(cal_dir, f"{mode}.json"), flags)
            log_dir = os.path.join(out, mode if rep == 0 else f"{mode}.rep{rep}")
            try:
                metrics = run_eval(argv, log_dir, flags, cal)
            except Exception as err:  # noqa: BLE001 - an unsupported mode (fp16 on CPU, ...) is a table row
                if mode == "fp32":
                    raise
                first = str(err).strip().splitlines()[0] if str(err).strip() else ""
                skipped[mode] = f"{type(err).__name__}: {first}"
                continue
            metrics["bench_log_dir"] = log_dir
            runs[mode].append(metrics)
    rows = {m: ({"mode": m, "skipped": skipped[m]} if m in skipped else mode_row(m, runs[m], ref, ref_arrays))
            for m in modes}
    ks = sorted({int(mode_flags(m)["early_stop_patience"]) for m in modes} - {0})
    timing = ref["run"]["timing"]
    outlook = early_stop_outlook(ref_arrays["index"], ref_arrays["div"], ks, int(timing["batch_size"]),
                                 len(timing["per_rank"]))
    for k in ks:
        row = rows[f"early_stop_{k}"]
        if "skipped" not in row:
            row["predicted_steps_run_mean"] = outlook["patience"][str(k)]["batched_steps_mean"]
    base = rows["fp32"]["s_per_slice"]
    for row in rows.values():
        if "skipped" not in row:
            row["speedup_vs_fp32"] = base / row["s_per_slice"] if row["s_per_slice"] > 0 else math.nan
    dev = dist_util.dev()
    return {
        "argv": argv, "out": out, "repeats": repeats, "mode_order": modes,
        "primary_setting": ref["primary_setting"],
        "reference": {"s_per_slice": seconds_per_slice(ref), "n_test": len(ref_arrays["index"]),
                      **metric_values(ref), "calibration": ref["calibration"], "early_stop_outlook": outlook},
        "settings": ref["run"]["config"],
        **{k: ref["run"].get(k) for k in ("checkpoint", "checkpoint_step", "checkpoint_sha256")},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": dev.type,
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "modes": rows,
    }


def table(res: dict[str, Any]) -> str:
    """Markdown table of the modes (agreement and Δ against the fp32 reference run)."""
    heads = ["mode", "steps run", *(c[0] for c in COLUMNS)]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for mode, r in res["modes"].items():
        if "skipped" in r:
            lines.append(f"| {mode} | skipped: {r['skipped']} |" + " |" * (len(heads) - 2))
            continue
        steps = "all" if r["steps_run_mean"] is None else f"{r['steps_run_mean']:.1f}"
        cells = [mode, steps, *(format(r[key], fmt) for _, key, fmt in COLUMNS)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def outlook_line(outlook: dict[str, Any]) -> str:
    """One line on where the reference's M_t curves peak and the steps an early stop would run."""
    te = outlook["latest_t_e"]
    per_k = "; ".join(f"K={k}: {v['solo_steps_mean']:.1f} alone, {v['batched_steps_mean']:.1f} batched"
                      for k, v in outlook["patience"].items())
    return (f"reference M_t peaks (latest t_e per slice of {outlook['forward_steps']} steps): "
            f"min {te['min']}, median {te['median']:g}, max {te['max']}, "
            f"at the last step {outlook['peak_at_last_step']:.1%}"
            + (f"; steps an early stop runs: {per_k}" if per_k else ""))


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """(the benchmark's flags, the flags passed on to translation)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--model_dir", required=True, help="training log dir or export folder (translation's)")
    p.add_argument("--data_dir", required=True, help="the preprocessed dataset the model was trained on")
    p.add_argument("--modes", default="fp32,bf16,fp16,early_stop",
                   help="comma list of fp32, bf16, fp16, early_stop, compile (fp32 always runs)")
    p.add_argument("--patience", default="2,4,8", help="early_stop: comma list of K (--early_stop_patience)")
    p.add_argument("--repeats", type=int, default=1, help="runs per mode (median s/slice reported)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="check that translation runs on this device (default: whatever it picks)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    p.add_argument("--out", default=None, help="new folder for the runs' log dirs (default: a temp dir)")
    p.add_argument("--json", default="benchmarks/results/eval_modes.json", help="results JSON (atomic)")
    args, extra = p.parse_known_args(argv)
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    check_passthrough(extra)
    return args, ["--model_dir", args.model_dir, "--data_dir", args.data_dir, *extra]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark from the command line; returns the results dict (also printed and saved)."""
    args, translation_argv = parse_args(argv)
    modes = parse_modes(args.modes, args.patience)
    if args.threads:
        torch.set_num_threads(args.threads)
    found = dist_util.dev().type
    if args.device and args.device != found:
        raise ValueError(f"--device {args.device}: translation would run on {found} here "
                         "(it uses CUDA whenever visible; hide it with CUDA_VISIBLE_DEVICES=)")
    if args.out and os.path.isdir(args.out) and os.listdir(args.out):
        raise ValueError(f"--out {args.out} is not empty; give a new folder")
    out = args.out or tempfile.mkdtemp(prefix="bench_eval_modes_")
    res = benchmark(translation_argv, modes, out, args.repeats)
    print(f"\nEvaluation modes ({res['device_name']}, {res['threads']} threads, torch {res['torch']}), "
          f"{res['reference']['n_test']} test slices, {res['primary_setting']}; Δ vs the fp32 reference run")
    print(table(res))
    print(outlook_line(res["reference"]["early_stop_outlook"]))
    print(f"runs: {out}")
    if args.json:
        atomic_write_json(res, args.json)
        print(f"wrote {args.json}")
    return res


if __name__ == "__main__":
    sys.exit(run_cli(main))
