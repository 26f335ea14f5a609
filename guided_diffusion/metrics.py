"""Segmentation and classification metrics for AnoFPDM evaluation (spec 5.6, fixes of spec 8.7-8.9).

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

Dataset-level accumulator (use one instance per t_e_ratio / setting; spec 8.23)
    ev = SegmentationEvaluator(min_cc_size=40, cc_filter=True, cc_fill_holes=True, fg_threshold=-0.95,
                               score_dtype="float32")
    out = ev.add_batch(pred_mask_gated=..., pred_mask_all=..., anomaly_map=..., gt=..., source=...,
                       label=..., pred_label=..., slice_ids=[(patient, slice_number), ...], extra=None)
        -> {"records": [per-slice dict, ...], "pred_mask_gated": bool [B,H,W] (CC-filtered),
            "pred_mask_all": bool [B,H,W] (CC-filtered)}
    ev.state_dict() -> picklable dict;  SegmentationEvaluator.from_states([state, ...]) -> merged evaluator
    ev.merge(other_evaluator_or_state);  ev.gather(all_gather_object) -> evaluator merged over ranks
    ev.results() -> {"settings", "counts", "mixed", "unhealthy", "patient", "patient_all", "image"}
    ev.slice_records() -> list[dict] (sorted by (patient, slice));  ev.patient_records() -> list[dict]
    len(ev) -> number of slices added.
    Results are independent of batch order and sharding: everything is keyed by slice id and pooled in
    sorted (patient, slice) order.  Adding the same slice id twice raises ValueError.

Legacy (upstream scripts/evaluate.py formulas, for comparison with the paper; spec 5.6)
    legacy_batch_metrics(real_mask, recon_mask, source, ano_map, label=None, cc_filter=True, cc_thr=40)
        -> {"dice", "iou", "precision", "recall", "AUC", "AUPRC", "n"}   upstream names: "precision" is
        really recall TP/(TP+FN+1e-6) and "recall" is really precision TP/(TP+FP+1e-6).
    legacy_get_stats(Y, PRED_Y) -> {"acc", "recall", "precision", "num_ano_total", "num_ano_curr"}
        Y / PRED_Y: lists of per-batch label arrays (cumulative); same name swap.
    LegacyRunningMetrics().add_batch(gt, pred_mask, pred_mask_all, source, anomaly_map, label, pred_label)
        -> {"batch": mixed dict, "batch_ano": unhealthy dict, "cls": get_stats dict, "running": dict};
        .update(batch, batch_ano, cls) for precomputed dicts; .running() -> dict with keys
        dice, iou, precision, recall, AUC, AUPRC (mixed: unweighted mean of per-batch values),
        dice_ano, ... AUPRC_ano (sum_b metric_b * n_ano_b / n_ano_total), cls_acc, cls_recall,
        cls_precision, num_ano.

Pixel storage for pooled AUROC/AUPRC: for every slice the evaluator keeps the anomaly-map values of its
foreground pixels (``score_dtype``: "float32" by default, which makes the pooled AUROC/AUPRC identical to
sklearn on the float32 map; "float16" halves the memory but rounds scores, creating ties, so the result is
approximate at the ~1e-3 level) and the GT labels of those pixels bit-packed (np.packbits, exact).
Memory: about 4.1 bytes per foreground pixel (float32) -> ~40 kB per 128x128 brain slice.
Cost of results(): sklearn sorts the pooled pixels once per metric and setup (4 calls); on a slow CPU
that is ~1.2 s per million pooled pixels per call (10,000 BraTS slices ~ 80 M pixels -> a few minutes,
a few GB of RAM), negligible next to the diffusion inference.  add_batch: ~10 ms per 128x128 slice.

CC filtering: the default (cc_fill_holes=True) removes 8-connected components whose hole-filled area is
<= min_size (skimage ``area_filled``), as the spec describes.  The upstream code labels each mask as a
[1, H, W] volume with connectivity=3; in that layout scipy's hole filling never fills anything (every
voxel touches the z-border), so upstream effectively thresholds the plain ``area``.  The legacy functions
reproduce that exactly (``fill_holes=False``); the two differ only for ring-shaped components.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from skimage.measure import label as sk_label
from skimage.measure import regionprops
from sklearn.metrics import (
    accuracy_score,
    auc,
    average_precision_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
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
    "SegmentationEvaluator",
    "legacy_batch_metrics",
    "legacy_get_stats",
    "LegacyRunningMetrics",
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
    """Connected-component post-processing (spec 5.6).

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


def dice_per_sample(pred: Any, gt: Any, smooth: float = SMOOTH, lesion_only: bool = False) -> np.ndarray:
    """Per-sample Dice (2|P∩G| + eps)/(|P| + |G| + eps) -> float64 [N].

    Empty prediction on empty GT gives 1.  With ``lesion_only`` samples with empty GT are NaN.
    """
    p, g = _as_masks(pred, "pred"), _as_masks(gt, "gt")
    _check_same({"pred": p.shape, "gt": g.shape}, "shape")
    c = _counts(p, g)
    d = _dice_from_counts(c["tp"], c["n_pred"], c["n_gt"], smooth)
    if lesion_only:
        d = np.where(c["n_gt"] > 0, d, np.nan)
    return d


def iou_per_sample(pred: Any, gt: Any, smooth: float = SMOOTH, lesion_only: bool = False) -> np.ndarray:
    """Per-sample IoU (|P∩G| + eps)/(|P∪G| + eps) -> float64 [N]; ``lesion_only`` as in dice_per_sample."""
    p, g = _as_masks(pred, "pred"), _as_masks(gt, "gt")
    _check_same({"pred": p.shape, "gt": g.shape}, "shape")
    c = _counts(p, g)
    v = _iou_from_counts(c["tp"], c["n_pred"], c["n_gt"], smooth)
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


# ----------------------------------------------------------------------------------------------------
# dataset-level accumulator
# ----------------------------------------------------------------------------------------------------
_SliceKey = tuple[str, int]

_SETTINGS_KEYS = ("min_cc_size", "cc_filter", "cc_fill_holes", "fg_threshold", "score_dtype")


class SegmentationEvaluator:
    """Accumulate per-slice results over a whole split and report dataset-level metrics.

    Setups (spec 5.6 / 7 notes), binary predictions CC-filtered when ``cc_filter``:
      * "mixed": every slice, classification-gated masks ``pred_mask_gated``;
      * "unhealthy": GT-unhealthy slices only (image label == 1), ungated ``pred_mask_all``;
      * "patient": per-patient volume metrics from each patient's stacked (evaluated) slices with the gated
        masks, then mean / std (ddof=0) over patients; "patient_all": the same with ungated masks.
    Dice/IoU are per-slice epsilon-smoothed means ("dice", "iou"), plus lesion-only means over slices with
    non-empty GT ("dice_lesion", "iou_lesion"); precision / recall / dice_pooled are pooled over pixels;
    AUROC / AUPRC are pooled over the foreground pixels of the continuous (not CC-filtered) anomaly map.
    """

    def __init__(self, min_cc_size: int = DEFAULT_MIN_CC_SIZE, cc_filter: bool = True,
                 cc_fill_holes: bool = True, fg_threshold: float = FG_THRESHOLD,
                 score_dtype: str = "float32"):
        if score_dtype not in ("float32", "float16"):
            raise ValueError(f"score_dtype must be 'float32' (exact) or 'float16' (approximate), "
                             f"got {score_dtype!r}")
        self.settings = {
            "min_cc_size": int(min_cc_size),
            "cc_filter": bool(cc_filter),
            "cc_fill_holes": bool(cc_fill_holes),
            "fg_threshold": float(fg_threshold),
            "score_dtype": score_dtype,
        }
        self._records: dict[_SliceKey, dict[str, Any]] = {}
        self._pixels: dict[_SliceKey, tuple[np.ndarray, np.ndarray, int]] = {}

    def __len__(self) -> int:
        return len(self._records)

    # ---------------------------------------------------------------------------------- accumulation
    def _cc(self, masks: np.ndarray) -> np.ndarray:
        if not self.settings["cc_filter"]:
            return masks
        return cc_filter(masks, self.settings["min_cc_size"], self.settings["cc_fill_holes"])

    def add_batch(self, *, pred_mask_gated: Any, pred_mask_all: Any, anomaly_map: Any, gt: Any, source: Any,
                  label: Any, pred_label: Any, slice_ids: Sequence[tuple[Any, Any]],
                  extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Add one batch of B slices.

        Args:
            pred_mask_gated: [B,(1,)H,W] classification-gated binary masks (zero for predicted healthy).
            pred_mask_all: [B,(1,)H,W] binary masks for every slice (ungated).
            anomaly_map: [B,(1,)H,W] continuous anomaly map (finite).
            gt: [B,(1,)H,W] ground-truth masks; source: [B,C,H,W] input in [-1, 1] (all channels).
            label: [B] image labels (1 = unhealthy); pred_label: [B] predicted labels.
            slice_ids: B pairs (patient_id, slice_number); must be unique over the whole evaluation.
            extra: optional per-slice scalars {name: [B]} copied into the records (e.g. t_e, cosine sim).
        Returns:
            {"records": per-slice dicts of this batch, "pred_mask_gated", "pred_mask_all": CC-filtered
            bool [B,H,W]}.
        """
        gated = _as_masks(pred_mask_gated, "pred_mask_gated")
        allm = _as_masks(pred_mask_all, "pred_mask_all")
        amap = _as_maps(anomaly_map, "anomaly_map")
        g = _as_masks(gt, "gt")
        fg = foreground_mask(source, self.settings["fg_threshold"])
        _check_same({"pred_mask_gated": gated.shape, "pred_mask_all": allm.shape, "anomaly_map": amap.shape,
                     "gt": g.shape, "source (B, H, W)": fg.shape}, "shape")
        b = g.shape[0]
        lab = _as_labels(label, "label")
        plab = _as_labels(pred_label, "pred_label")
        ids = [(str(p), int(s)) for p, s in slice_ids]
        for name, n in (("label", lab.size), ("pred_label", plab.size), ("slice_ids", len(ids))):
            if n != b:
                raise ValueError(f"`{name}` has {n} entries but the batch has {b} slices")
        extras = {}
        for k, v in (extra or {}).items():
            arr = _to_numpy(v, f"extra[{k!r}]").reshape(-1)
            if arr.size != b:
                raise ValueError(f"`extra[{k!r}]` has {arr.size} entries but the batch has {b} slices")
            extras[k] = arr
        if len(set(ids)) != b:
            raise ValueError(f"`slice_ids` contains duplicates within one batch: {ids}")
        dup = [k for k in ids if k in self._records]
        if dup:
            raise ValueError(f"slice ids already added to this evaluator: {dup[:5]}; every slice must be "
                             "evaluated once (use one SegmentationEvaluator per t_e_ratio)")
        if not np.all(np.isfinite(amap)):
            bad = [ids[i] for i in range(b) if not np.all(np.isfinite(amap[i]))]
            raise ValueError(f"`anomaly_map` contains NaN/inf for slices {bad[:5]}; fix the map (e.g. t_e=0 "
                             "guard) before evaluation")
        n_gated_raw = gated.sum(axis=(1, 2))
        n_all_raw = allm.sum(axis=(1, 2))
        gated_cc, all_cc = self._cc(gated), self._cc(allm)
        cg, ca = _counts(gated_cc, g), _counts(all_cc, g)
        dg = _dice_from_counts(cg["tp"], cg["n_pred"], cg["n_gt"])
        ig = _iou_from_counts(cg["tp"], cg["n_pred"], cg["n_gt"])
        da = _dice_from_counts(ca["tp"], ca["n_pred"], ca["n_gt"])
        ia = _iou_from_counts(ca["tp"], ca["n_pred"], ca["n_gt"])
        np_dtype = np.float32 if self.settings["score_dtype"] == "float32" else np.float16
        records = []
        for i, key in enumerate(ids):
            scores = amap[i][fg[i]]
            rec: dict[str, Any] = {
                "patient": key[0],
                "slice": key[1],
                "label": int(lab[i]),
                "pred_label": int(plab[i]),
                "n_fg": int(fg[i].sum()),
                "n_gt": int(cg["n_gt"][i]),
                "n_pred_raw": int(n_gated_raw[i]),
                "n_pred": int(cg["n_pred"][i]),
                "tp": int(cg["tp"][i]),
                "fp": int(cg["fp"][i]),
                "fn": int(cg["fn"][i]),
                "dice": float(dg[i]),
                "iou": float(ig[i]),
                "precision": _ratio(cg["tp"][i], cg["n_pred"][i]),
                "recall": _ratio(cg["tp"][i], cg["n_gt"][i]),
                "n_pred_all_raw": int(n_all_raw[i]),
                "n_pred_all": int(ca["n_pred"][i]),
                "tp_all": int(ca["tp"][i]),
                "fp_all": int(ca["fp"][i]),
                "fn_all": int(ca["fn"][i]),
                "dice_all": float(da[i]),
                "iou_all": float(ia[i]),
                "map_max": float(amap[i].max()),
                "map_mean_fg": float(scores.mean()) if scores.size else NAN,
            }
            for k, arr in extras.items():
                v = arr[i]
                rec[k] = v.item() if hasattr(v, "item") else v
            records.append(rec)
            self._records[key] = rec
            self._pixels[key] = (scores.astype(np_dtype), np.packbits(g[i][fg[i]]), int(scores.size))
        return {"records": [dict(r) for r in records], "pred_mask_gated": gated_cc, "pred_mask_all": all_cc}

    # ---------------------------------------------------------------------------------- merging
    def state_dict(self) -> dict[str, Any]:
        """Picklable state (for torch.distributed.all_gather_object); merge with from_states / merge."""
        return {"version": 1, "settings": dict(self.settings), "records": dict(self._records),
                "pixels": dict(self._pixels)}

    def merge(self, other: SegmentationEvaluator | Mapping[str, Any]) -> None:
        """Merge another evaluator (or its state_dict) into this one; settings must match, ids be disjoint."""
        state = other.state_dict() if isinstance(other, SegmentationEvaluator) else other
        if state.get("settings") != self.settings:
            raise ValueError(f"cannot merge evaluators with different settings: {state.get('settings')} vs "
                             f"{self.settings}")
        dup = [k for k in state["records"] if k in self._records]
        if dup:
            raise ValueError(f"cannot merge: slice ids present in both evaluators: {dup[:5]} (shards must be "
                             "disjoint)")
        self._records.update(state["records"])
        self._pixels.update(state["pixels"])

    @classmethod
    def from_states(cls, states: Iterable[Mapping[str, Any]]) -> SegmentationEvaluator:
        """Build one evaluator from several state_dicts (e.g. the list returned by all_gather_object)."""
        states = list(states)
        if not states:
            raise ValueError("from_states needs at least one state_dict")
        ev = cls(**{k: states[0]["settings"][k] for k in _SETTINGS_KEYS})
        for s in states:
            ev.merge(s)
        return ev

    def gather(self, all_gather_object: Callable[[Any], list]) -> SegmentationEvaluator:
        """Merged evaluator over all ranks; ``all_gather_object(obj) -> list`` (e.g. dist_util's)."""
        return SegmentationEvaluator.from_states(all_gather_object(self.state_dict()))

    # ---------------------------------------------------------------------------------- reporting
    def _sorted_keys(self) -> list[_SliceKey]:
        return sorted(self._records)

    def slice_records(self) -> list[dict[str, Any]]:
        """Per-slice records sorted by (patient, slice) (for a CSV)."""
        return [dict(self._records[k]) for k in self._sorted_keys()]

    def _pooled_auc(self, keys: list[_SliceKey]) -> dict[str, Any]:
        if not keys:
            return {"auroc": NAN, "auprc": NAN, "n_fg_pixels": 0, "n_fg_positive": 0}
        scores = np.concatenate([self._pixels[k][0] for k in keys])
        labels = np.concatenate([np.unpackbits(self._pixels[k][1], count=self._pixels[k][2]).astype(bool)
                                 for k in keys])
        out: dict[str, Any] = auroc_auprc(scores, labels)
        out.update(n_fg_pixels=int(scores.size), n_fg_positive=int(labels.sum()))
        return out

    def _setup_block(self, keys: list[_SliceKey], suffix: str) -> dict[str, Any]:
        recs = [self._records[k] for k in keys]
        dice = np.array([r["dice" + suffix] for r in recs], np.float64)
        iou = np.array([r["iou" + suffix] for r in recs], np.float64)
        has_gt = np.array([r["n_gt"] > 0 for r in recs], bool)
        tp = sum(r["tp" + suffix] for r in recs)
        fp = sum(r["fp" + suffix] for r in recs)
        fn = sum(r["fn" + suffix] for r in recs)
        pr = _pr_from_counts(tp, fp, fn)
        block: dict[str, Any] = {
            "n_slices": len(recs),
            "n_slices_lesion": int(has_gt.sum()),
            "dice": float(dice.mean()) if dice.size else NAN,
            "iou": float(iou.mean()) if iou.size else NAN,
            "dice_std": float(dice.std()) if dice.size else NAN,
            "dice_lesion": float(dice[has_gt].mean()) if has_gt.any() else NAN,
            "iou_lesion": float(iou[has_gt].mean()) if has_gt.any() else NAN,
            "precision": pr["precision"],
            "recall": pr["recall"],
            "dice_pooled": pr["dice"],
            "tp": pr["tp"],
            "fp": pr["fp"],
            "fn": pr["fn"],
        }
        block.update(self._pooled_auc(keys))
        return block

    def patient_records(self, gated: bool = True) -> list[dict[str, Any]]:
        """Per-patient volume metrics over the patient's evaluated slices (gated or ungated masks)."""
        suffix = "" if gated else "_all"
        groups: dict[str, list[dict[str, Any]]] = {}
        for k in self._sorted_keys():
            groups.setdefault(k[0], []).append(self._records[k])
        rows = []
        for patient, recs in groups.items():
            tp = sum(r["tp" + suffix] for r in recs)
            n_pred = sum(r["n_pred" + suffix] for r in recs)
            n_gt = sum(r["n_gt"] for r in recs)
            rows.append({
                "patient": patient,
                "n_slices": len(recs),
                "n_slices_unhealthy": sum(r["label"] == 1 for r in recs),
                "n_gt": n_gt,
                "n_pred": n_pred,
                "tp": tp,
                "dice": float(_dice_from_counts(tp, n_pred, n_gt)),
                "iou": float(_iou_from_counts(tp, n_pred, n_gt)),
                "precision": _ratio(tp, n_pred),
                "recall": _ratio(tp, n_gt),
            })
        return rows

    @staticmethod
    def _patient_block(rows: list[dict[str, Any]]) -> dict[str, Any]:
        block: dict[str, Any] = {"n_patients": len(rows),
                                 "n_patients_lesion": sum(r["n_gt"] > 0 for r in rows)}
        for name in ("dice", "iou", "precision", "recall"):
            v = np.array([r[name] for r in rows], np.float64)
            block[name + "_mean"] = _nan_stat(v, np.mean)
            block[name + "_std"] = _nan_stat(v, np.std)
        les = np.array([r["dice"] for r in rows if r["n_gt"] > 0], np.float64)
        block["dice_lesion_mean"] = _nan_stat(les, np.mean)
        block["dice_lesion_std"] = _nan_stat(les, np.std)
        return block

    def results(self) -> dict[str, Any]:
        """Dataset-level metrics (see class docstring); plain floats/ints, NaN where undefined."""
        keys = self._sorted_keys()
        recs = [self._records[k] for k in keys]
        unhealthy = [k for k in keys if self._records[k]["label"] == 1]
        labels = np.array([r["label"] for r in recs], np.int64)
        preds = np.array([r["pred_label"] for r in recs], np.int64)
        n_fg = sum(r["n_fg"] for r in recs)
        return {
            "settings": dict(self.settings),
            "counts": {
                "n_slices": len(recs),
                "n_patients": len({k[0] for k in keys}),
                "n_unhealthy": int((labels == 1).sum()),
                "n_healthy": int((labels != 1).sum()),
                "n_pred_unhealthy": int((preds == 1).sum()),
                "n_fg_pixels": int(n_fg),
            },
            "mixed": self._setup_block(keys, ""),
            "unhealthy": self._setup_block(unhealthy, "_all"),
            "patient": self._patient_block(self.patient_records(gated=True)),
            "patient_all": self._patient_block(self.patient_records(gated=False)),
            "image": image_level_stats(labels, preds),
        }


# ----------------------------------------------------------------------------------------------------
# legacy (upstream) formulas
# ----------------------------------------------------------------------------------------------------
def _legacy_cc(masks: np.ndarray, thr: int) -> np.ndarray:
    """Upstream connected_components_3d: label [1, H, W] with connectivity=3, drop filled_area <= thr."""
    out = masks.copy()
    for i in range(out.shape[0]):
        vol = out[i][None]
        lab = sk_label(vol, connectivity=3)
        for prop in regionprops(lab):
            if prop.area_filled <= thr:
                vol[lab == prop.label] = False
        out[i] = vol[0]
    return out


def _legacy_curves(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Upstream per-batch AUC (roc_curve + auc) and AUPRC (average_precision_score), warnings silenced."""
    if scores.size == 0:
        return NAN, NAN
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fpr, tpr, _ = roc_curve(labels, scores)
        auc_v = float(auc(fpr, tpr))
        ap = float(average_precision_score(labels, scores))
    return auc_v, ap


def legacy_batch_metrics(real_mask: Any, recon_mask: Any, source: Any, ano_map: Any, label: Any = None,
                         cc_filter: bool = True, cc_thr: int = DEFAULT_MIN_CC_SIZE) -> dict[str, Any]:
    """Upstream ``evaluate`` for one batch (spec 5.6), names as upstream.

    Args: real_mask (GT) / recon_mask (prediction) [B,(1,)H,W]; source [B,C,H,W]; ano_map [B,(1,)H,W];
        label [B] or None (if given, only label == 1 samples: the "unhealthy" setup).
    Returns {"dice", "iou" (per-sample smoothed, batch mean), "precision" (= TP/(TP+FN+1e-6), really
    recall), "recall" (= TP/(TP+FP+1e-6), really precision), "AUC", "AUPRC" (pooled over the batch's
    foreground pixels), "n" (samples evaluated)}.  With no sample left every value is NaN and n = 0
    (upstream would crash there).
    """
    g = _as_masks(real_mask, "real_mask")
    p = _as_masks(recon_mask, "recon_mask")
    m = _as_maps(ano_map, "ano_map")
    s = _as_source(source)
    _check_same({"real_mask": g.shape, "recon_mask": p.shape, "ano_map": m.shape,
                 "source (B, H, W)": (s.shape[0],) + s.shape[2:]}, "shape")
    if label is not None:
        sel = _as_labels(label, "label") == 1
        g, p, m, s = g[sel], p[sel], m[sel], s[sel]
    n = int(g.shape[0])
    if n == 0:
        return {"dice": NAN, "iou": NAN, "precision": NAN, "recall": NAN, "AUC": NAN, "AUPRC": NAN, "n": 0}
    if cc_filter:
        p = _legacy_cc(p, cc_thr)
    c = _counts(p, g)
    tp, fp, fn = int(c["tp"].sum()), int(c["fp"].sum()), int(c["fn"].sum())
    fg = s.mean(axis=1) > FG_THRESHOLD
    auc_v, ap = _legacy_curves(m[fg], g[fg])
    return {
        "dice": float(_dice_from_counts(c["tp"], c["n_pred"], c["n_gt"]).mean()),
        "iou": float(_iou_from_counts(c["tp"], c["n_pred"], c["n_gt"]).mean()),
        "precision": tp / (tp + fn + 1e-6),
        "recall": tp / (tp + fp + 1e-6),
        "AUC": auc_v,
        "AUPRC": ap,
        "n": n,
    }


def legacy_get_stats(Y: Sequence[Any], PRED_Y: Sequence[Any]) -> dict[str, Any]:
    """Upstream ``get_stats``: cumulative image-level stats over the per-batch label lists Y / PRED_Y.

    "recall" is really precision TP/(TP+FP+1e-6) and "precision" really recall TP/(TP+FN+1e-6).
    """
    if not Y:
        raise ValueError("legacy_get_stats needs at least one batch of labels in `Y`")
    y_curr = _as_labels(Y[-1], "Y[-1]")
    y = np.concatenate([_as_labels(v, "Y") for v in Y])
    p = np.concatenate([_as_labels(v, "PRED_Y") for v in PRED_Y])
    if y.shape != p.shape:
        raise ValueError(f"`Y` has {y.size} labels but `PRED_Y` has {p.size}; they must match")
    tp = int(((y == 1) & (p == 1)).sum())
    fp = int(((y == 0) & (p == 1)).sum())
    fn = int(((y == 1) & (p == 0)).sum())
    return {
        "acc": float((y == p).mean()),
        "recall": tp / (tp + fp + 1e-6),
        "precision": tp / (tp + fn + 1e-6),
        "num_ano_total": int((y == 1).sum()),
        "num_ano_curr": int((y_curr == 1).sum()),
    }


_LEGACY_KEYS = ("dice", "iou", "precision", "recall", "AUC", "AUPRC")


class LegacyRunningMetrics:
    """Upstream ``logging_metrics`` running values (spec 5.6); one instance per t_e_ratio.

    mixed running value = unweighted mean over batches of the per-batch values (NaN propagates as in
    np.mean); unhealthy running value = sum_b metric_b * n_ano_b / n_ano_total, where batches without
    unhealthy slices contribute nothing (upstream would produce NaN / crash there).
    """

    def __init__(self, cc_filter: bool = True, cc_thr: int = DEFAULT_MIN_CC_SIZE):
        self.cc_filter = cc_filter
        self.cc_thr = cc_thr
        self.batches: list[dict[str, Any]] = []
        self.weighted_ano: dict[str, float] = {k: 0.0 for k in _LEGACY_KEYS}
        self.Y: list[np.ndarray] = []
        self.PRED_Y: list[np.ndarray] = []
        self.cls: dict[str, Any] = {}

    def update(self, batch: Mapping[str, Any], batch_ano: Mapping[str, Any],
               cls: Mapping[str, Any]) -> dict[str, float]:
        """Record precomputed per-batch dicts (legacy_batch_metrics mixed / unhealthy, legacy_get_stats)."""
        self.batches.append({k: float(batch[k]) for k in _LEGACY_KEYS})
        n_ano = int(cls["num_ano_curr"])
        if n_ano > 0:
            for k in _LEGACY_KEYS:
                self.weighted_ano[k] += float(batch_ano[k]) * n_ano
        self.cls = dict(cls)
        return self.running()

    def add_batch(self, gt: Any, pred_mask: Any, pred_mask_all: Any, source: Any, anomaly_map: Any,
                  label: Any, pred_label: Any) -> dict[str, Any]:
        """Compute the upstream per-batch metrics and update; returns batch, batch_ano, cls, running."""
        batch = legacy_batch_metrics(gt, pred_mask, source, anomaly_map, None, self.cc_filter, self.cc_thr)
        batch_ano = legacy_batch_metrics(gt, pred_mask_all, source, anomaly_map, label, self.cc_filter,
                                         self.cc_thr)
        self.Y.append(_as_labels(label, "label"))
        self.PRED_Y.append(_as_labels(pred_label, "pred_label"))
        cls = legacy_get_stats(self.Y, self.PRED_Y)
        running = self.update(batch, batch_ano, cls)
        return {"batch": batch, "batch_ano": batch_ano, "cls": cls, "running": running}

    def running(self) -> dict[str, float]:
        """Current running values with upstream names (``*_ano`` = unhealthy setup, ``cls_*`` image level)."""
        out: dict[str, Any] = {}
        for k in _LEGACY_KEYS:
            vals = [b[k] for b in self.batches]
            out[k] = float(np.mean(vals)) if vals else NAN
        total = int(self.cls.get("num_ano_total", 0))
        for k in _LEGACY_KEYS:
            out[k + "_ano"] = self.weighted_ano[k] / total if total > 0 else NAN
        out["cls_acc"] = float(self.cls.get("acc", NAN))
        out["cls_recall"] = float(self.cls.get("recall", NAN))
        out["cls_precision"] = float(self.cls.get("precision", NAN))
        out["num_ano"] = total
        out["n_batches"] = len(self.batches)
        return out
