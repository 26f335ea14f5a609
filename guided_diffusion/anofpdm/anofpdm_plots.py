"""Fig. 5 / Fig. 2-style plots of ONE finished AnoFPDM evaluation (``scripts/translation_FPDM.py`` log dir).

``make_plots(log_dir, data_dir=None, out_dir=None)`` writes into ``out_dir`` (default ``LOG_DIR/plots``):

* ``te_ratio.png``: mixed and unhealthy-slice Dice vs the t_e ratio (t_e <- round(ratio * t_e)), one line
  per w, ratio 1 marked; read from metrics.json "settings_results" (needs >= 2 ``--t_e_ratio`` values, e.g.
  ``--t_e_ratio 0.25 0.5 1 1.5 2 3``);
* ``thresholds.png``: Dice of fixed thresholds on the same anomaly maps (a grid) against the Dice of the
  paper's dynamic per-slice quantile threshold Q* (horizontal lines); needs ``arrays/`` (``--save_data True``)
  and the ground-truth masks of the run's data dir; masks are classification-gated (mixed) / ungated
  (unhealthy) and size-filtered exactly as the evaluation did (``metrics.cc_filter`` with the run's
  ``min_cc_size``), Dice = ``metrics.dice_per_sample`` (exact, empty/empty = 1);
* ``mse_curves.png``: MSE_h and MSE_∅ (mean over the evaluated modalities) vs forward step for healthy and
  unhealthy test slices, mean ± std band (from ``arrays/``, labels from slices.csv);
* ``plots.json``: every plotted number, what was skipped and why, and what produced the files.

A plot whose inputs are missing is skipped with one logged reason (its PNG of an earlier call in ``out_dir``
is removed); the others are still made. Setting used
for the two array plots: ``setting`` if given, else the primary w at t_e ratio 1 (if evaluated), else the
primary setting of metrics.json.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from guided_diffusion.anofpdm.translation_outputs import setting_key
from guided_diffusion.cli import ArgumentParser
from guided_diffusion.data.brats import get_eval_loader
from guided_diffusion.metrics.slice_metrics import NAN, cc_filter, dice_per_sample
from guided_diffusion.reporting.plots import _pyplot, _save
from guided_diffusion.utils.io_util import atomic_write_json, strict_json

PRODUCER = "guided_diffusion.anofpdm.anofpdm_plots.make_plots (scripts/plot_anofpdm.py)"
PLOT_FILES = {"te_ratio": "te_ratio.png", "thresholds": "thresholds.png", "mse_curves": "mse_curves.png"}


class PlotSkipped(Exception):
    """A plot's inputs are missing; the message is the one-line reason."""


def read_metrics(log_dir: str) -> dict:
    """metrics.json of an evaluation log dir (FileNotFoundError / ValueError naming the file)."""
    if not os.path.isdir(log_dir):
        raise FileNotFoundError(f"log dir {log_dir} does not exist (expected a translation_FPDM.py log dir)")
    path = os.path.join(log_dir, "metrics.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: {log_dir} is not a finished translation_FPDM.py log dir")
    try:
        with open(path, encoding="utf-8") as f:
            metrics = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from err
    if not isinstance(metrics, dict) or "settings_results" not in metrics \
            or "config" not in metrics.get("run", {}):
        raise ValueError(f"{path} is not an evaluation metrics.json (no settings_results or run.config)")
    return metrics


def te_ratio_series(metrics: Mapping[str, Any], log_dir: str | None = None) -> dict[str, dict[str, list]]:
    """{w as "%g": {"ratio", "mixed_dice", "unhealthy_dice", "t_e_at_last_step"}} over the evaluated t_e
    ratios (sorted); the last: share of slices whose (scaled) t_e reached the last forward step, where a
    larger ratio cannot go further (from slices.csv of ``log_dir``; None without it)."""
    cfg = metrics["run"]["config"]
    ratios = sorted(float(r) for r in cfg["segment"]["t_e_ratio"])
    if len(ratios) < 2:
        raise PlotSkipped(f"only one t_e ratio was evaluated ({ratios}); run translation_FPDM.py with e.g. "
                          "--t_e_ratio 0.25 0.5 1 1.5 2 3")
    out = {}
    for w in cfg["forward"]["w"]:
        res = [metrics["settings_results"][setting_key(float(w), r)] for r in ratios]
        out[f"{float(w):g}"] = {"ratio": ratios, "mixed_dice": [r["mixed"]["dice"] for r in res],
                                "unhealthy_dice": [r["unhealthy"]["dice"] for r in res],
                                "t_e_at_last_step": [_capped(log_dir, setting_key(float(w), r),
                                                             int(cfg["forward"]["forward_steps"]))
                                                     for r in ratios]}
    return out


def _capped(log_dir: str | None, key: str, steps: int) -> float | None:
    """Share of the slices.csv rows of ``key`` with t_e >= steps - 1 (None when unknown)."""
    try:
        rows = read_slice_rows(log_dir, key) if log_dir else {}
    except PlotSkipped:
        rows = {}
    return float(np.mean([int(r["t_e"]) >= steps - 1 for r in rows.values()])) if rows else None


def _note(fig, note: str) -> None:
    """Small grey provenance line under the figure."""
    if note:
        fig.text(0.01, -0.02, note, fontsize=6, color="grey", ha="left", va="top")


def plot_te_ratio(series: Mapping[str, Mapping[str, Sequence[float]]], path: str, primary_w: str,
                  note: str = "") -> None:
    """Mixed and unhealthy Dice vs t_e ratio, one line per w (primary w bold), ratio 1 marked."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, (key, label) in zip(axes, (("mixed_dice", "mixed Dice (gated)"),
                                       ("unhealthy_dice", "unhealthy-slice Dice"))):
        for i, (w, s) in enumerate(series.items()):
            x, y = np.asarray(s["ratio"], float), np.asarray(s[key], float)
            ax.plot(x, y, marker="o", ms=4, color=f"C{i}", lw=2.2 if w == primary_w else 1.0, label=f"w={w}")
            if np.any(np.isclose(x, 1.0)):
                j = int(np.argmin(np.abs(x - 1.0)))
                ax.plot([x[j]], [y[j]], marker="*", ms=15, color=f"C{i}", mec="black", zorder=5)
        ax.axvline(1.0, color="grey", ls="--", lw=0.8)
        ax.set_xlabel("t_e ratio (segment up to round(ratio · t_e))")
        ax.set_ylabel(label)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    s = series.get(primary_w, {})
    cap = dict(zip(s.get("ratio", []), s.get("t_e_at_last_step", []))).get(1.0)
    txt = (f"\nw={primary_w}: t_e is the last forward step for {100 * cap:.0f} % of slices at ratio 1 "
           "(ratios > 1 are capped there)") if cap else ""
    fig.suptitle(f"Dice vs t_e ratio (★ / dashed = ratio 1, the paper's t_e); test split{txt}", fontsize=9)
    _note(fig, note)
    _save(fig, path)


def pick_setting(metrics: Mapping[str, Any], setting: str | None = None) -> str:
    """The setting of the array plots: ``setting``, else primary w at ratio 1, else the primary setting."""
    keys = list(metrics["settings_results"])
    if setting is not None:
        if setting not in keys:
            raise ValueError(f"--setting {setting!r} is not one of the evaluated settings {keys}")
        return setting
    primary = metrics["primary_setting"]
    w = primary.split(",")[0]
    at_one = f"{w},t_e_ratio=1"
    return at_one if at_one in keys else primary


def load_arrays(log_dir: str, key: str) -> dict[str, np.ndarray]:
    """The arrays/ npz of setting ``key`` (PlotSkipped when the run had no ``--save_data True``)."""
    path = os.path.join(log_dir, "arrays", f"{key.replace(',', '_')}.npz")
    if not os.path.isfile(path):
        raise PlotSkipped(f"{path} not found; run translation_FPDM.py with --save_data True")
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def read_slice_rows(log_dir: str, key: str) -> dict[int, dict[str, str]]:
    """{dataset index: slices.csv row} of setting ``key``."""
    path = os.path.join(log_dir, "slices.csv")
    if not os.path.isfile(path):
        raise PlotSkipped(f"{path} not found (needed for the slice labels)")
    with open(path, newline="", encoding="utf-8") as f:
        rows = {int(r["index"]): r for r in csv.DictReader(f) if r["setting"] == key}
    if not rows:
        raise ValueError(f"{path} has no rows of setting {key}")
    return rows


def _labels(rows: Mapping[int, Mapping[str, str]], index: np.ndarray, log_dir: str) -> np.ndarray:
    """Image labels (1 = unhealthy) of the array rows ``index`` from slices.csv."""
    missing = sorted(set(index.tolist()) - set(rows))
    if missing:
        raise ValueError(f"{os.path.join(log_dir, 'slices.csv')} lacks the arrays/ slices {missing[:5]}")
    return np.asarray([int(rows[i]["label"]) for i in index.tolist()])


def load_ground_truth(data_dir: str, index: np.ndarray, metrics: Mapping[str, Any],
                      rows: Mapping[int, Mapping[str, str]]) -> tuple[np.ndarray, np.ndarray]:
    """(gt bool [N, H, W], label [N]) of the test slices ``index``, checked against slices.csv (patient,
    slice, GT pixel count) so that a data dir of another run is refused."""

    cfg = metrics["run"]["config"]
    if not os.path.isdir(data_dir):
        raise PlotSkipped(f"data dir {data_dir} not found (pass --data_dir for the ground-truth masks)")
    _, ds = get_eval_loader(data_dir, "test", 1, num_slices=cfg["eval"]["num_slices"],
                            in_channels=cfg["model"]["in_channels"], world_size=1, rank=0)
    gts, labels = [], []
    for i in index.tolist():
        if i >= len(ds):
            raise ValueError(f"data dir {data_dir}: test split has {len(ds)} slices, the run used index {i}")
        _, gt, lab = ds.load(i)
        g = gt[0].numpy() > 0.5
        row, (pid, sl) = rows[i], ds.slice_info(i)
        have = (str(pid), int(sl), int(g.sum()), int(lab))
        if have != (row["patient"], int(row["slice"]), int(row["n_gt"]), int(row["label"])):
            raise ValueError(f"data dir {data_dir}: test slice {i} is {have} (patient, slice, GT px, label) "
                             f"but slices.csv has ({row['patient']}, {row['slice']}, {row['n_gt']}, "
                             f"{row['label']}); not this run's data")
        gts.append(g)
        labels.append(int(lab))
    return np.stack(gts), np.asarray(labels)


def split_dice(mask_gated: np.ndarray, mask_all: np.ndarray, gt: np.ndarray, labels: np.ndarray,
               min_cc_size: int | None, fill_holes: bool = True) -> tuple[float, float]:
    """(mixed Dice, unhealthy Dice) as the evaluator computes them: size filter (None = off), exact
    per-slice Dice; mixed = gated masks over all slices, unhealthy = ungated masks over label-1 slices."""
    if min_cc_size is not None:
        mask_gated = cc_filter(mask_gated, min_cc_size, fill_holes)
        mask_all = cc_filter(mask_all, min_cc_size, fill_holes)
    return _dice_pair(mask_gated, mask_all, gt, labels)


def _dice_pair(mask_gated: np.ndarray, mask_all: np.ndarray, gt: np.ndarray,
               labels: np.ndarray) -> tuple[float, float]:
    mixed = float(np.mean(dice_per_sample(mask_gated, gt, smooth=0)))
    unh = labels == 1
    unhealthy = float(np.mean(dice_per_sample(mask_all[unh], gt[unh], smooth=0))) if unh.any() else NAN
    return mixed, unhealthy


def threshold_grid(anomaly_map: np.ndarray, n: int = 41) -> np.ndarray:
    """n fixed thresholds: quantiles 0.80 ... 0.999 of the pooled map values (duplicates dropped)."""
    return np.unique(np.quantile(anomaly_map.astype(np.float64).ravel(), np.linspace(0.80, 0.999, n)))


def fixed_threshold_dice(anomaly_map: np.ndarray, pred_label: np.ndarray, gt: np.ndarray, labels: np.ndarray,
                         thresholds: Sequence[float], min_cc_size: int | None,
                         fill_holes: bool = True) -> dict[str, list[float]]:
    """Dice of masks ``map >= thr`` for every fixed ``thr`` (gated with ``pred_label`` for mixed; the
    gate zeroes whole slices, so filtering the ungated mask once and gating it after is the same)."""
    gate = (np.asarray(pred_label) == 1)[:, None, None]
    mixed, unhealthy = [], []
    for thr in thresholds:
        allm = anomaly_map >= thr
        if min_cc_size is not None:
            allm = cc_filter(allm, min_cc_size, fill_holes)
        m, u = _dice_pair(allm & gate, allm, gt, labels)
        mixed.append(m)
        unhealthy.append(u)
    return {"threshold": [float(t) for t in thresholds], "mixed_dice": mixed, "unhealthy_dice": unhealthy}


def plot_thresholds(data: Mapping[str, Any], path: str, title: str, note: str = "") -> None:
    """Fixed-threshold Dice curves with the dynamic-threshold Dice as horizontal lines."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    x = np.asarray(data["fixed"]["threshold"])
    for i, (key, name) in enumerate((("mixed_dice", "mixed"), ("unhealthy_dice", "unhealthy"))):
        ax.plot(x, data["fixed"][key], marker=".", color=f"C{i}", label=f"fixed threshold, {name}")
        best = data.get("best_fixed", {}).get(key)
        if best is not None:
            ax.plot([best["threshold"]], [best["dice"]], marker="*", ms=13, color=f"C{i}", mec="black",
                    zorder=5)
        ax.axhline(data["dynamic"][key], color=f"C{i}", ls="--", label=f"dynamic Q*, {name}")
    ax.set_xlabel("fixed threshold on the anomaly map (★ = best fixed, chosen with the pixel labels)")
    ax.set_ylabel("Dice")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=8)
    _note(fig, note)
    _save(fig, path)


def mse_curves(mse_h: np.ndarray, mse_null: np.ndarray, labels: np.ndarray, w_index: int) -> dict[str, Any]:
    """Per-step mean / std over slices of MSE_h (w ``w_index``) and MSE_∅, modality-averaged, per class.

    Args: mse_h [N, nW, S, M]; mse_null [N, S, M]; labels [N] (1 = unhealthy).
    """
    h, n = mse_h[:, w_index].mean(-1).astype(np.float64), mse_null.mean(-1).astype(np.float64)
    out: dict[str, Any] = {"step": list(range(h.shape[1]))}
    for cls, name in ((0, "healthy"), (1, "unhealthy")):
        sel = labels == cls
        out[name] = {"n_slices": int(sel.sum())}
        for key, arr in (("mse_h", h), ("mse_null", n)):
            out[name][key] = {"mean": arr[sel].mean(0).tolist() if sel.any() else [],
                              "std": arr[sel].std(0).tolist() if sel.any() else []}
    return out


def plot_mse_curves(curves: Mapping[str, Any], path: str, title: str, note: str = "") -> None:
    """Fig. 2-style MSE_h / MSE_∅ curves (mean ± std band), healthy and unhealthy panels."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    x = np.asarray(curves["step"])
    for ax, name in zip(axes, ("healthy", "unhealthy")):
        c = curves[name]
        for i, (key, label) in enumerate((("mse_h", "MSE_h (healthy-guided)"),
                                          ("mse_null", "MSE_∅ (unguided)"))):
            if not c[key]["mean"]:
                continue
            m, s = np.asarray(c[key]["mean"]), np.asarray(c[key]["std"])
            ax.plot(x, m, color=f"C{i}", label=label)
            ax.fill_between(x, m - s, m + s, color=f"C{i}", alpha=0.2)
        ax.set_title(f"{name} slices (n={c['n_slices']})", fontsize=9)
        ax.set_xlabel("forward step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("MSE to the input (mean over modalities)")
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    _note(fig, note)
    _save(fig, path)


def make_plots(log_dir: str, data_dir: str | None = None, out_dir: str | None = None,
               setting: str | None = None, n_thresholds: int = 41,
               log: Callable[[str], None] = print) -> dict[str, Any]:
    """Write te_ratio.png, thresholds.png, mse_curves.png and plots.json; returns the plots.json content.

    Args:
        log_dir: a finished translation_FPDM.py log dir (metrics.json, slices.csv, arrays/).
        data_dir: data of the run (default: the run's ``--data_dir`` from metrics.json).
        out_dir: output folder (default ``log_dir/plots``).
        setting: setting of the array plots (e.g. ``w=2,t_e_ratio=1``; default see the module docstring).
        n_thresholds: size of the fixed-threshold grid.
    """
    if n_thresholds < 2:
        raise ValueError(f"--n_thresholds must be >= 2, got {n_thresholds}")
    metrics = read_metrics(log_dir)
    out_dir = out_dir or os.path.join(log_dir, "plots")
    cfg = metrics["run"]["config"]
    data_dir = data_dir or cfg["eval"]["data_dir"]
    key = pick_setting(metrics, setting)
    settings = metrics["settings_results"][key]["settings"]
    min_cc = int(settings["min_cc_size"]) if settings["cc_filter"] else None
    fill = bool(settings["cc_fill_holes"])
    result: dict[str, Any] = {"produced_by": PRODUCER, "log_dir": os.path.abspath(log_dir),
                              "primary_setting": metrics["primary_setting"], "setting": key,
                              "files": {}, "skipped": {}}
    primary_w = metrics["primary_setting"].split(",")[0].split("=")[1]
    cache: dict[str, Any] = {}
    note = f"{PRODUCER} from {os.path.abspath(log_dir)}"

    def arrays() -> dict[str, np.ndarray]:
        if "arrays" not in cache:
            cache["arrays"] = load_arrays(log_dir, key)
        return cache["arrays"]

    def te_ratio() -> Any:
        series = te_ratio_series(metrics, log_dir)
        plot_te_ratio(series, os.path.join(out_dir, PLOT_FILES["te_ratio"]), primary_w, note)
        return {"per_w": series, "primary_w": primary_w}

    def thresholds() -> Any:
        a = arrays()
        rows = read_slice_rows(log_dir, key)
        _labels(rows, a["index"], log_dir)
        gt, labels = load_ground_truth(data_dir, a["index"], metrics, rows)
        grid = threshold_grid(a["anomaly_map"], n_thresholds)
        fixed = fixed_threshold_dice(a["anomaly_map"], a["pred_label"], gt, labels, grid, min_cc, fill)
        dyn = split_dice(a["pred_mask"], a["pred_mask_all"], gt, labels, min_cc, fill)
        ref = metrics["settings_results"][key]
        filt = f"CC filter: components <= {min_cc} px removed" if min_cc is not None else "no CC filter"
        data = {"fixed": fixed, "dynamic": {"mixed_dice": dyn[0], "unhealthy_dice": dyn[1]},
                "metrics_json": {"mixed_dice": ref["mixed"]["dice"],
                                 "unhealthy_dice": ref["unhealthy"]["dice"]},
                "size_filter": {"min_cc_size": min_cc, "fill_holes": fill},
                "best_fixed": {k: {"threshold": fixed["threshold"][int(np.nanargmax(fixed[k]))],
                                   "dice": float(np.nanmax(fixed[k]))}
                               for k in ("mixed_dice", "unhealthy_dice") if np.isfinite(fixed[k]).any()}}
        plot_thresholds(data, os.path.join(out_dir, PLOT_FILES["thresholds"]),
                        f"dynamic per-slice quantile threshold Q* vs fixed thresholds ({key})\n{filt}; "
                        "mixed: gated by the cosine rule, all slices; unhealthy: ungated", note)
        return data

    def mse() -> Any:
        a, rows = arrays(), read_slice_rows(log_dir, key)
        labels = _labels(rows, a["index"], log_dir)
        ws = [f"{float(w):g}" for w in cfg["forward"]["w"]]
        w = key.split(",")[0].split("=")[1]
        curves = mse_curves(a["mse_h"], a["mse_null"], labels, ws.index(w))
        patience = int(cfg["forward"].get("early_stop_patience", 0) or 0)
        held = f"; early stop {patience}: a stopped batch holds its last values" if patience else ""
        plot_mse_curves(curves, os.path.join(out_dir, PLOT_FILES["mse_curves"]),
                        f"MSE_h (w={w}) and MSE_∅ vs forward step, mean ± std over test slices{held}", note)
        return {"w": w, "early_stop_patience": patience, **curves}

    for name, fn in (("te_ratio", te_ratio), ("thresholds", thresholds), ("mse_curves", mse)):
        try:
            result[name] = fn()
            result["files"][name] = PLOT_FILES[name]
        except PlotSkipped as why:
            result["skipped"][name] = str(why)
            stale = os.path.join(out_dir, PLOT_FILES[name])
            if os.path.isfile(stale):  # a PNG of an earlier call must not pass for this run's
                os.remove(stale)
            log(f"{PLOT_FILES[name]} skipped: {why}")

    atomic_write_json(strict_json(result), os.path.join(out_dir, "plots.json"))
    log(f"plots of {log_dir} ({key}) in {out_dir}: {', '.join(result['files'].values()) or 'none'}")
    return result


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """CLI: ``plot_anofpdm.py LOG_DIR [--data_dir D] [--out DIR] [--setting KEY] [--n_thresholds N]``."""
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("log_dir", help="a finished translation_FPDM.py log dir")
    p.add_argument("--data_dir", default=None, help="the run's data (default: its --data_dir)")
    p.add_argument("--out", default=None, help="output folder (default LOG_DIR/plots)")
    p.add_argument("--setting", default=None, help="setting of the array plots, e.g. 'w=2,t_e_ratio=1'")
    p.add_argument("--n_thresholds", type=int, default=41, help="size of the fixed-threshold grid")
    a = p.parse_args(list(argv) if argv is not None else None)
    if a.data_dir is not None and not os.path.isdir(a.data_dir):
        raise FileNotFoundError(f"--data_dir {a.data_dir} is not a folder; pass the run's preprocessed data "
                                "root, or omit it to use the run's own --data_dir")
    if a.out is not None and os.path.exists(a.out) and not os.path.isdir(a.out):
        raise NotADirectoryError(f"--out {a.out} is a file; expected a folder")
    return make_plots(a.log_dir, a.data_dir, a.out, a.setting, a.n_thresholds)
