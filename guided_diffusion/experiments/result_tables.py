"""The result tables of the experiments (Table 1, the denoiser comparison): statistics over seeds, the
columns, and table.md / .csv / .json written atomically."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from guided_diffusion.utils.io_util import atomic_write_json, atomic_write_text

STD_NOTE = "mean ± population std (ddof=0) over evaluation seeds"
TRAIN_STD_NOTE = ("mean ± population std (ddof=0) over training seeds, each training seed's value being the "
                  "mean over its evaluation seeds")


# ---------------------------------------------------------------------------------------------- fingerprints
def _plain(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (bool, int, float, str)) or obj is None:
        return obj
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"setting of type {type(obj).__name__} cannot enter a fingerprint: {obj!r}")


def get_path(metrics: Mapping[str, Any], dotted: str) -> float:
    """``metrics["a"]["b"]`` for "a.b" as a float (NaN when absent or None)."""
    cur: Any = metrics
    for part in dotted.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            return math.nan
        cur = cur[part]
    return math.nan if cur is None else float(cur)


def mean_std(values: Iterable[float]) -> dict[str, float]:
    """{"mean", "std" (population, ddof=0), "n"} of the finite values (NaN mean/std when there are none)."""
    arr = np.array([v for v in values if v is not None and math.isfinite(v)], np.float64)
    if arr.size == 0:
        return {"mean": math.nan, "std": math.nan, "n": 0}
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=0)), "n": int(arr.size)}


def aggregate(records: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> dict[str, dict[str, Any]]:
    """{name: {column: mean_std over the seeds, "seeds": [...]}} in first-appearance order of the names."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for rec in records:
        groups.setdefault(rec["name"], []).append(rec)
    out: dict[str, dict[str, Any]] = {}
    for name, recs in groups.items():
        out[name] = {c: mean_std(get_path(r["metrics"], c) for r in recs) for c in columns}
        out[name]["seeds"] = sorted(int(r["seed"]) for r in recs)
    return out


def aggregate_over_training_seeds(
    records: Sequence[Mapping[str, Any]],
    columns: Sequence[str],
    row_of: Callable[[Mapping[str, Any]], str],
    train_seed_of: Callable[[Mapping[str, Any]], int],
) -> dict[str, dict[str, Any]]:
    """Two-level aggregation: per (row, training seed) the mean over its evaluation seeds, then per row
    the mean and population std (``mean_std``) of those means over the training seeds.

    Args:
        records: run_rows records; each record is one (row, training seed, evaluation seed ``rec["seed"]``).
        columns: dotted metric keys (``get_path``).
        row_of, train_seed_of: a record's table row and training seed.

    Returns {row: {column: mean_std over training seeds, "seeds": [training seeds], "eval_seeds":
    {training seed: [evaluation seeds]}, "per_train_seed": {training seed: {column: mean over its
    evaluation seeds (NaN when none is finite)}}}} in first-appearance order of the rows (training seeds
    as strings in the nested dicts, so that the result is JSON as it is).
    """
    groups: dict[str, dict[int, list[Mapping[str, Any]]]] = {}
    for rec in records:
        groups.setdefault(row_of(rec), {}).setdefault(int(train_seed_of(rec)), []).append(rec)
    out: dict[str, dict[str, Any]] = {}
    for row, by_seed in groups.items():
        seeds = sorted(by_seed)
        per_seed = {str(ts): {c: mean_std(get_path(r["metrics"], c) for r in by_seed[ts])["mean"]
                              for c in columns} for ts in seeds}
        out[row] = {c: mean_std(per_seed[str(ts)][c] for ts in seeds) for c in columns}
        out[row]["seeds"] = seeds
        out[row]["eval_seeds"] = {str(ts): sorted(int(r["seed"]) for r in by_seed[ts]) for ts in seeds}
        out[row]["per_train_seed"] = per_seed
    return out


def fmt_cell(stat: Mapping[str, float], scale: float = 1.0, digits: int = 1, std: bool = True) -> str:
    """"mean ± std" (scaled, e.g. 100 for %) or "–" when undefined."""
    if stat.get("n", 0) == 0 or not math.isfinite(stat["mean"]):
        return "–"
    text = f"{stat['mean'] * scale:.{digits}f}"
    return f"{text} ± {stat['std'] * scale:.{digits}f}" if std else text


@dataclass
class Column:
    """A table column: ``key`` into a row's metrics (dotted), header, scale/digits, ± std shown or not."""

    key: str
    header: str
    scale: float = 1.0
    digits: int = 1
    std: bool = True


def write_tables(
    out_dir: str,
    title: str,
    columns: Sequence[Column],
    aggregated: Mapping[str, Mapping[str, Any]],
    provenance: Mapping[str, Any],
    basename: str = "table",
    notes: Sequence[str] = (),
    std_note: str = STD_NOTE,
) -> dict[str, str]:
    """Write ``basename``.md / .csv / .json atomically; returns {"md", "csv", "json"} paths.

    ``provenance``: what produced the table (command, settings, checkpoint sha256 per row, ...); the
    Markdown and CSV carry a one-line summary of it, the JSON all of it. ``std_note``: what a cell's
    "mean ± std" is taken over (``aggregated[row]["seeds"]`` are those seeds).
    """
    head = ["row", *[c.header for c in columns]]
    lines = [f"# {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, agg in aggregated.items():
        cells = [fmt_cell(agg[c.key], c.scale, c.digits, c.std) for c in columns]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    lines += ["", f"Values: {std_note}; seeds per row: "
              + ", ".join(f"{n} {list(a['seeds'])}" for n, a in aggregated.items()) + "."]
    lines += [f"{n}" for n in notes]
    lines += ["", "Produced by: `" + str(provenance.get("command", "?")) + "`", "",
              "```json", json.dumps(_plain(provenance), indent=1, sort_keys=True), "```", ""]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([f"# {title}; {std_note}; produced by: {provenance.get('command', '?')}"])
    writer.writerow(["row", "seeds", *[f"{c.key}_{s}" for c in columns for s in ("mean", "std", "n")]])
    for name, agg in aggregated.items():
        writer.writerow([name, " ".join(map(str, agg["seeds"])),
                         *[_num(agg[c.key][s]) for c in columns for s in ("mean", "std", "n")]])
    paths = {ext: os.path.join(out_dir, f"{basename}.{ext}") for ext in ("md", "csv", "json")}
    atomic_write_text("\n".join(lines), paths["md"])
    atomic_write_text(buf.getvalue(), paths["csv"])
    atomic_write_json({"title": title, "std": std_note, "columns": [vars(c) for c in columns],
                       "rows": _plain(aggregated), "provenance": _plain(provenance)}, paths["json"])
    return paths


def _num(v: Any) -> str:
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ""
    return str(v)
