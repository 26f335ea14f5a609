"""Learning curves over training seeds: mean ± std per network and step (issue 22's figure and table).

Each group (a label, e.g. a network) is a list of learning-curve runs (scripts/learning_curves.py log
folders, their ``curves/curves.json``) that differ only in the training seed: every other setting (the
network, diffusion, training flags, data, evaluation flags and evaluation seed) must agree within a group,
and the training seeds must differ, else the summary is refused naming the setting. Groups may differ in
anything (that is the comparison). A step enters a group's summary when at least one run has it; ``n``
says how many runs it averages (the band is the sample std over those runs, 0 for one run).

Outputs of ``write_outputs``: summary.json (per group and step: mean, std, n and the per-seed values of
every metric; the runs, their seeds and settings; group_order, the rows' order; with ``--reference G`` the
differences to G with 95 % Welch intervals), summary.md (the table at one step, and the differences),
summary.png (one panel per metric against the training step, one line per group, bands = ± std over seeds).
"""

from __future__ import annotations

import json
import math
import os
import shlex
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from guided_diffusion.cli import ArgumentParser
from guided_diffusion.experiments.experiments import flat_settings
from guided_diffusion.experiments.learning_curves import CURVES_JSON, METRICS
from guided_diffusion.reporting.plots import _pyplot, _save
from guided_diffusion.utils.io_util import atomic_write_json, atomic_write_text

__all__ = ["PLOT_METRICS", "TABLE_METRICS", "differences", "differences_md", "groups_in_folder", "load_group",
           "main", "parse_group", "summarise", "table_md", "write_outputs"]

PLOT_METRICS = ("test.dice", "test.auprc", "test.image_accuracy", "test.te_inside", "test.loss",
                "test.cond_unhealthy")
TABLE_METRICS = ("test.dice", "test.dice_pooled", "test.auprc", "test.image_accuracy", "test.image_recall",
                 "test.image_specificity", "test.te_inside", "val.dice")



def _curves_path(run_dir: str) -> str:
    for path in (os.path.join(run_dir, "curves", CURVES_JSON), os.path.join(run_dir, CURVES_JSON)):
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"{run_dir}: no curves/{CURVES_JSON} (not a scripts/learning_curves.py run)")


def load_group(label: str, run_dirs: Sequence[str]) -> list[dict[str, Any]]:
    """The curves files of one group's runs, checked to differ only in the training seed.

    Returns [{"dir", "seed", "settings", "rows"}] sorted by seed. ValueError naming the group and the
    setting that differs, or the repeated seed."""

    runs = []
    for d in run_dirs:
        path = _curves_path(d)
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            settings, rows = data["settings"], list(data["rows"])
            seed = int(settings["train"]["seed"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path} is not a curves file ({type(err).__name__}: {err})") from None
        runs.append({"dir": os.path.abspath(d), "seed": seed, "settings": settings, "rows": rows})
    if not runs:
        raise ValueError(f"group {label!r} has no runs")
    seeds = [r["seed"] for r in runs]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"group {label!r}: runs with the same training seed {seeds}; a group averages "
                         "over training seeds")
    ref = flat_settings(runs[0]["settings"])
    for r in runs[1:]:
        other = flat_settings(r["settings"])
        diffs = [k for k in sorted(set(ref) | set(other)) if k != "train.seed" and ref.get(k) != other.get(k)]
        if diffs:
            k = diffs[0]
            raise ValueError(f"group {label!r}: {r['dir']} differs from {runs[0]['dir']} in {k} "
                             f"({other.get(k)!r} vs {ref.get(k)!r}); runs of a group may differ only in "
                             "the training seed")
    return sorted(runs, key=lambda r: r["seed"])


def _value(row: Mapping[str, Any], key: str) -> float | None:
    split, metric = key.split(".", 1)
    v = row.get(split, {}).get(metric)
    return None if v is None or not math.isfinite(float(v)) else float(v)


def summarise(groups: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, Any]:
    """Mean, sample std and n over the runs of each group at each step, for every split.metric.

    Args: groups: label -> load_group's runs. Returns {label: {"seeds", "steps": [{"step", "n",
    "metrics": {key: {"mean", "std", "n", "values": {seed: value}}}}]}}; a value missing or non-finite in a
    run is left out of that step's statistics (its n says so)."""

    keys = [f"{s}.{m}" for s in ("test", "val") for m in METRICS]
    out: dict[str, Any] = {}
    for label, runs in groups.items():
        by_step: dict[int, dict[int, Mapping[str, Any]]] = {}
        for run in runs:
            for row in run["rows"]:
                by_step.setdefault(int(row["step"]), {})[run["seed"]] = row
        steps = []
        for step in sorted(by_step):
            rows = by_step[step]
            metrics = {}
            for key in keys:
                values = {seed: v for seed, row in sorted(rows.items())
                          if (v := _value(row, key)) is not None}
                arr = np.array(list(values.values()), dtype=np.float64)
                std = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
                metrics[key] = {"mean": float(arr.mean()) if arr.size else None,
                                "std": std if arr.size else None,
                                "n": int(arr.size), "values": {str(s): v for s, v in values.items()}}
            steps.append({"step": step, "n": len(rows), "metrics": metrics})
        out[label] = {"seeds": [r["seed"] for r in runs], "steps": steps}
    return out


def differences(summary: Mapping[str, Any], reference: str, step: int,
                keys: Sequence[str] = TABLE_METRICS) -> dict[str, Any]:
    """Each group's mean minus the ``reference`` group's at ``step``, with a 95 % Welch confidence interval.

    Returns {group: {key: {"diff", "ci95": [lo, hi] or None, "df", "n", "n_ref"}}} for every group but the
    reference; the interval needs >= 2 finite values on both sides (else None: one seed has no spread)."""
    from scipy import stats

    if reference not in summary:
        raise ValueError(f"--reference {reference!r} is not a group (groups: {', '.join(summary)})")

    def at(label: str) -> Mapping[str, Any]:
        row = next((s for s in summary[label]["steps"] if s["step"] == step), None)
        if row is None:
            raise ValueError(f"group {label!r} has no evaluation at step {step}")
        return row["metrics"]

    ref, out = at(reference), {}
    for label in summary:
        if label == reference:
            continue
        mine, cells = at(label), {}
        for key in keys:
            a, b = (np.array(list(m[key]["values"].values()), dtype=np.float64) for m in (mine, ref))
            cell: dict[str, Any] = {"diff": None, "ci95": None, "df": None, "n": int(a.size),
                                    "n_ref": int(b.size)}
            if a.size and b.size:
                cell["diff"] = float(a.mean() - b.mean())
            if a.size > 1 and b.size > 1:
                va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
                se = math.sqrt(va + vb)
                if se > 0:
                    df = (va + vb) ** 2 / (va**2 / (a.size - 1) + vb**2 / (b.size - 1))
                    half = float(stats.t.ppf(0.975, df)) * se
                    cell.update(ci95=[cell["diff"] - half, cell["diff"] + half], df=float(df))
            cells[key] = cell
        out[label] = cells
    return out


def differences_md(diffs: Mapping[str, Any], reference: str, step: int,
                   keys: Sequence[str] = TABLE_METRICS) -> str:
    """Markdown table of ``differences``: one row per group, cells 'diff [lo, hi]'."""

    def cell(c: Mapping[str, Any]) -> str:
        if c["diff"] is None:
            return "–"
        ci = f" [{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}]" if c["ci95"] else " (one seed: no interval)"
        return f"{c['diff']:+.3f}{ci}"

    lines = [f"| group − {reference} | {' | '.join(keys)} |", "|---" * (len(keys) + 1) + "|"]
    lines += [f"| {label} | {' | '.join(cell(cells[k]) for k in keys)} |" for label, cells in diffs.items()]
    return (f"Difference to {reference} at step {step}: mean difference [95 % Welch confidence interval over "
            "training seeds].\n\n" + "\n".join(lines) + "\n")


def _common_step(summary: Mapping[str, Any], step: int | None) -> int:
    if step is not None:
        return step
    common = set.intersection(*[{s["step"] for s in g["steps"]} for g in summary.values()])
    if not common:
        raise ValueError("the groups share no evaluated step; pass --step")
    return max(common)


def _cell(stat: Mapping[str, Any]) -> str:
    if stat["mean"] is None:
        return "–"
    return f"{stat['mean']:.3f} ± {stat['std']:.3f} (n={stat['n']})"


def table_md(summary: Mapping[str, Any], step: int | None, keys: Sequence[str] = TABLE_METRICS) -> str:
    """Markdown table at ``step`` (default: the last step every group has), one row per group."""

    step = _common_step(summary, step)
    lines = [f"| group (training seeds) | {' | '.join(keys)} |", "|---" * (len(keys) + 1) + "|"]
    for label, g in summary.items():
        row = next((s for s in g["steps"] if s["step"] == step), None)
        if row is None:
            raise ValueError(f"group {label!r} has no evaluation at step {step}")
        cells = " | ".join(_cell(row["metrics"][k]) for k in keys)
        lines.append(f"| {label} ({', '.join(map(str, g['seeds']))}) | {cells} |")
    return (f"Learning curves at step {step}: mean ± sample std over training seeds (n = runs with a "
            "finite value).\n\n" + "\n".join(lines) + "\n")


def write_png(summary: Mapping[str, Any], path: str, keys: Sequence[str] = PLOT_METRICS) -> None:
    """One panel per metric against the training step, one line per group, band = ± std over seeds."""

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.0), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for j, (label, g) in enumerate(summary.items()):
            pts = [(s["step"], s["metrics"][key]) for s in g["steps"]
                   if s["metrics"][key]["mean"] is not None]
            if not pts:
                continue
            x = np.array([p[0] for p in pts])
            m = np.array([p[1]["mean"] for p in pts])
            sd = np.array([p[1]["std"] for p in pts])
            ax.plot(x, m, marker="o", ms=3, color=f"C{j}", label=f"{label} (n≤{len(g['seeds'])})")
            ax.fill_between(x, m - sd, m + sd, color=f"C{j}", alpha=0.2, linewidth=0)
        ax.set_title(key, fontsize=8)
        ax.set_xlabel("training step", fontsize=7)
        ax.tick_params(labelsize=6)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=5)
    fig.suptitle("learning curves over training seeds (mean ± std; scripts/summarise_curves.py)", fontsize=8,
                 y=1.04)
    _save(fig, path)


def write_outputs(groups: Mapping[str, Sequence[Mapping[str, Any]]], out: str, step: int | None,
                  command: str, reference: str | None = None) -> dict[str, str]:
    """summary.json / summary.md / summary.png in ``out`` (atomically); returns their paths. With
    ``reference``, the differences to that group (``differences``) join the JSON and the table."""

    os.makedirs(out, exist_ok=True)
    summary = summarise(groups)
    step = _common_step(summary, step)
    md = table_md(summary, step)
    diffs = differences(summary, reference, step) if reference else None
    if diffs:
        md += "\n" + differences_md(diffs, reference, step)
    # atomic_write_json sorts keys: group_order keeps the table's row order for readers of the JSON
    record = {"command": command, "groups": summary, "group_order": list(summary), "step": step,
              "reference": reference, "differences": diffs,
              "runs": {label: [{"dir": r["dir"], "seed": r["seed"], "settings": r["settings"]} for r in runs]
                       for label, runs in groups.items()}}
    paths = {"json": os.path.join(out, "summary.json"), "md": os.path.join(out, "summary.md"),
             "png": os.path.join(out, "summary.png")}
    atomic_write_json(record, paths["json"])
    atomic_write_text(md + f"\nProduced by: `{command}`\n", paths["md"])
    write_png(summary, paths["png"])
    return paths


def parse_group(text: str) -> tuple[str, list[str]]:
    """``LABEL=DIR[,DIR...]`` -> (label, dirs); ValueError naming --group and the expected form."""

    label, sep, dirs = text.partition("=")
    runs = [d for d in dirs.split(",") if d]
    if not sep or not label or not runs:
        raise ValueError(f"--group {text!r}: expected LABEL=RUN_DIR[,RUN_DIR...] (learning-curve log folders "
                         "that differ only in the training seed)")
    return label, runs


def groups_in_folder(folder: str) -> dict[str, list[str]]:
    """The runs kept side by side in ``folder``, one sub-folder ``<label>_s<training seed>`` per run (as in
    docs/results/curves): label -> its run folders, labels in name order. ValueError naming the folder or
    the sub-folder that does not follow the pattern."""

    if not os.path.isdir(folder):
        raise ValueError(f"--runs {folder!r} is not a folder")
    groups: dict[str, list[str]] = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not os.path.isdir(path):
            continue
        label, sep, seed = name.rpartition("_s")
        if not (sep and label and seed.isdigit()):
            raise ValueError(f"--runs {folder}: sub-folder {name!r} is not named <label>_s<training seed>")
        groups.setdefault(label, []).append(path)
    if not groups:
        raise ValueError(f"--runs {folder}: no run folders (<label>_s<training seed>) in it")
    return groups


def main(argv: Sequence[str]) -> int:
    """scripts/summarise_curves.py: (--group LABEL=DIR,DIR ... | --runs FOLDER) --out OUT [--step N]."""

    p = ArgumentParser(description="Learning curves over training seeds: summary.json/.md/.png (mean ± std)")
    p.add_argument("--group", action="append", default=[],
                   help="LABEL=RUN_DIR[,RUN_DIR...]: learning-curve runs differing only in the training seed")
    p.add_argument("--runs", default=None,
                   help="a folder of runs named <label>_s<training seed> (e.g. docs/results/curves/32px): "
                        "one group per label, after the --group ones")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--step", type=int, default=None,
                   help="step of the table (default: the last step every group has)")
    p.add_argument("--reference", default=None,
                   help="a group's label: each other group's difference to it, with a 95 %% Welch interval")
    args = p.parse_args(list(argv))
    if not args.group and args.runs is None:
        raise ValueError("give the runs: --group LABEL=RUN_DIR[,RUN_DIR...] (repeatable) or --runs FOLDER")
    named = [parse_group(text) for text in args.group]
    if args.runs is not None:
        named += list(groups_in_folder(args.runs).items())
    groups: dict[str, list[dict[str, Any]]] = {}
    for label, dirs in named:
        if label in groups:
            raise ValueError(f"group {label!r} is given twice (by --group or by a --runs folder)")
        groups[label] = load_group(label, dirs)
    if args.step is not None and args.step < 1:
        raise ValueError(f"--step must be >= 1, got {args.step}")
    command = "python scripts/summarise_curves.py " + shlex.join(list(argv))
    paths = write_outputs(groups, args.out, args.step, command, args.reference)
    with open(paths["md"], encoding="utf-8") as f:
        print(f.read().split("\nProduced by")[0])
    print(f"wrote {paths['json']}, {paths['md']}, {paths['png']}")
    return 0
