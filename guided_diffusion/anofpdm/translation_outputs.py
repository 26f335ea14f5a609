"""Output side of the AnoFPDM evaluation (``guided_diffusion.anofpdm.translation``): metrics, CSVs, panels,
NIfTI.

Everything here runs on rank 0 after the per-slice records of the test split have been gathered.

* metrics.json: the E1 ``SegmentationEvaluator`` results of the primary setting at the top level (the w
  chosen by the paper's selection rule when several ``--w`` are given, else the only w; the first
  ``--t_e_ratio``), every setting under "settings_results", the calibrations, the guidance-selection table
  (several w only) and the run settings;
* "volume" (metrics.json) and the 3-D columns of patients.csv: per-patient 3-D Dice / IoU / HD95 / ASD (mm)
  and lesion-wise detection of the primary setting (``guided_diffusion.metrics.volume_outputs``;
  conventions for
  empty masks in ``metrics["volume"]["conventions"]``);
* slices.csv / patients.csv: per-slice / per-patient rows of every setting;
* panels/ (PNG + index.html) and nifti/ (``--save_nifti``) of the primary setting;
* arrays/ (``--save_data``): one .npz per setting.

Connected-component filter size: ``--min_cc_size -1`` (default) scales the paper's 40 px at 128 x 128 to the
image size by area, ``round(40 * (image_size / 128) ** 2)`` rounded half up (10 at 64 px, 3 at 32 px, 160 at
256 px); a value >= 0 is used as given (0 keeps every component).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from guided_diffusion.anofpdm.pipeline import setting_key
from guided_diffusion.configs.calibration import Calibration
from guided_diffusion.configs.eval_configs import EvalRun, resolve_min_cc_size
from guided_diffusion.data.brats import get_eval_loader
from guided_diffusion.metrics.base import SliceBatch
from guided_diffusion.metrics.evaluator import SegmentationEvaluator
from guided_diffusion.metrics.metrics_legacy import LegacyRunningMetrics
from guided_diffusion.metrics.volume_outputs import merge_patient_rows, volume_metric, volume_section_of
from guided_diffusion.reporting import report
from guided_diffusion.reporting.run_summary import add_run_summary

MODALITY_NAMES = {4: ["FLAIR", "T1", "T1ce", "T2"], 1: ["T1"]}


def write_outputs(
    run: EvalRun,
    records: Mapping[int, dict],
    cals: Mapping[float, Calibration],
    log_dir: str,
    extra: Mapping[str, Any],
    primary_w: float | None = None,
    guidance_selection: Mapping[str, Any] | None = None,
) -> dict:
    """Rank 0: metrics (E1 evaluator), CSVs, panels, NIfTI, arrays. Returns the metrics dict.

    Args:
        records: {dataset index: record of PipelineOutput.records()} for the whole test split.
        run: the run's configs (not modified).
        cals: {w: Calibration} for every w of ``run.forward.w``.
        extra: merged into metrics["run"] (forward settings, timing, checkpoint, ...).
        primary_w: the w of the top-level metrics, panels and NIfTI (default the first w).
        guidance_selection: stored as metrics["guidance_selection"] when given.
    """

    ev, seg, ws = run.eval, run.segment, run.forward.w
    _, dataset = get_eval_loader(
        ev.data_dir, "test", ev.batch_size, num_slices=ev.num_slices, in_channels=run.model.in_channels
    )
    min_cc = resolve_min_cc_size(seg.min_cc_size, run.model.image_size)
    order = sorted(records)
    keys = [setting_key(w, r) for w in ws for r in seg.t_e_ratio]
    primary = setting_key(ws[0] if primary_w is None else primary_w, seg.t_e_ratio[0])
    if primary not in keys:
        raise ValueError(f"primary setting {primary} is not one of the evaluated settings {keys}")
    # every metric is a CumulativeMetric (metrics/base.py) fed the same SliceBatch per chunk and setting;
    # the 3-D metrics of the primary setting score the evaluator's CC-filtered gated masks
    evals = {k: SegmentationEvaluator(min_cc_size=min_cc) for k in keys}
    legacy = {k: LegacyRunningMetrics() for k in keys} if seg.legacy_metrics else {}
    volume = volume_metric(ev.data_dir, split="test")
    filtered: dict[str, dict[int, np.ndarray]] = {k: {} for k in keys}
    cache: dict[int, tuple] = {}
    for start in range(0, len(order), ev.batch_size):
        chunk = order[start : start + ev.batch_size]
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
            batch = SliceBatch(
                pred_mask_gated=stack["mask"],
                pred_mask_all=stack["mask_all"],
                anomaly_map=stack["map"],
                gt=gt,
                source=src,
                label=lab,
                pred_label=np.array([o["pred_lab"] for o in outs]),
                slice_ids=ids,
                extra={
                    "index": chunk,
                    "cos": [o["cos"] for o in outs],
                    "t_e": [int(np.max(o["end_steps"])) for o in outs],
                },
            )
            res = evals[k].accumulate(batch)
            for i, m in zip(chunk, res["pred_mask_gated"]):
                filtered[k][i] = m
            if k in legacy:
                legacy[k].accumulate(batch)
            if k == primary:
                volume.accumulate(dataclasses.replace(batch, pred_mask_gated=res["pred_mask_gated"]))
    results = {k: evals[k].aggregate() for k in keys}
    metrics = {
        **results[primary],
        "primary_setting": primary,
        "settings_results": results,
        "calibration": {f"{w:g}": vars(cals[float(w)]) for w in ws},
        "run": {
            "legacy_segmentation": seg.legacy_segmentation,
            "median_filter": seg.median_filter,
            "last_only": seg.last_only,
            "subset_interval": seg.subset_interval,
            "min_cc_size": min_cc,
            "seed": ev.seed,
            **extra,
        },
    }
    metrics["volume"], volume_rows = volume_section_of(volume, primary)
    if guidance_selection is not None:
        metrics["guidance_selection"] = dict(guidance_selection)
    if legacy:
        metrics["legacy"] = {k: v.aggregate() for k, v in legacy.items()}
    report.write_metrics_json(os.path.join(log_dir, "metrics.json"), metrics)
    slice_rows, patient_rows = [], []
    for k in keys:
        slice_rows += [{"setting": k, **r} for r in evals[k].slice_records()]
        patient_rows += [{"setting": k, **r} for r in evals[k].patient_records()]
    report.write_csv(os.path.join(log_dir, "slices.csv"), slice_rows)
    report.write_csv(os.path.join(log_dir, "patients.csv"),
                     merge_patient_rows(patient_rows, volume_rows, primary))
    _write_panels(run, records, cache, filtered[primary], primary, results[primary], log_dir)
    add_run_summary(os.path.join(log_dir, "panels", "index.html"), metrics)
    if ev.save_nifti:
        _write_nifti(ev.data_dir, records, cache, filtered[primary], primary, log_dir)
    if ev.save_data:
        _write_arrays(records, order, keys, filtered, log_dir)
    return metrics


def _write_arrays(records, order, keys, filtered, log_dir) -> None:
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


def _write_panels(run: EvalRun, records, cache, filtered, key, results, log_dir) -> None:
    order = sorted(records)
    unhealthy = [i for i in order if int(cache[i][0][2]) == 1]
    healthy = [i for i in order if int(cache[i][0][2]) != 1]
    n_panels = run.eval.num_panels
    n_u = min(len(unhealthy), (n_panels + 1) // 2 if healthy else n_panels)
    pick = _spread(unhealthy, n_u) + _spread(healthy, n_panels - n_u)
    min_cc = resolve_min_cc_size(run.segment.min_cc_size, run.model.image_size)
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
                "pred_mask_raw": out["mask"],  # before the size filter: says why a mask is empty
                "min_cc_size": min_cc,
                "patient": pid,
                "slice": sl,
                "label": int(lab),
                "pred_label": out["pred_lab"],
            }
        )
    n_ch = run.model.in_channels
    names = MODALITY_NAMES.get(n_ch, [f"ch{c}" for c in range(n_ch)])
    report.save_panels(
        os.path.join(log_dir, "panels"),
        items,
        names,
        modalities=list(run.forward.modality),
        metrics=results,
        title=f"AnoFPDM evaluation ({key})",
    )


def _spread(ids: list[int], n: int) -> list[int]:
    """Up to n of ``ids`` spread evenly over the list (first and last included)."""
    if n <= 0 or not ids:
        return []
    pos = np.linspace(0, len(ids) - 1, min(n, len(ids))).round().astype(int)
    return [ids[p] for p in sorted(set(pos.tolist()))]


def _write_nifti(data_dir: str, records, cache, filtered, key, log_dir) -> None:
    by_patient: dict[str, list[int]] = {}
    for i in sorted(records):
        by_patient.setdefault(str(cache[i][1][0]), []).append(i)
    for pid, ids in by_patient.items():
        ids = sorted(ids, key=lambda i: cache[i][1][1])
        meta = os.path.join(data_dir, "npy_test", f"patient_{pid}", "meta.json")
        report.save_nifti_volumes(
            os.path.join(log_dir, "nifti"),
            pid,
            [int(cache[i][1][1]) for i in ids],
            np.stack([records[i]["out"][key]["map"] for i in ids]),
            np.stack([filtered[i] for i in ids]).astype(np.uint8),
            meta=meta if os.path.isfile(meta) else None,
            gt=np.stack([cache[i][0][1][0].numpy() for i in ids]),
        )
