"""Segmentation and classification metrics for AnoFPDM evaluation (docs/method.md, 'Metrics').

Inputs may be numpy arrays or torch tensors (any device); masks may be ``[N, H, W]`` or ``[N, 1, H, W]``
and are binarised with ``> 0.5`` unless already boolean.  Every function returns plain Python floats /
ints / dicts (or numpy arrays for per-sample values).  Undefined values (0/0, single-class AUROC) are
``float("nan")``; nothing raises for them.

API
---
Constants
    SMOOTH = 1e-6                     epsilon of the upstream Dice / IoU.
    FG_THRESHOLD = -0.95              foreground = mean over channels of the [-1, 1] source > -0.95.
    DEFAULT_MIN_CC_SIZE = 40          connected components with (filled) area <= 40 px are removed.

Per-sample / pooled building blocks
    cc_filter(masks, min_size=40, fill_holes=True) -> bool [N, H, W]
        remove 8-connected components whose area_filled (area if fill_holes=False) is <= min_size.
    foreground_mask(source, threshold=-0.95) -> bool [N, H, W]
        mean over the channel axis of ``source`` [N, C, H, W] > threshold.
    dice_per_sample(pred, gt, smooth=1e-6, lesion_only=False) -> float64 [N]
        (2|P∩G| + eps) / (|P| + |G| + eps); empty/empty = 1; lesion_only -> NaN where GT is empty.
    iou_per_sample(pred, gt, smooth=1e-6, lesion_only=False) -> float64 [N]
        (|P∩G| + eps) / (|P∪G| + eps); same conventions.
    pixel_precision_recall(pred, gt) -> {"precision", "recall", "dice", "tp", "fp", "fn"}
        pooled over all pixels: precision = TP/(TP+FP), recall = TP/(TP+FN), dice = 2TP/(2TP+FP+FN).
    auroc_auprc(scores, labels) -> {"auroc", "auprc"}
        sklearn roc_auc_score / average_precision_score on flat arrays; NaN for a single class.
    foreground_auroc_auprc(anomaly_map, gt, source, fg_threshold=-0.95) -> {"auroc", "auprc",
        "n_pixels", "n_positive"}: pooled over the foreground pixels of every sample (map not CC-filtered).
    image_level_stats(labels, pred_labels) -> {"accuracy", "precision", "recall", "f1", "specificity",
        "n", "n_unhealthy", "n_pred_unhealthy", "tp", "fp", "fn", "tn"}   (correct names; 1 = unhealthy)

The dataset-level evaluator is in ``evaluator.py``; the upstream formulas in ``metrics_legacy.py``.

CC filtering: the default (cc_fill_holes=True) removes 8-connected components whose hole-filled area is <=
min_size (skimage ``area_filled``; docs/method.md, 'Component filter area'). The upstream code labels each
mask as a [1, H, W] volume with connectivity=3; in that layout scipy's hole filling never fills anything
(every voxel touches the z-border), so upstream effectively thresholds the plain ``area``. The legacy
functions reproduce that exactly (``fill_holes=False``); the two differ only for ring-shaped components.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from skimage.measure import label as sk_label
from skimage.measure import regionprops
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

SMOOTH = 1e-6
FG_THRESHOLD = -0.95
DEFAULT_MIN_CC_SIZE = 40
NAN = float("nan")

__all__ = [
    "SMOOTH",
    "FG_THRESHOLD",
    "DEFAULT_MIN_CC_SIZE",
    "cc_filter",
    "foreground_mask",
    "dice_per_sample",
    "iou_per_sample",
    "pixel_precision_recall",
    "auroc_auprc",
    "foreground_auroc_auprc",
    "image_level_stats",
    "dice_from_counts",
    "iou_from_counts",
]


# ----------------------------------------------------------------------------------------------------
# input helpers
# ----------------------------------------------------------------------------------------------------
def _to_numpy(x: Any, name: str) -> np.ndarray:
    """Tensor/array-like -> numpy array (detached, on CPU)."""
    if x is None:
        raise ValueError(f"`{name}` is None; expected an array or tensor")
    if hasattr(x, "detach"):
        x = x.detach()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        x = x.cpu().numpy()
    return np.asarray(x)


def _as_nhw(x: Any, name: str) -> np.ndarray:
    """[N, H, W] or [N, 1, H, W] -> numpy [N, H, W]; anything else is a ValueError naming ``name``."""
    a = _to_numpy(x, name)
    if a.ndim == 4 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 3:
        raise ValueError(f"`{name}` must have shape [N, H, W] or [N, 1, H, W], got {tuple(a.shape)}")
    return a


def _as_masks(x: Any, name: str) -> np.ndarray:
    """Masks [N, H, W] or [N, 1, H, W] -> bool [N, H, W] (values > 0.5 are True)."""
    a = _as_nhw(x, name)
    return a if a.dtype == bool else a > 0.5


def _as_maps(x: Any, name: str) -> np.ndarray:
    """Continuous maps [N, H, W] or [N, 1, H, W] -> float array [N, H, W]."""
    a = _as_nhw(x, name)
    if not np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float32)
    return a


def _as_source(x: Any, name: str = "source") -> np.ndarray:
    a = _to_numpy(x, name)
    if a.ndim != 4:
        raise ValueError(f"`{name}` must have shape [N, C, H, W] (all input channels), got {tuple(a.shape)}")
    return a


def _as_labels(x: Any, name: str) -> np.ndarray:
    a = _to_numpy(x, name).reshape(-1)
    return (a > 0.5).astype(np.int64) if np.issubdtype(a.dtype, np.floating) else a.astype(np.int64)


def _check_same(shapes: Mapping[str, tuple], what: str) -> None:
    first_name, first = next(iter(shapes.items()))
    for name, shape in shapes.items():
        if tuple(shape) != tuple(first):
            raise ValueError(
                f"{what} mismatch: `{name}` has shape {tuple(shape)} but `{first_name}` has {tuple(first)}"
            )


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den > 0 else NAN


def _nan_stat(values: np.ndarray, fn: Callable[[np.ndarray], Any]) -> float:
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    return float(fn(v)) if v.size else NAN


# ----------------------------------------------------------------------------------------------------
# building blocks
# ----------------------------------------------------------------------------------------------------
def cc_filter(masks: Any, min_size: int = DEFAULT_MIN_CC_SIZE, fill_holes: bool = True) -> np.ndarray:
    """Connected-component post-processing (docs/method.md, 'Metrics').

    Args:
        masks: binary masks [N, H, W] or [N, 1, H, W].
        min_size: components whose size is <= min_size pixels are removed.
        fill_holes: size = skimage ``area_filled`` (holes counted) if True, plain ``area`` otherwise
            (the latter is what the upstream [1, H, W] / connectivity=3 call effectively computes).
    Returns:
        bool [N, H, W]; components are 8-connected (diagonal neighbours join).
    """
    m = _as_masks(masks, "masks")
    out = np.zeros_like(m)
    for i in range(m.shape[0]):
        if not m[i].any():
            continue
        lab = sk_label(m[i], connectivity=2)
        n = int(lab.max())
        if fill_holes:
            sizes = np.zeros(n + 1, dtype=np.int64)
            for prop in regionprops(lab):
                sizes[prop.label] = int(prop.area_filled)
        else:
            sizes = np.bincount(lab.ravel(), minlength=n + 1)
        keep = sizes > min_size
        keep[0] = False
        out[i] = keep[lab]
    return out


def foreground_mask(source: Any, threshold: float = FG_THRESHOLD) -> np.ndarray:
    """Brain foreground: mean over all channels of ``source`` [N, C, H, W] (in [-1, 1]) > threshold."""
    s = _as_source(source)
    return s.mean(axis=1) > threshold


def _counts(pred: np.ndarray, gt: np.ndarray) -> dict[str, np.ndarray]:
    axes = (1, 2)
    tp = np.logical_and(pred, gt).sum(axis=axes).astype(np.int64)
    n_pred = pred.sum(axis=axes).astype(np.int64)
    n_gt = gt.sum(axis=axes).astype(np.int64)
    return {"tp": tp, "fp": n_pred - tp, "fn": n_gt - tp, "n_pred": n_pred, "n_gt": n_gt}


def _dice_from_counts(tp, n_pred, n_gt, smooth: float = SMOOTH) -> np.ndarray:
    return (2.0 * np.asarray(tp, np.float64) + smooth) / (np.asarray(n_pred + n_gt, np.float64) + smooth)


def _iou_from_counts(tp, n_pred, n_gt, smooth: float = SMOOTH) -> np.ndarray:
    union = np.asarray(n_pred + n_gt - tp, np.float64)
    return (np.asarray(tp, np.float64) + smooth) / (union + smooth)


def dice_from_counts(tp: Any, n_pred: Any, n_gt: Any) -> np.ndarray:
    """Exact Dice 2|P∩G| / (|P| + |G|) from counts, 1 where both are empty (no smoothing term: a missed
    lesion scores 0, not eps / |G|). The reported per-slice and per-patient values use this."""
    num = 2.0 * np.asarray(tp, np.float64)
    den = np.asarray(n_pred, np.float64) + np.asarray(n_gt, np.float64)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 1.0)


def iou_from_counts(tp: Any, n_pred: Any, n_gt: Any) -> np.ndarray:
    """Exact IoU |P∩G| / |P∪G| from counts, 1 where both are empty (no smoothing term)."""
    tp = np.asarray(tp, np.float64)
    union = np.asarray(n_pred, np.float64) + np.asarray(n_gt, np.float64) - tp
    return np.where(union > 0, tp / np.where(union > 0, union, 1.0), 1.0)


def dice_per_sample(pred: Any, gt: Any, smooth: float = SMOOTH, lesion_only: bool = False) -> np.ndarray:
    """Per-sample Dice (2|P∩G| + eps)/(|P| + |G| + eps) -> float64 [N] (``smooth`` = 0: exact, see
    ``dice_from_counts``).

    Empty prediction on empty GT gives 1.  With ``lesion_only`` samples with empty GT are NaN.
    """
    p, g = _as_masks(pred, "pred"), _as_masks(gt, "gt")
    _check_same({"pred": p.shape, "gt": g.shape}, "shape")
    c = _counts(p, g)
    d = (_dice_from_counts(c["tp"], c["n_pred"], c["n_gt"], smooth) if smooth
         else dice_from_counts(c["tp"], c["n_pred"], c["n_gt"]))
    if lesion_only:
        d = np.where(c["n_gt"] > 0, d, np.nan)
    return d


def iou_per_sample(pred: Any, gt: Any, smooth: float = SMOOTH, lesion_only: bool = False) -> np.ndarray:
    """Per-sample IoU (|P∩G| + eps)/(|P∪G| + eps) -> float64 [N]; ``lesion_only`` as in dice_per_sample."""
    p, g = _as_masks(pred, "pred"), _as_masks(gt, "gt")
    _check_same({"pred": p.shape, "gt": g.shape}, "shape")
    c = _counts(p, g)
    v = (_iou_from_counts(c["tp"], c["n_pred"], c["n_gt"], smooth) if smooth
         else iou_from_counts(c["tp"], c["n_pred"], c["n_gt"]))
    if lesion_only:
        v = np.where(c["n_gt"] > 0, v, np.nan)
    return v


def _pr_from_counts(tp: int, fp: int, fn: int) -> dict[str, Any]:
    return {
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        "dice": _ratio(2 * tp, 2 * tp + fp + fn),
        "tp": int(tp),
        "fp": int(fp),
        "fn": int(fn),
    }


def pixel_precision_recall(pred: Any, gt: Any) -> dict[str, Any]:
    """Pixel precision TP/(TP+FP), recall TP/(TP+FN) and pooled Dice, pooled over all pixels of all samples.

    Returns {"precision", "recall", "dice", "tp", "fp", "fn"}; a 0/0 ratio is NaN.
    """
    p, g = _as_masks(pred, "pred"), _as_masks(gt, "gt")
    _check_same({"pred": p.shape, "gt": g.shape}, "shape")
    tp = int(np.logical_and(p, g).sum())
    return _pr_from_counts(tp, int(p.sum()) - tp, int(g.sum()) - tp)


def auroc_auprc(scores: Any, labels: Any) -> dict[str, float]:
    """AUROC (sklearn roc_auc_score) and AUPRC (average_precision_score) of flat scores vs binary labels.

    Both are NaN when the labels contain a single class (or no pixels).
    """
    s = _to_numpy(scores, "scores").reshape(-1)
    y = _to_numpy(labels, "labels").reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"`scores` has {s.size} values but `labels` has {y.size}; they must match")
    y = y.astype(bool) if y.dtype == bool else y > 0.5
    if s.size == 0 or y.all() or not y.any():
        return {"auroc": NAN, "auprc": NAN}
    if not np.all(np.isfinite(s)):
        raise ValueError("`scores` contain NaN or inf; the anomaly map must be finite")
    return {"auroc": float(roc_auc_score(y, s)), "auprc": float(average_precision_score(y, s))}


def foreground_auroc_auprc(anomaly_map: Any, gt: Any, source: Any,
                           fg_threshold: float = FG_THRESHOLD) -> dict[str, Any]:
    """Pooled AUROC/AUPRC of the continuous map over the foreground pixels of all samples.

    Args: anomaly_map [N,(1,)H,W] float; gt [N,(1,)H,W]; source [N,C,H,W] in [-1, 1].
    Returns {"auroc", "auprc", "n_pixels", "n_positive"}.
    """
    m, g = _as_maps(anomaly_map, "anomaly_map"), _as_masks(gt, "gt")
    fg = foreground_mask(source, fg_threshold)
    _check_same({"anomaly_map": m.shape, "gt": g.shape, "source (N, H, W)": fg.shape}, "shape")
    out: dict[str, Any] = auroc_auprc(m[fg], g[fg])
    out.update(n_pixels=int(fg.sum()), n_positive=int(g[fg].sum()))
    return out


def image_level_stats(labels: Any, pred_labels: Any) -> dict[str, Any]:
    """Image-level classification metrics with correct names (positive class 1 = unhealthy).

    accuracy, precision TP/(TP+FP), recall TP/(TP+FN), f1, specificity TN/(TN+FP) (NaN when undefined),
    counts n, n_unhealthy, n_pred_unhealthy, tp, fp, fn, tn.
    """
    y, p = _as_labels(labels, "labels"), _as_labels(pred_labels, "pred_labels")
    if y.shape != p.shape:
        raise ValueError(f"`labels` has {y.size} entries but `pred_labels` has {p.size}; they must match")
    if y.size == 0:
        return {"accuracy": NAN, "precision": NAN, "recall": NAN, "f1": NAN, "specificity": NAN, "n": 0,
                "n_unhealthy": 0, "n_pred_unhealthy": 0, "tp": 0, "fp": 0, "fn": 0, "tn": 0}
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(y, p, labels=[0, 1]).ravel())
    return {
        "accuracy": float(accuracy_score(y, p)),
        "precision": float(precision_score(y, p, labels=[0, 1], zero_division=np.nan)),
        "recall": float(recall_score(y, p, labels=[0, 1], zero_division=np.nan)),
        "f1": float(f1_score(y, p, labels=[0, 1], zero_division=np.nan)),
        "specificity": _ratio(tn, tn + fp),
        "n": int(y.size),
        "n_unhealthy": int((y == 1).sum()),
        "n_pred_unhealthy": int((p == 1).sum()),
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
    }
