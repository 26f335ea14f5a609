"""FLAIR-intensity baseline (Meissen et al. 2021): how far thresholding the FLAIR channel alone gets.

Definition used here (and reported by the synthetic generator for every dataset it writes):

* every slice of the split is read through the loader (:class:`guided_diffusion.data.brats.BrainDataset`,
  docs/method.md, 'Loading and labels': per-slice min-max of each channel) and its FLAIR channel mapped
  back to [0, 1];
  ground truth is the loader's ``y > 0.5``;
* the prediction at threshold ``t`` is ``flair > t``; one global ``t`` is chosen on the split from the grid
  ``0, 1/steps, ..., 1`` to maximise the **mean Dice over the unhealthy slices** (slices with a lesion
  pixel); this is ``best_dice`` (an upper bound for the baseline: it uses the split's own labels);
* ``dice_at_075``: the same mean Dice at ``t = 0.75``; ``pooled_dice_best``: Dice of all unhealthy-slice
  pixels pooled, at its own best ``t``;
* ``auroc`` / ``auprc``: pixel-level, pooled over the brain-foreground pixels (as the evaluator,
  :func:`guided_diffusion.metrics.slice_metrics.foreground_mask`: channel mean of the [-1, 1] slice > -0.95)
  of the unhealthy slices; ``auroc_mixed`` / ``auprc_mixed``: the same over every slice of the split. Exact
  (scikit-learn ``roc_auc_score`` / ``average_precision_score``, as the evaluator) up to ``max_exact``
  foreground pixels, else from a ``bins``-bin histogram (streaming, for BraTS-sized splits); ``auc_method``
  says which. The histogram ties the per-slice maxima (all within 1e-5 of 1 after min-max), which the
  exact ranking orders by slice contrast: AUROC and unhealthy AUPRC move by a few 1e-3, but the mixed
  AUPRC (rare positives, so dominated by the top of the ranking) can differ by several 1e-2.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from guided_diffusion.data.brats import BrainDataset
from guided_diffusion.metrics.slice_metrics import auroc_auprc

FG_THRESHOLD = -0.95  # brain foreground as guided_diffusion.metrics.slice_metrics.FG_THRESHOLD


def flair_channel(data_dir: str | Path, split: str) -> int:
    """Index of "flair" in the ``modalities`` of the split's first meta.json (0 if none is recorded)."""
    metas = sorted((Path(data_dir) / f"npy_{split}").glob("patient_*/meta.json"))
    if not metas:
        return 0
    mods = [str(m).lower() for m in json.loads(metas[0].read_text()).get("modalities", [])]
    if mods and "flair" not in mods:
        raise ValueError(
            f"{metas[0]}: modalities {mods} have no 'flair'; pass channel= to flair_threshold_baseline"
        )
    return mods.index("flair") if mods else 0


def _counts_above(values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Number of ``values`` strictly greater than each threshold."""
    return values.size - np.searchsorted(np.sort(values), thresholds, side="right")


def _auc_from_hist(pos: np.ndarray, neg: np.ndarray) -> tuple[float, float]:
    """(AUROC, AUPRC as average precision) from per-bin positive / negative pixel counts (low to high)."""
    pos, neg = pos[::-1].astype(np.float64), neg[::-1].astype(np.float64)  # descending score
    tp, fp = np.cumsum(pos), np.cumsum(neg)
    n_pos, n_neg = tp[-1], fp[-1]
    if n_pos == 0 or n_neg == 0:
        return float("nan"), float("nan")
    tpr = np.concatenate([[0.0], tp / n_pos])
    fpr = np.concatenate([[0.0], fp / n_neg])
    auroc = float(np.trapezoid(tpr, fpr))
    keep = (tp + fp) > 0
    precision = np.where(keep, tp / np.maximum(tp + fp, 1.0), 1.0)
    auprc = float(np.sum(pos / n_pos * precision))
    return auroc, auprc


def _auc_exact(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[float, float]:
    """(AUROC, AUPRC) with scikit-learn over the concatenated (scores, labels) parts; NaN for one class."""

    out = auroc_auprc(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    return out["auroc"], out["auprc"]


def flair_threshold_baseline(
    data_dir: str | Path,
    split: str = "test",
    channel: int | None = None,
    steps: int = 200,
    bins: int = 16384,
    max_exact: int = 20_000_000,
) -> dict:
    """FLAIR-threshold baseline of one split (see the module docstring for the exact definition).

    Args:
        data_dir: preprocessed root (docs/method.md, 'Preprocessing'); split: "train", "val" or "test";
        channel: FLAIR channel index (None = from meta.json ``modalities``);
        steps: threshold grid resolution on [0, 1]; bins: histogram bins for AUROC / AUPRC beyond
        ``max_exact`` foreground pixels (exact scikit-learn values below).
    Returns:
        dict with best_dice, best_threshold, dice_at_075, pooled_dice_best, auroc, auprc (unhealthy
        slices), auroc_mixed, auprc_mixed (all slices), slices, unhealthy_slices, split, channel,
        definition (one line).
    """
    if steps < 4:
        raise ValueError(f"steps must be >= 4, got {steps}")
    ds = BrainDataset(data_dir, split, mixed=True)
    ch = flair_channel(data_dir, split) if channel is None else int(channel)
    if not 0 <= ch < ds.num_channels:
        raise ValueError(f"channel {ch} is out of range for {ds.num_channels}-channel slices in {data_dir}")
    thr = np.round(np.linspace(0.0, 1.0, steps + 1), 10)
    i075 = int(np.argmin(np.abs(thr - 0.75)))
    if abs(thr[i075] - 0.75) > 1e-9:
        thr = np.sort(np.append(thr, 0.75))
        i075 = int(np.flatnonzero(thr == 0.75)[0])
    dice_sum = np.zeros(thr.size)
    tp_all, pred_all, gt_all = np.zeros(thr.size), np.zeros(thr.size), 0.0
    hist = np.zeros((2, 2, bins), np.int64)  # [mixed / unhealthy, negative / positive, bin]
    n_unhealthy = 0
    exact: list[list[tuple[np.ndarray, np.ndarray]]] | None = [[], []]  # [mixed, unhealthy] (scores, gt)
    n_exact = 0
    for i in range(len(ds)):
        x, gt, lab = ds.load(i)
        f = ((x[ch].numpy().astype(np.float64) + 1.0) / 2.0).clip(0.0, 1.0).ravel()
        g = gt[0].numpy().ravel() > 0.5
        fg = x.numpy().mean(axis=0).ravel() > FG_THRESHOLD
        idx = np.minimum((f[fg] * bins).astype(np.int64), bins - 1)
        h = np.stack([np.bincount(idx[~g[fg]], minlength=bins), np.bincount(idx[g[fg]], minlength=bins)])
        hist[0] += h
        if exact is not None:
            n_exact += int(fg.sum())
            if n_exact > max_exact:
                exact = None
            else:
                exact[0].append((f[fg].astype(np.float32), g[fg]))
                if lab:
                    exact[1].append(exact[0][-1])
        if not lab:
            continue
        hist[1] += h
        n_unhealthy += 1
        tp = _counts_above(f[g], thr)
        pred = _counts_above(f, thr)
        dice_sum += 2.0 * tp / (pred + g.sum())
        tp_all += tp
        pred_all += pred
        gt_all += g.sum()
    if n_unhealthy == 0:
        raise ValueError(
            f"split {split!r} of {data_dir} has no unhealthy slice; the FLAIR baseline needs one"
        )
    mean_dice = dice_sum / n_unhealthy
    pooled = 2.0 * tp_all / (pred_all + gt_all)
    best = int(np.argmax(mean_dice))
    if exact is not None:
        auroc, auprc = _auc_exact(exact[1])
        auroc_mixed, auprc_mixed = _auc_exact(exact[0])
    else:
        auroc, auprc = _auc_from_hist(hist[1, 1], hist[1, 0])
        auroc_mixed, auprc_mixed = _auc_from_hist(hist[0, 1], hist[0, 0])
    return {
        "split": split,
        "channel": ch,
        "slices": len(ds),
        "unhealthy_slices": n_unhealthy,
        "best_dice": round(float(mean_dice[best]), 4),
        "best_threshold": round(float(thr[best]), 4),
        "dice_at_075": round(float(mean_dice[i075]), 4),
        "pooled_dice_best": round(float(pooled.max()), 4),
        "auroc": round(auroc, 4),
        "auprc": round(auprc, 4),
        "auroc_mixed": round(auroc_mixed, 4),
        "auprc_mixed": round(auprc_mixed, 4),
        "auc_method": "exact" if exact is not None else f"histogram_{bins}",
        "definition": "per-slice min-max FLAIR > t, one t for the split, mean Dice over unhealthy slices",
    }
