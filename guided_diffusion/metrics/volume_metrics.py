"""Per-patient 3-D metrics on the stacked slices of each volume (issue 12): Dice, IoU, HD95, ASD, lesion-wise.

Volumes are ``[D, H, W]`` (slice axis first, slices in slice-number order); ``spacing`` is
``(z, y, x)``-ordered in the same axis order, i.e. ``(slice spacing, row spacing, column spacing)`` in mm.
Surface distances use :mod:`monai.metrics` (``compute_hausdorff_distance(percentile=95)``,
``compute_hausdorff_distance`` for the maximum and ``compute_average_surface_distance(symmetric=True)``),
with MONAI's surface definition (mask XOR its 6-connected erosion) and exact Euclidean distances in mm.

Empty masks (BraTS convention, documented here and in the column docs):
    * prediction and GT both empty: Dice = IoU = 1, HD95 = HD = ASD = 0;
    * exactly one of them empty: Dice = IoU = 0, HD95 = HD = ASD = ``HD_MAX_MM`` = 373.13 mm
      (the diagonal of the 240 x 240 x 155 BraTS grid at 1 mm, the penalty BraTS uses).

Lesion-wise detection (BraTS 2023 lesion-wise style): lesions are the 3-D connected components with
26-connectivity (``scipy.ndimage.label`` with a 3x3x3 structure) of prediction and GT.  Each GT lesion's
matching region is the lesion dilated ``dilation`` times with the same 26-connected structure (0 = the
lesion itself; BraTS-GLI uses 3 at 1 mm).  A GT lesion is a TP when any predicted component touches its
matching region, else an FN; a predicted component that touches no matching region is an FP.  GT lesions
smaller than ``min_lesion_voxels`` are dropped before matching (BraTS-GLI: 50 at 1 mm; default 0 keeps all).
Per TP lesion, Dice = Dice(GT lesion, union of the predicted components touching its region);
lesion-wise Dice = sum of those Dice / (TP + FN + FP) (every FN and FP scores 0);
lesion-wise F1 = 2 TP / (2 TP + FP + FN).  No lesions in either mask: lesion Dice = F1 = 1.

``VolumeMetrics`` is the same computation as a CumulativeMetric (metrics/base.py): it collects the slices
of SliceBatches (slice_ids, a predicted mask, gt) and aggregates them with
``volume_metrics_from_records``.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from guided_diffusion.metrics.base import CumulativeMetric, SliceBatch

HD_MAX_MM = 373.13
STRUCT_26 = np.ones((3, 3, 3), dtype=bool)
ROW_COLUMNS = ("dice_3d", "iou_3d", "hd95_mm", "hd_mm", "asd_mm", "lesion_tp", "lesion_fp", "lesion_fn",
               "lesion_f1", "lesion_dice")
SUMMARY_COLUMNS = ("dice_3d", "iou_3d", "hd95_mm", "asd_mm", "lesion_f1", "lesion_dice")

__all__ = ["HD_MAX_MM", "ROW_COLUMNS", "SUMMARY_COLUMNS", "grid_spacing", "spacing_from_meta",
           "stack_slices", "overlap_metrics", "surface_metrics", "lesion_metrics", "patient_metrics",
           "evaluate_volumes", "volume_metrics_from_records", "VolumeMetrics"]


def _as_volume(x: Any, name: str) -> np.ndarray:
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if arr.ndim != 3:
        raise ValueError(f"`{name}` must be a 3-D volume [D, H, W], got shape {arr.shape}")
    return arr.astype(bool) if arr.dtype == bool else arr > 0.5


def _check_spacing(spacing: Sequence[float]) -> tuple[float, float, float]:
    sp = tuple(float(s) for s in spacing)
    if len(sp) != 3 or not all(math.isfinite(s) and s > 0 for s in sp):
        raise ValueError(f"`spacing` must be 3 positive finite mm values (z, y, x), got {tuple(spacing)}")
    return sp  # type: ignore[return-value]


def grid_spacing(affine: Any, original_shape: Sequence[int], new_hw: Sequence[int],
                 slice_step: int = 1) -> tuple[float, float, float]:
    """(z, y, x) spacing in mm of the resized slice grid of one patient.

    ``affine`` maps original voxel (i, j, k) to mm with the axial slices along k
    (docs/method.md, 'Preprocessing'); the in-plane axes i, j of size ``original_shape[:2]`` were resized to
    ``new_hw`` (H rows from i, W columns from j), so their spacing grows by ``H0 / H`` and ``W0 / W``; the
    slice spacing is the k-column norm times ``slice_step`` (every slice_step-th slice kept).
    """
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4) or not np.all(np.isfinite(a)):
        raise ValueError(f"meta.json `affine` must be a finite 4x4 matrix, got shape {a.shape}")
    if len(original_shape) < 3 or len(new_hw) != 2 or min(*new_hw, *original_shape[:2]) <= 0:
        raise ValueError(f"need the original shape (H0, W0, D0) and the resized (H, W); got "
                         f"{tuple(original_shape)}, {tuple(new_hw)}")
    if slice_step < 1:
        raise ValueError(f"meta.json `slice_step` must be >= 1, got {slice_step}")
    norms = np.linalg.norm(a[:3, :3], axis=0)
    sy = norms[0] * original_shape[0] / new_hw[0]
    sx = norms[1] * original_shape[1] / new_hw[1]
    return _check_spacing((norms[2] * slice_step, sy, sx))


def spacing_from_meta(meta: Mapping[str, Any] | str, new_hw: Sequence[int]) -> tuple[float, float, float]:
    """:func:`grid_spacing` from a patient's meta.json (dict or path; keys affine, shape, slice_step)."""
    path = None
    if isinstance(meta, (str, os.PathLike)):
        path = os.fspath(meta)
        try:
            with open(path, encoding="utf-8") as f:
                meta = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err}); re-run the preprocessing") from err
    missing = [k for k in ("affine", "shape") if k not in meta]
    if missing:
        raise ValueError(f"{path or 'meta.json'} lacks {missing}; re-run the preprocessing to write them")
    return grid_spacing(meta["affine"], meta["shape"], new_hw, int(meta.get("slice_step", 1)))


def stack_slices(slices: Iterable[tuple[int, Any, Any]], slice_step: int = 1
                 ) -> tuple[np.ndarray, np.ndarray, int]:
    """Stack (slice_number, pred [H, W], gt [H, W]) into pred, gt [D, H, W] in slice order.

    The volume spans the smallest to the largest slice number at ``slice_step``; slice numbers off that
    grid raise ValueError; slices of the range that were not given are left empty in both volumes and
    counted in the returned ``n_missing``.
    """
    items = sorted(slices, key=lambda s: int(s[0]))
    if not items:
        raise ValueError("no slices given for this patient")
    nums = [int(s[0]) for s in items]
    if len(set(nums)) != len(nums):
        raise ValueError(f"duplicate slice numbers {sorted({n for n in nums if nums.count(n) > 1})[:5]}")
    off = [n for n in nums if (n - nums[0]) % slice_step]
    if off:
        raise ValueError(f"slice numbers {off[:5]} are not on the slice_step={slice_step} grid "
                         f"from {nums[0]}")
    pred0 = np.asarray(items[0][1]).squeeze()
    if pred0.ndim != 2:
        raise ValueError(f"slice masks must be [H, W] (or [1, H, W]), got shape "
                         f"{np.asarray(items[0][1]).shape}")
    depth = (nums[-1] - nums[0]) // slice_step + 1
    pred = np.zeros((depth, *pred0.shape), dtype=bool)
    gt = np.zeros_like(pred)
    for n, p, g in items:
        z = (int(n) - nums[0]) // slice_step
        p2, g2 = np.asarray(p).squeeze(), np.asarray(g).squeeze()
        if p2.shape != pred0.shape or g2.shape != pred0.shape:
            raise ValueError(f"slice {n}: pred {p2.shape} / gt {g2.shape} differ from {pred0.shape}")
        pred[z], gt[z] = p2 > 0.5, g2 > 0.5
    return pred, gt, depth - len(items)


def overlap_metrics(pred: Any, gt: Any) -> dict[str, float]:
    """3-D Dice and IoU (unsmoothed; both empty -> 1, see module docstring)."""
    p, g = _as_volume(pred, "pred"), _as_volume(gt, "gt")
    inter, n_p, n_g = int((p & g).sum()), int(p.sum()), int(g.sum())
    if n_p + n_g == 0:
        return {"dice_3d": 1.0, "iou_3d": 1.0}
    return {"dice_3d": 2.0 * inter / (n_p + n_g), "iou_3d": inter / (n_p + n_g - inter)}


def surface_metrics(pred: Any, gt: Any, spacing: Sequence[float]) -> dict[str, float]:
    """HD95, HD (max) and symmetric average surface distance in mm via monai.metrics (empty: docstring)."""
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

    p, g = _as_volume(pred, "pred"), _as_volume(gt, "gt")
    sp = _check_spacing(spacing)
    if p.shape != g.shape:
        raise ValueError(f"pred {p.shape} and gt {g.shape} volumes differ in shape")
    if not p.any() and not g.any():
        return {"hd95_mm": 0.0, "hd_mm": 0.0, "asd_mm": 0.0}
    if not p.any() or not g.any():
        return {"hd95_mm": HD_MAX_MM, "hd_mm": HD_MAX_MM, "asd_mm": HD_MAX_MM}
    yp = torch.from_numpy(p)[None, None].float()
    yg = torch.from_numpy(g)[None, None].float()
    kw = {"include_background": True, "spacing": list(sp)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hd95 = compute_hausdorff_distance(yp, yg, percentile=95, **kw)
        hd = compute_hausdorff_distance(yp, yg, **kw)
        asd = compute_average_surface_distance(yp, yg, symmetric=True, **kw)
    return {"hd95_mm": float(hd95.item()), "hd_mm": float(hd.item()), "asd_mm": float(asd.item())}


def lesion_metrics(pred: Any, gt: Any, dilation: int = 0, min_lesion_voxels: int = 0) -> dict[str, Any]:
    """Lesion-wise TP / FP / FN, F1 and Dice (26-connected 3-D components; see module docstring)."""
    p, g = _as_volume(pred, "pred"), _as_volume(gt, "gt")
    if p.shape != g.shape:
        raise ValueError(f"pred {p.shape} and gt {g.shape} volumes differ in shape")
    if dilation < 0 or min_lesion_voxels < 0:
        raise ValueError(f"dilation and min_lesion_voxels must be >= 0, got {dilation}, {min_lesion_voxels}")
    gl, n_gt = ndimage.label(g, structure=STRUCT_26)
    pl, n_pred = ndimage.label(p, structure=STRUCT_26)
    pred_sizes = np.bincount(pl.ravel(), minlength=n_pred + 1)
    touched: set[int] = set()
    tp, fn, dice_sum = 0, 0, 0.0
    for lab, box in enumerate(ndimage.find_objects(gl), start=1):
        # work in the lesion's bounding box grown by the dilation (the region cannot leave it)
        crop = tuple(slice(max(b.start - dilation, 0), min(b.stop + dilation, n))
                     for b, n in zip(box, g.shape))
        lesion = gl[crop] == lab
        size = int(lesion.sum())
        if size < min_lesion_voxels:
            continue
        region = ndimage.binary_dilation(lesion, STRUCT_26, iterations=dilation) if dilation else lesion
        hits = np.unique(pl[crop][region])
        hits = hits[hits > 0]
        if hits.size == 0:
            fn += 1
            continue
        tp += 1
        touched.update(int(h) for h in hits)
        overlap = int(np.isin(pl[crop][lesion], hits).sum())
        dice_sum += 2.0 * overlap / float(pred_sizes[hits].sum() + size)
    fp = n_pred - len(touched)
    total = tp + fn + fp
    return {
        "lesion_tp": tp,
        "lesion_fp": fp,
        "lesion_fn": fn,
        "lesion_f1": 1.0 if total == 0 else 2.0 * tp / (2 * tp + fp + fn),
        "lesion_dice": 1.0 if total == 0 else dice_sum / total,
    }


def patient_metrics(pred: Any, gt: Any, spacing: Sequence[float], dilation: int = 0,
                    min_lesion_voxels: int = 0) -> dict[str, Any]:
    """All 3-D metrics of one patient's volumes (columns ROW_COLUMNS)."""
    return {**overlap_metrics(pred, gt), **surface_metrics(pred, gt, spacing),
            **lesion_metrics(pred, gt, dilation, min_lesion_voxels)}


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"n_patients": len(rows),
                           "n_patients_lesion": sum(r["n_gt_voxels"] > 0 for r in rows)}
    for name in SUMMARY_COLUMNS:
        v = np.array([r[name] for r in rows], dtype=np.float64)
        out[name + "_mean"] = float(v.mean()) if v.size else float("nan")
        out[name + "_std"] = float(v.std()) if v.size else float("nan")
    for name in ("lesion_tp", "lesion_fp", "lesion_fn"):
        out[name] = int(sum(r[name] for r in rows))
    tp, fp, fn = out["lesion_tp"], out["lesion_fp"], out["lesion_fn"]
    out["lesion_f1_pooled"] = 1.0 if tp + fp + fn == 0 else 2.0 * tp / (2 * tp + fp + fn)
    return out


def evaluate_volumes(groups: Mapping[str, Sequence[tuple[int, Any, Any]]],
                     spacing: Mapping[str, Sequence[float]] | Sequence[float],
                     slice_step: Mapping[str, int] | int = 1, dilation: int = 0,
                     min_lesion_voxels: int = 0) -> dict[str, Any]:
    """Per-patient 3-D metrics and their mean / std (ddof 0) over patients.

    Args:
        groups: {patient: [(slice_number, pred [H, W], gt [H, W]), ...]} (any order; stacked by number).
        spacing: (z, y, x) mm for every patient, or {patient: (z, y, x)}.
        slice_step: slice-number step of the stored slices (int or {patient: int}).
    Returns:
        {"patients": rows sorted by patient (patient, n_slices_3d, n_slices_missing, n_gt_voxels,
        n_pred_voxels, spacing_z/y/x_mm, *ROW_COLUMNS), "summary": {n_patients, n_patients_lesion,
        <SUMMARY_COLUMNS>_mean / _std, lesion_tp / fp / fn (summed), lesion_f1_pooled}}.
    """
    rows = []
    for patient in sorted(groups, key=str):
        sp = spacing[patient] if isinstance(spacing, Mapping) else spacing
        step = slice_step[patient] if isinstance(slice_step, Mapping) else slice_step
        try:
            pred, gt, missing = stack_slices(groups[patient], int(step))
            sp = _check_spacing(sp)
        except ValueError as err:
            raise ValueError(f"patient {patient!r}: {err}") from err
        rows.append({"patient": str(patient), "n_slices_3d": int(pred.shape[0]), "n_slices_missing": missing,
                     "n_gt_voxels": int(gt.sum()), "n_pred_voxels": int(pred.sum()),
                     "spacing_z_mm": sp[0], "spacing_y_mm": sp[1], "spacing_x_mm": sp[2],
                     **patient_metrics(pred, gt, sp, dilation, min_lesion_voxels)})
    return {"patients": rows, "summary": _summary(rows)}


def volume_metrics_from_records(slice_ids: Sequence[tuple[Any, Any]], pred_masks: Sequence[Any],
                                gt_masks: Sequence[Any], data_dir: str | None, split: str = "test",
                                default_spacing: Sequence[float] | None = None, dilation: int = 0,
                                min_lesion_voxels: int = 0) -> dict[str, Any]:
    """Adapter for the evaluator: per-slice (patient, slice_number), pred and GT masks -> evaluate_volumes.

    Spacing and slice_step come from ``data_dir/npy_{split}/patient_{id}/meta.json``; a patient without
    meta.json uses ``default_spacing`` (z, y, x mm) or raises ValueError naming the file when None.
    """
    if not (len(slice_ids) == len(pred_masks) == len(gt_masks)):
        raise ValueError(f"slice_ids ({len(slice_ids)}), pred_masks ({len(pred_masks)}) and gt_masks "
                         f"({len(gt_masks)}) must have one entry per slice")
    groups: dict[str, list[tuple[int, Any, Any]]] = {}
    for (pid, num), p, g in zip(slice_ids, pred_masks, gt_masks):
        p = p.detach().cpu().numpy() if isinstance(p, torch.Tensor) else np.asarray(p)
        g = g.detach().cpu().numpy() if isinstance(g, torch.Tensor) else np.asarray(g)
        groups.setdefault(str(pid), []).append((int(num), p, g))
    spacing: dict[str, tuple[float, float, float]] = {}
    steps: dict[str, int] = {}
    for pid, items in groups.items():
        hw = np.asarray(items[0][1]).squeeze().shape
        path = os.path.join(data_dir, f"npy_{split}", f"patient_{pid}", "meta.json") if data_dir else None
        if path and os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                try:
                    meta = json.load(f)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}: not valid JSON ({err}); re-run the preprocessing") from err
            try:
                spacing[pid] = spacing_from_meta(meta, hw)
            except ValueError as err:
                raise ValueError(f"{path}: {err}") from err
            steps[pid] = int(meta.get("slice_step", 1))
        elif default_spacing is not None:
            spacing[pid], steps[pid] = _check_spacing(default_spacing), 1
        else:
            raise ValueError(f"patient {pid!r}: no meta.json at {path} for the voxel spacing; pass "
                             "default_spacing=(z, y, x) mm or re-run the preprocessing")
    return evaluate_volumes(groups, spacing, steps, dilation, min_lesion_voxels)


def _slice_array(x: Any) -> np.ndarray:
    """A copy of one slice's mask (the caller may reuse its buffers)."""
    return x.detach().cpu().numpy().copy() if isinstance(x, torch.Tensor) else np.array(x, copy=True)


class VolumeMetrics(CumulativeMetric):
    """Per-patient 3-D metrics accumulated slice batch by slice batch (a CumulativeMetric).

    Args:
        data_dir / split: where each patient's ``npy_{split}/patient_{id}/meta.json`` (spacing, slice step)
            is read; None: every patient uses ``default_spacing``.
        default_spacing: (z, y, x) mm of a patient without meta.json (None: such a patient is an error).
        dilation / min_lesion_voxels: the lesion-wise matching (``lesion_metrics``).
        mask: the predicted mask of the batch that is scored, "pred_mask_gated" or "pred_mask_all".

    accumulate(batch) keeps each slice's (patient, slice number), mask [H, W] and GT, refusing a slice
    added twice; aggregate() is ``volume_metrics_from_records`` over them: {"patients": rows,
    "summary": means}. len() counts slices.
    """

    def __init__(self, data_dir: str | None = None, split: str = "test",
                 default_spacing: Sequence[float] | None = None, dilation: int = 0,
                 min_lesion_voxels: int = 0, mask: str = "pred_mask_gated"):
        if mask not in ("pred_mask_gated", "pred_mask_all"):
            raise ValueError(f"mask must be 'pred_mask_gated' or 'pred_mask_all', got {mask!r}")
        self.data_dir, self.split, self.mask = data_dir, split, mask
        self.default_spacing = default_spacing
        self.dilation, self.min_lesion_voxels = int(dilation), int(min_lesion_voxels)
        self._slices: dict[tuple[str, int], tuple[Any, np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self._slices)

    def reset(self) -> None:
        self._slices.clear()

    def patients(self) -> list[str]:
        """The patients accumulated so far, sorted."""
        return sorted({p for p, _ in self._slices})

    def accumulate(self, batch: SliceBatch) -> None:
        """Keep the batch's slices (fields slice_ids, gt and the chosen mask)."""
        batch.require("VolumeMetrics", "slice_ids", "gt", self.mask)
        ids, preds, gts = list(batch.slice_ids), getattr(batch, self.mask), batch.gt
        if not (len(ids) == len(preds) == len(gts)):
            raise ValueError(f"slice_ids ({len(ids)}), {self.mask} ({len(preds)}) and gt ({len(gts)}) "
                             "must have one entry per slice")
        keys = [(str(p), int(n)) for p, n in ids]
        dup = [k for k in keys if k in self._slices] + [k for k in set(keys) if keys.count(k) > 1]
        if dup:
            raise ValueError(f"slices added twice to VolumeMetrics: {dup[:5]}")
        for key, sid, p, g in zip(keys, ids, preds, gts):
            self._slices[key] = (sid, _slice_array(p), _slice_array(g))

    def _aggregate(self) -> dict[str, Any]:
        ids, preds, gts = zip(*self._slices.values())
        return volume_metrics_from_records(list(ids), list(preds), list(gts), self.data_dir, split=self.split,
                                           default_spacing=self.default_spacing, dilation=self.dilation,
                                           min_lesion_voxels=self.min_lesion_voxels)
