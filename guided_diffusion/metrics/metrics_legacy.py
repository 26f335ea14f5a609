"""The upstream AnoFPDM evaluation formulas (scripts/evaluate.py), kept for comparison with the paper
(``--legacy_metrics``); the correct definitions are in ``metrics.py`` and ``evaluator.py``.

Legacy (upstream scripts/evaluate.py formulas, for comparison with the paper;
docs/method.md, 'Per-batch running metrics')
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
    As a CumulativeMetric (metrics/base.py): accumulate(SliceBatch) is add_batch, aggregate() is running()
    (ValueError before the first batch), reset() forgets every batch; len() counts batches.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from skimage.measure import label as sk_label
from skimage.measure import regionprops
from sklearn.metrics import auc, average_precision_score, roc_curve

from guided_diffusion.metrics.base import CumulativeMetric, SliceBatch
from guided_diffusion.metrics.slice_metrics import (
    DEFAULT_MIN_CC_SIZE,
    FG_THRESHOLD,
    NAN,
    _as_labels,
    _as_maps,
    _as_masks,
    _as_source,
    _check_same,
    _counts,
    _dice_from_counts,
    _iou_from_counts,
)

__all__ = ["legacy_batch_metrics", "legacy_get_stats", "LegacyRunningMetrics"]

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
    """Upstream ``evaluate`` for one batch, names as upstream
    (docs/method.md, 'Swapped precision and recall').

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


class LegacyRunningMetrics(CumulativeMetric):
    """Upstream ``logging_metrics`` running values (docs/method.md, 'Per-batch running metrics'); one instance
    per t_e_ratio.

    mixed running value = unweighted mean over batches of the per-batch values (NaN propagates as in
    np.mean); unhealthy running value = sum_b metric_b * n_ano_b / n_ano_total, where batches without
    unhealthy slices contribute nothing (upstream would produce NaN / crash there).
    """

    def __init__(self, cc_filter: bool = True, cc_thr: int = DEFAULT_MIN_CC_SIZE):
        self.cc_filter = cc_filter
        self.cc_thr = cc_thr
        self.reset()

    def reset(self) -> None:
        """Forget every batch (cc_filter and cc_thr stay)."""
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

    def accumulate(self, batch: SliceBatch) -> dict[str, Any]:
        """``add_batch`` with the fields of ``batch`` (slice_ids and extra are not used)."""
        batch.require("LegacyRunningMetrics", "gt", "pred_mask_gated", "pred_mask_all", "source",
                      "anomaly_map", "label", "pred_label")
        return self.add_batch(batch.gt, batch.pred_mask_gated, batch.pred_mask_all, batch.source,
                              batch.anomaly_map, batch.label, batch.pred_label)

    def __len__(self) -> int:
        """The number of batches added (the running values are per-batch means)."""
        return len(self.batches)

    def _aggregate(self) -> dict[str, Any]:
        return self.running()

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
