"""Dataset-level evaluator of AnoFPDM segmentation and classification (docs/method.md, 'Metrics').

Dataset-level accumulator (use one instance per t_e_ratio / setting;
docs/method.md, 'Several end-step ratios')
    ev = SegmentationEvaluator(min_cc_size=40, cc_filter=True, cc_fill_holes=True, fg_threshold=-0.95,
                               score_dtype="float32")
    out = ev.add_batch(pred_mask_gated=..., pred_mask_all=..., anomaly_map=..., gt=..., source=...,
                       label=..., pred_label=..., slice_ids=[(patient, slice_number), ...], extra=None)
        -> {"records": [per-slice dict, ...], "pred_mask_gated": bool [B,H,W] (CC-filtered),
            "pred_mask_all": bool [B,H,W] (CC-filtered)}
    ev.state_dict() -> picklable dict;  SegmentationEvaluator.from_states([state, ...]) -> merged evaluator
    ev.merge(other_evaluator_or_state);  ev.gather(all_gather_object) -> evaluator merged over ranks
    ev.results() -> {"settings", "counts", "mixed", "unhealthy", "patient", "patient_all", "image"}
    The CumulativeMetric interface (metrics/base.py): ev.accumulate(SliceBatch(...)) is add_batch,
    ev.aggregate() is results() (ValueError when empty), ev.reset() forgets every slice.
    ev.slice_records() -> list[dict] (sorted by (patient, slice));  ev.patient_records() -> list[dict]
    len(ev) -> number of slices added.
    Results are independent of batch order and sharding: everything is keyed by slice id and pooled in
    sorted (patient, slice) order.  Adding the same slice id twice raises ValueError.

Pixel storage for pooled AUROC/AUPRC: for every slice the evaluator keeps the anomaly-map values of its
foreground pixels (``score_dtype``: "float32" by default, which makes the pooled AUROC/AUPRC identical to
sklearn on the float32 map; "float16" halves the memory but rounds scores, creating ties, so the result is
approximate at the ~1e-3 level) and the GT labels of those pixels bit-packed (np.packbits, exact).
Memory: about 4.1 bytes per foreground pixel (float32) -> ~40 kB per 128x128 brain slice.
Cost of results(): sklearn sorts the pooled pixels once per metric and setup (4 calls); on a slow CPU
that is ~1.2 s per million pooled pixels per call (10,000 BraTS slices ~ 80 M pixels -> a few minutes,
a few GB of RAM), negligible next to the diffusion inference.  add_batch: ~10 ms per 128x128 slice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from guided_diffusion.metrics.base import CumulativeMetric, SliceBatch
from guided_diffusion.metrics.slice_metrics import (
    DEFAULT_MIN_CC_SIZE,
    FG_THRESHOLD,
    NAN,
    _as_labels,
    _as_maps,
    _as_masks,
    _check_same,
    _counts,
    _nan_stat,
    _pr_from_counts,
    _ratio,
    _to_numpy,
    auroc_auprc,
    cc_filter,
    dice_from_counts,
    foreground_mask,
    image_level_stats,
    iou_from_counts,
)

__all__ = ["SegmentationEvaluator"]

_SliceKey = tuple[str, int]

_SETTINGS_KEYS = ("min_cc_size", "cc_filter", "cc_fill_holes", "fg_threshold", "score_dtype")


class SegmentationEvaluator(CumulativeMetric):
    """Accumulate per-slice results over a whole split and report dataset-level metrics.

    Setups (docs/method.md, 'Image-level classification'), binary predictions CC-filtered when ``cc_filter``:
      * "mixed": every slice, classification-gated masks ``pred_mask_gated``;
      * "unhealthy": GT-unhealthy slices only (image label == 1), ungated ``pred_mask_all``;
      * "patient": per-patient volume metrics from each patient's stacked (evaluated) slices with the gated
        masks, then mean / std (ddof=0) over patients; "patient_all": the same with ungated masks.
    Dice/IoU are means of exact per-slice values ("dice", "iou"; 1 for an empty prediction on empty GT,
    0 for a missed lesion: no smoothing term), plus lesion-only means over slices with
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

    def reset(self) -> None:
        """Forget every slice (the settings stay)."""
        self._records.clear()
        self._pixels.clear()

    def accumulate(self, batch: SliceBatch) -> dict[str, Any]:
        """``add_batch`` with the fields of ``batch`` (all but ``extra`` are required)."""
        batch.require("SegmentationEvaluator", "pred_mask_gated", "pred_mask_all", "anomaly_map", "gt",
                      "source", "label", "pred_label", "slice_ids")
        return self.add_batch(pred_mask_gated=batch.pred_mask_gated, pred_mask_all=batch.pred_mask_all,
                              anomaly_map=batch.anomaly_map, gt=batch.gt, source=batch.source,
                              label=batch.label, pred_label=batch.pred_label, slice_ids=batch.slice_ids,
                              extra=batch.extra)

    def _aggregate(self) -> dict[str, Any]:
        return self.results()

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
        dg = dice_from_counts(cg["tp"], cg["n_pred"], cg["n_gt"])
        ig = iou_from_counts(cg["tp"], cg["n_pred"], cg["n_gt"])
        da = dice_from_counts(ca["tp"], ca["n_pred"], ca["n_gt"])
        ia = iou_from_counts(ca["tp"], ca["n_pred"], ca["n_gt"])
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
                "dice": float(dice_from_counts(tp, n_pred, n_gt)),
                "iou": float(iou_from_counts(tp, n_pred, n_gt)),
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
