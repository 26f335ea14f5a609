"""Experiment plots (matplotlib, Agg backend, PNG written atomically).

* ``plot_w_selection``: Fig. 5-style validation accuracy of the cosine rule and unhealthy-slice Dice vs
  the guidance strength w, one line per model (mean over seeds, error bars = population std), the w chosen
  by the paper's rule marked with a star;
* ``plot_denoisers``: the denoiser table as points with error bars (Dice / IoU / AUPRC, mixed and
  unhealthy) and the cost ratios to v2 as bars.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from guided_diffusion.utils.io_util import atomic_write_bytes


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    atomic_write_bytes(buf.getvalue(), path)


def _curve(runs: Sequence[Mapping[str, Mapping[str, Any]]], key: str) -> tuple[np.ndarray, ...]:
    ws = sorted({float(w) for run in runs for w in run})
    mean, std = [], []
    for w in ws:
        vals = [run[f"{w:g}"][key] for run in runs if f"{w:g}" in run and run[f"{w:g}"].get(key) is not None]
        vals = [v for v in vals if math.isfinite(v)]
        mean.append(np.mean(vals) if vals else np.nan)
        std.append(np.std(vals) if vals else np.nan)
    return np.array(ws), np.array(mean), np.array(std)


def plot_w_selection(
    per_w: Mapping[str, Sequence[Mapping[str, Mapping[str, Any]]]], chosen: Mapping[str, Sequence[float]],
    path: str,
) -> None:
    """Validation accuracy and unhealthy Dice vs w per model.

    Args:
        per_w: {model: [one dict per seed {w as "%g": {"accuracy", "unhealthy_dice", ...}}]} (the "per_w"
            of experiments.read_anofpdm_metrics).
        chosen: {model: chosen w per seed}; the most frequent one is marked with a star on both panels.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    panels = (("accuracy", "validation accuracy (cosine rule)"), ("unhealthy_dice", "unhealthy-slice Dice"))
    for ax, (key, label) in zip(axes, panels):
        for i, (name, runs) in enumerate(per_w.items()):
            ws, mean, std = _curve(runs, key)
            if ws.size == 0:
                continue
            color = f"C{i}"
            ax.errorbar(ws, mean, yerr=std, marker="o", ms=4, capsize=3, color=color, label=name)
            picks = [float(w) for w in chosen.get(name, []) if w is not None]
            w0 = max(set(picks), key=picks.count) if picks else None
            if w0 is not None and np.any(np.isclose(ws, w0)):
                j = int(np.argmin(np.abs(ws - w0)))
                ax.plot([ws[j]], [mean[j]], marker="*", ms=16, color=color, mec="black", zorder=5)
        ax.set_xlabel("guidance strength w")
        ax.set_ylabel(label)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_title("validation split (image labels only)", fontsize=9)
    axes[1].set_title("test split", fontsize=9)
    fig.suptitle("label-free w: largest w within 99 % of the best validation accuracy (★ = chosen); "
                 "mean ± std over evaluation seeds", fontsize=9)
    axes[1].legend(fontsize=8, loc="best")
    _save(fig, path)


def plot_denoisers(aggregated: Mapping[str, Mapping[str, Any]], path: str) -> None:
    """Segmentation metrics (points ± std) and cost ratios to v2 (bars) of the denoiser table."""
    plt = _pyplot()
    names = list(aggregated)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [3, 2]})
    metrics = [f"{s}.{m}" for s in ("mixed", "unhealthy") for m in ("dice", "iou", "auprc")]
    x = np.arange(len(metrics))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        mean = [100 * aggregated[name][m]["mean"] for m in metrics]
        std = [100 * aggregated[name][m]["std"] for m in metrics]
        ax.errorbar(x + (i - (len(names) - 1) / 2) * width, mean, yerr=std, fmt="o", capsize=3, label=name)
    ax.set_xticks(x, [m.replace("unhealthy", "unh").replace(".", "\n") for m in metrics], fontsize=8)
    ax.set_ylabel("%  (mean ± std over seeds)")
    ax.set_title("segmentation (AnoFPDM, label-free w)", fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    costs = [("cost.params_ratio", "params"), ("cost.step_s_ratio", "train step"),
             ("cost.peak_mib_ratio", "memory")]
    cx = np.arange(len(costs))
    for i, name in enumerate(names):
        vals = [aggregated[name].get(k, {}).get("mean", np.nan) for k, _ in costs]
        bx.bar(cx + (i - (len(names) - 1) / 2) * width, vals, width, label=name)
    bx.axhline(1.0, color="black", lw=0.8)
    bx.set_xticks(cx, [c for _, c in costs], fontsize=8)
    bx.set_ylabel("ratio to v2")
    bx.set_title("cost, measured side by side", fontsize=9)
    bx.grid(alpha=0.3, axis="y")
    _save(fig, path)
