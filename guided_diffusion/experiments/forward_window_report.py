"""Tables and plots of the forward-window study (``guided_diffusion.experiments.forward_window``, whose
docstring defines every number): study.md, window.png, calibration_size.png."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from guided_diffusion.reporting.plots import _pyplot, _save
from guided_diffusion.utils.io_util import atomic_write_text

__all__ = ["CAL_METRICS", "HIST_BINS", "WINDOW_SHARES", "plot_calibration_size", "plot_window",
           "write_markdown"]

WINDOW_SHARES = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
HIST_BINS = 10  # peak-position histogram: 10 bins over [0, 1]
CAL_METRICS = ("dice", "auprc", "image_accuracy", "image_recall", "val_accuracy", "chosen_w")


def _num(d: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """The items of a mapping keyed by numbers written as text ("3", "10", "2.5"), in numeric order (JSON
    files store them sorted as text)."""
    return sorted(d.items(), key=lambda kv: float(kv[0]))


def _fmt(v: Any, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def write_markdown(window: Mapping[str, Any] | None, cal: Mapping[str, Any] | None, path: str) -> None:
    """study.md: the tables of both parts."""
    lines = ["# Forward-window study (scripts/forward_window_study.py)", ""]
    src = window or cal or {}
    lines += [f"Model sha256 `{src.get('model_sha256', '')}`, data `{src.get('data_sha256', '')}`, "
              f"seed {src.get('seed')}.", "", f"Command: `{src.get('command', '')}`", ""]
    if window:
        lines += ["## Where M_t peaks (part A)", "",
                  "Peak position = first argmax of M_t over the whole chain (recorded t_e: later of the "
                  "modalities), as a share of the training chain; test slices.", "",
                  "| R | w | unhealthy median [q25, q75] | at last step | healthy median [q25, q75] | "
                  "at last step | smallest F/R with t_e inside for half the unhealthy | smallest F/R "
                  "holding the chain's peak strictly inside for half the unhealthy |",
                  "|---|---|---|---|---|---|---|---|"]
        for r, ch in _num(window["chains"]):
            for w, e in _num(ch["groups"]["test"]["per_w"]):
                u, h = e["peak_position"]["unhealthy"]["recorded"], e["peak_position"]["healthy"]["recorded"]
                lines.append(f"| {r} | {w} | {_fmt(u.get('median'), 2)} [{_fmt(u.get('q25'), 2)}, "
                             f"{_fmt(u.get('q75'), 2)}] | {_fmt(u.get('share_at_last_step'), 2)} | "
                             f"{_fmt(h.get('median'), 2)} [{_fmt(h.get('q25'), 2)}, "
                             f"{_fmt(h.get('q75'), 2)}] | "
                             f"{_fmt(h.get('share_at_last_step'), 2)} | {_fmt(e['half_inside_share'], 1)} | "
                             f"{_fmt(e.get('half_chain_peak_inside_share'), 1)} |")
        for key, what in (("unhealthy", "0 < t_e < F - 1 (t_e = first argmax over the first F steps)"),
                          ("unhealthy_chain_peak_inside", "the whole chain's peak strictly inside the "
                           "window (0 < t_e(chain) < F - 1)")):
            lines += ["", f"Share of unhealthy test slices with {what}, per window share F/R:", "",
                      "| R | w | " + " | ".join(f"{s:g}" for s in WINDOW_SHARES) + " |",
                      "|" + "---|" * (len(WINDOW_SHARES) + 2)]
            for r, ch in _num(window["chains"]):
                for w, e in _num(ch["groups"]["test"]["per_w"]):
                    lines.append(f"| {r} | {w} | " + " | ".join(_fmt(x.get(key), 2) for x in e["windows"])
                                 + " |")
        lines.append("")
    if cal:
        full, st = cal["full"], cal["settings"]
        lines += ["## Calibration size (part B)", "",
                  f"Chain {st['timestep_respacing']}, {st['forward_steps']} forward steps; {st['draws']} "
                  "stratified draws per n; test split.", "",
                  "| n val | unhealthy Dice | pixel AUPRC | image accuracy | image recall | "
                  "chosen w (count) |",
                  "|---|---|---|---|---|---|"]
        for n, e in _num(cal["sizes"]):
            s = e["summary"]
            cell = {k: f"{_fmt(s[k]['mean'])} ± {_fmt(s[k]['std'])}" for k in CAL_METRICS}
            counts = ", ".join(f"{w}: {c}" for w, c in _num(s["chosen_w_counts"]))
            lines.append(f"| {n} | {cell['dice']} | {cell['auprc']} | {cell['image_accuracy']} | "
                         f"{cell['image_recall']} | {counts} |")
        lines.append(f"| all {cal['n_val']} | {_fmt(full['dice'])} | {_fmt(full['auprc'])} | "
                     f"{_fmt(full['image_accuracy'])} | {_fmt(full['image_recall'])} | "
                     f"{full['chosen_w']:g} |")
        lines.append("")
    atomic_write_text("\n".join(lines), path)


def plot_window(data: Mapping[str, Any], path: str) -> None:
    """window.png: per chain (column) the unhealthy peak-position histograms, the inside share against
    F/R, and the mean normalised M_t curves (unhealthy solid, healthy dashed), one colour per w."""
    plt = _pyplot()
    chains = [ch for _, ch in _num(data["chains"])]
    fig, axes = plt.subplots(3, len(chains), figsize=(3.6 * len(chains), 8.4), squeeze=False)
    edges = np.linspace(0, 1, HIST_BINS + 1)
    for col, ch in enumerate(chains):
        per_w = ch["groups"]["test"]["per_w"]
        for j, (w, e) in enumerate(_num(per_w)):
            hist = e["peak_position"]["unhealthy"]["recorded"].get("hist")
            if hist:
                axes[0, col].stairs(hist, edges, color=f"C{j}", label=f"w={w}")
            xs = [x["F_over_R"] for x in e["windows"]]
            ys = [np.nan if x["unhealthy"] is None else x["unhealthy"] for x in e["windows"]]
            axes[1, col].plot(xs, ys, marker="o", ms=3, color=f"C{j}", label=f"w={w}")
            held = [x.get("unhealthy_chain_peak_inside") for x in e["windows"]]
            held = [np.nan if v is None else v for v in held]
            axes[1, col].plot(xs, held, "--", color=f"C{j}", lw=0.8)
            for key, style in (("unhealthy", "-"), ("healthy", "--")):
                if e["mean_curve"][key] is not None:
                    axes[2, col].plot(ch["positions"], e["mean_curve"][key], style, color=f"C{j}", lw=1)
        axes[1, col].axhline(0.5, color="grey", lw=0.5)
        axes[0, col].set_title(f"R={ch['R']}: unhealthy peak position (test)", fontsize=8)
        axes[0, col].set_xlabel("t_e / chain", fontsize=7)
        axes[1, col].set_title("unhealthy: t_e inside (-), chain peak inside (--)", fontsize=8)
        axes[1, col].set_xlabel("window F / R", fontsize=7)
        axes[1, col].set_ylim(-0.02, 1.02)
        axes[2, col].set_title("mean M_t / max (unhealthy -, healthy --)", fontsize=8)
        axes[2, col].set_xlabel("t / T", fontsize=7)
        for ax in axes[:, col]:
            ax.tick_params(labelsize=6)
        axes[0, col].legend(fontsize=5)
    fig.suptitle("where M_t peaks (scripts/forward_window_study.py)", fontsize=8, y=1.01)
    fig.tight_layout()
    _save(fig, path)


def plot_calibration_size(data: Mapping[str, Any], path: str) -> None:
    """calibration_size.png: test Dice / AUPRC and image accuracy / recall against the validation size n
    (mean, band = ± std over draws), the full validation split as dashed lines."""
    plt = _pyplot()
    sizes = sorted(data["sizes"].values(), key=lambda e: e["n"])
    ns = np.array([e["n"] for e in sizes], dtype=float)
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for ax, keys in zip(axes, (("dice", "auprc"), ("image_accuracy", "image_recall"))):
        for j, k in enumerate(keys):
            m, s = (np.array([np.nan if e["summary"][k][q] is None else e["summary"][k][q] for e in sizes])
                    for q in ("mean", "std"))
            ax.plot(ns, m, marker="o", ms=3, color=f"C{j}", label=k)
            ax.fill_between(ns, m - s, m + s, color=f"C{j}", alpha=0.2)
            if data["full"].get(k) is not None:
                ax.axhline(data["full"][k], color=f"C{j}", ls="--", lw=0.8)
        ax.set_xlabel("validation slices n", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.legend(fontsize=6)
    axes[0].set_title("test unhealthy segmentation", fontsize=8)
    axes[1].set_title("test image level", fontsize=8)
    _save(fig, path)
