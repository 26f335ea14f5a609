"""The per-patient 3-D ("volume") part of the evaluation outputs (issue 12), used by translation_outputs.

For the primary setting only, each patient's evaluated test slices are stacked in slice order and scored
with :mod:`guided_diffusion.metrics.volume_metrics` (3-D Dice / IoU, HD95 / HD / ASD in mm via MONAI,
lesion-wise
TP / FP / FN / F1 / Dice). The masks are the gated, connected-component-filtered masks the slice metrics
use, so the slice metrics and slices.csv are untouched. metrics.json gets a "volume" section (means / std
over patients, pooled lesion counts, the conventions below); patients.csv the per-patient columns on the
primary setting's rows (empty on the rows of the other settings).

Voxel spacing comes from each patient's ``npy_test/patient_<id>/meta.json`` (affine, raw shape, slice
step) and the in-plane resize; a patient without meta.json is scored at an assumed 1 mm isotropic spacing
and named in ``volume.spacing_assumed_patients`` (its distances are then in voxels, not mm).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from guided_diffusion.metrics.base import SliceBatch
from guided_diffusion.metrics.volume_metrics import HD_MAX_MM, VolumeMetrics, evaluate_volumes

PATIENT_COLUMNS = ("n_slices_3d", "n_slices_missing", "spacing_z_mm", "spacing_y_mm", "spacing_x_mm",
                   "dice_3d", "iou_3d", "hd95_mm", "hd_mm", "asd_mm", "lesion_tp", "lesion_fp", "lesion_fn",
                   "lesion_f1", "lesion_dice")
LESION_DILATION = 0
MIN_LESION_VOXELS = 0
ASSUMED_SPACING = (1.0, 1.0, 1.0)  # (z, y, x) mm of a patient without meta.json
CONVENTIONS = {
    "volume": "a patient's evaluated test slices stacked in slice order (slices of the range that were not "
              "evaluated are empty in prediction and GT); masks: gated and CC-filtered, as slices.csv",
    "empty_both": "prediction and GT empty: dice_3d = iou_3d = 1, hd95 = hd = asd = 0 mm",
    "empty_one": f"exactly one of them empty: dice_3d = iou_3d = 0, hd95 = hd = asd = {HD_MAX_MM} mm "
                 "(the BraTS penalty: diagonal of the 240 x 240 x 155 grid at 1 mm)",
    "surface": "MONAI compute_hausdorff_distance (percentile 95 / max) and compute_average_surface_distance "
               "(symmetric), Euclidean, in mm from the meta.json affine and the in-plane resize",
    "lesions": f"26-connected 3-D components; a GT lesion (dilated {LESION_DILATION} times, GT lesions under "
               f"{MIN_LESION_VOXELS} voxels dropped) touched by a predicted component is a TP, else an FN; "
               "a predicted component touching no GT lesion is an FP; lesion_f1 = 2TP / (2TP + FP + FN), "
               "lesion_dice = sum of TP lesion Dice / (TP + FP + FN); no lesions at all: both 1",
    "means": "_mean / _std: over patients (std ddof 0), every patient counted (empty ones by the rules "
             "above); lesion_tp / fp / fn summed over patients, lesion_f1_pooled from the sums",
}

# the per-patient means of the volume section that run tables report
VOLUME_METRICS = ("dice_3d_mean", "iou_3d_mean", "hd95_mm_mean", "asd_mm_mean", "lesion_f1_mean",
                  "lesion_dice_mean", "lesion_f1_pooled", "n_patients")


def _has_meta(data_dir: str, split: str, patient: str) -> bool:
    return os.path.isfile(os.path.join(data_dir, f"npy_{split}", f"patient_{patient}", "meta.json"))


def _spacing_source(n_assumed: int, n_patients: int) -> str:
    if n_assumed == 0:
        return "meta.json"
    if n_assumed == n_patients:
        return "assumed 1 mm isotropic (no meta.json): distances are in voxels"
    return "meta.json; assumed 1 mm isotropic for spacing_assumed_patients (no meta.json)"


def volume_metric(data_dir: str, split: str = "test") -> VolumeMetrics:
    """The accumulator of the "volume" section: gated masks, ASSUMED_SPACING where meta.json is missing."""
    return VolumeMetrics(data_dir, split=split, default_spacing=ASSUMED_SPACING, dilation=LESION_DILATION,
                         min_lesion_voxels=MIN_LESION_VOXELS)


def volume_section_of(metric: VolumeMetrics, setting: str) -> tuple[dict[str, Any], list[dict]]:
    """(metrics.json "volume" section, per-patient rows) of the slices accumulated in ``metric`` (made by
    ``volume_metric``); ``setting`` is the setting's key (e.g. ``w=2,t_e_ratio=1``), recorded in the
    section. No slices: n_patients 0 and NaN means (the section is still written)."""

    patients = metric.patients()
    data_dir, split = metric.data_dir or "", metric.split
    assumed = [p for p in patients if not _has_meta(data_dir, split, p)]
    res = metric.aggregate() if len(metric) else evaluate_volumes({}, ASSUMED_SPACING)
    section = {
        "produced_by": "guided_diffusion.metrics.volume_outputs.volume_section "
                       "(volume_metrics, monai.metrics)",
        "setting": setting,
        **res["summary"],
        "spacing_source": _spacing_source(len(assumed), len(patients)),
        "spacing_assumed_patients": assumed,
        "lesion_dilation": LESION_DILATION,
        "min_lesion_voxels": MIN_LESION_VOXELS,
        "conventions": dict(CONVENTIONS),
    }
    return section, res["patients"]


def volume_section(slice_ids: Sequence[tuple[Any, Any]], pred_masks: Sequence[Any], gt_masks: Sequence[Any],
                   data_dir: str, setting: str, split: str = "test") -> tuple[dict[str, Any], list[dict]]:
    """``volume_section_of`` for one setting's per-slice masks given at once.

    Args:
        slice_ids: (patient, slice_number) of every evaluated slice; pred_masks / gt_masks: [H, W] each.
    """

    metric = volume_metric(data_dir, split)
    metric.accumulate(SliceBatch(slice_ids=list(slice_ids), pred_mask_gated=list(pred_masks),
                                 gt=list(gt_masks)))
    return volume_section_of(metric, setting)


def merge_patient_rows(rows: Sequence[Mapping[str, Any]], volume_rows: Sequence[Mapping[str, Any]],
                       setting: str) -> list[dict[str, Any]]:
    """patients.csv rows with the volume columns added to the rows of ``setting`` (matched by patient)."""
    by_patient = {str(v["patient"]): v for v in volume_rows}
    out = []
    for r in rows:
        row = dict(r)
        vol = by_patient.get(str(r["patient"])) if r.get("setting") == setting else None
        for col in PATIENT_COLUMNS:
            row[col] = vol[col] if vol is not None else None
        out.append(row)
    return out
