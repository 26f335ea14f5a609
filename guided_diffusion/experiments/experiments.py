"""Resumable experiment rows, trained-once models, aggregation over seeds and table writers.

A *row* is one (name, evaluation seed) cell of a results table: a callable that gets its own work folder
and returns a flat-ish dict of metrics (JSON-able). ``run_rows`` stores each finished row atomically as
``OUT/rows/<name>_seed<k>.json`` together with its *fingerprint*: the sha256 of the canonical JSON of every
setting that changes the row (``Row.settings``, which must include the checkpoint sha256 of a trained
model; ``checkpoint_settings`` adds it). A rerun:

* skips a finished row whose stored fingerprint equals the new one;
* finds a stored row with another fingerprint -> ``on_mismatch="refuse"`` raises ValueError with one line
  naming the differing settings, ``"recompute"`` recomputes it (the old file is replaced, never mixed);
* runs an unfinished (killed) row again in the same work folder ``OUT/work/<name>_seed<k>-<fp12>``, so
  a row function that resumes from its own partial outputs (translation_FPDM.py --resume True does)
  continues; a work folder belongs to one fingerprint, so partial outputs of other settings are never
  reused.

Aggregation: mean and **population** standard deviation (numpy ddof=0) over the evaluation seeds of each
name (``aggregate``), or over training seeds, each the mean over its evaluation seeds
(``aggregate_over_training_seeds``). Tables (``write_tables``): table.md / table.csv / table.json, written
atomically, each stating the settings, checkpoint sha256s and the command that produced it (no git
information is needed).

Models: ``train_once`` runs a training command into a folder keyed by the training settings' fingerprint
and skips it when the final checkpoint exists (train.py resumes itself with ``--resume auto``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from guided_diffusion.data.fingerprint import data_fingerprint, explain
from guided_diffusion.experiments.result_tables import (  # noqa: F401  (re-exported: ex.write_tables, ...)
    STD_NOTE,
    TRAIN_STD_NOTE,
    Column,
    _num,
    _plain,
    aggregate,
    aggregate_over_training_seeds,
    fmt_cell,
    get_path,
    mean_std,
    write_tables,
)
from guided_diffusion.metrics.volume_outputs import VOLUME_METRICS
from guided_diffusion.utils.io_util import atomic_write_json, file_sha256

ROW_VERSION = 1
# ---------------------------------------------------------------------------------------------- fingerprints
def canonical_json(obj: Any) -> str:
    """JSON with sorted keys, no whitespace, tuples as lists, floats as repr: the fingerprint's input."""
    return json.dumps(_plain(obj), sort_keys=True, separators=(",", ":"), allow_nan=True)


def fingerprint(settings: Mapping[str, Any]) -> str:
    """sha256 hex of the canonical JSON of ``settings``."""
    return hashlib.sha256(canonical_json(settings).encode("utf-8")).hexdigest()


def checkpoint_settings(settings: Mapping[str, Any], checkpoint: str) -> dict[str, Any]:
    """``settings`` plus ``checkpoint_sha256`` of the file ``checkpoint`` (FileNotFoundError if missing)."""
    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist; train the model first")
    return {**settings, "checkpoint_sha256": file_sha256(checkpoint)}


def diff_settings(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Names of the settings that differ between two settings dicts (dotted for nested dicts), sorted."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += [f"{key}.{k}" for k in diff_settings(a, b)]
        elif canonical_json(a) != canonical_json(b):
            out.append(str(key))
    return out


def flat_settings(obj: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested settings dict as {dotted key: leaf value}."""
    out: dict[str, Any] = {}
    for k, v in obj.items():
        if isinstance(v, Mapping):
            out.update(flat_settings(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def described_differences(stored: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """``"key: stored X, now Y"`` for every dotted setting that differs between two nested settings dicts."""
    a, b = flat_settings(stored), flat_settings(now)
    return [f"{k}: stored {a.get(k)!r}, now {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k)]


def data_change(old: Mapping[str, Any], new: Mapping[str, Any]) -> str | None:
    """One line naming what changed in the data when two settings dicts (each with ``data_dir`` and
    ``data_sha256``, the content fingerprint of guided_diffusion/data/fingerprint.py) differ in
    ``data_sha256``; None when it is the same or absent from either."""
    a, b = old.get("data_sha256"), new.get("data_sha256")
    if a is None or b is None or a == b or not new.get("data_dir"):
        return None

    try:
        now = data_fingerprint(str(new["data_dir"]))
    except (OSError, ValueError):
        return f"the data in {new['data_dir']} changed (fingerprint {str(a)[:8]} -> {str(b)[:8]})"
    return explain(str(new["data_dir"]), str(a), now)


# ---------------------------------------------------------------------------------------------- rows
@dataclass
class Row:
    """One table cell: ``fn(work_dir) -> metrics`` for (name, seed) under ``settings``."""

    name: str
    seed: int
    settings: Mapping[str, Any]
    fn: Callable[[str], Mapping[str, Any]]
    meta: Mapping[str, Any] = field(default_factory=dict)  # stored beside the result, not fingerprinted

    @property
    def key(self) -> str:
        return f"{self.name}_seed{self.seed}"

    @property
    def fingerprint(self) -> str:
        return fingerprint({"name": self.name, "seed": self.seed, "settings": self.settings})


def row_path(out: str, name: str, seed: int) -> str:
    """Where the finished row (name, seed) is stored."""
    return os.path.join(out, "rows", f"{name}_seed{seed}.json")


def _check_name(name: str) -> None:
    if not name or any(c in name for c in "/\\ \t\n") or name.startswith("."):
        raise ValueError(f"row name {name!r} must be a non-empty file-name part without '/', spaces or a "
                         "leading dot")


def load_row(out: str, name: str, seed: int) -> dict[str, Any] | None:
    """The stored record of (name, seed) or None (ValueError naming the file when it is unreadable)."""
    path = row_path(out, name, seed)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            rec = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"row file {path} is not valid JSON ({err}); delete it to recompute the "
                         "row") from err
    if not isinstance(rec, dict) or "fingerprint" not in rec or "metrics" not in rec:
        raise ValueError(f"row file {path} lacks 'fingerprint'/'metrics'; delete it to recompute the row")
    return rec


def run_rows(
    rows: Sequence[Row],
    out: str,
    on_mismatch: str = "refuse",
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Run every row not finished under the same fingerprint; returns the records in ``rows`` order.

    A record is {"name", "seed", "fingerprint", "settings", "metrics", "meta", "seconds", "version"}.
    ``on_mismatch``: "refuse" (ValueError naming the differing settings) or "recompute".
    """
    if on_mismatch not in ("refuse", "recompute"):
        raise ValueError(f"on_mismatch must be 'refuse' or 'recompute', got {on_mismatch!r}")
    seen: set[str] = set()
    for row in rows:
        _check_name(row.name)
        if row.key in seen:
            raise ValueError(f"row {row.key} is listed twice")
        seen.add(row.key)
    # refuse before any work is done, so a mismatch never leaves a half-updated table
    stored = {row.key: load_row(out, row.name, row.seed) for row in rows}
    if on_mismatch == "refuse":
        for row in rows:
            rec = stored[row.key]
            if rec is not None and rec["fingerprint"] != row.fingerprint:
                names = diff_settings(rec.get("settings", {}), dict(row.settings)) or ["(unknown)"]
                change = data_change(rec.get("settings", {}), row.settings)
                if change is not None:
                    raise ValueError(f"row {row.key} in {row_path(out, row.name, row.seed)} was computed on "
                                     f"other data: {change}; rerun with --recompute or another --out")
                raise ValueError(
                    f"row {row.key} in {row_path(out, row.name, row.seed)} was computed under other settings "
                    f"(differing: {', '.join(names)}); rerun with --recompute or another --out"
                )
    records = []
    for row in rows:
        rec = stored[row.key]
        if rec is not None and rec["fingerprint"] == row.fingerprint:
            log(f"[rows] {row.key}: finished under the same settings, skipped")
            records.append(rec)
            continue
        if rec is not None:
            change = data_change(rec.get("settings", {}), row.settings)
            log(f"[rows] {row.key}: " + (f"the data changed ({change}), recomputing" if change else
                                         "stored under other settings, recomputing"))
        work = os.path.join(out, "work", f"{row.key}-{row.fingerprint[:12]}")
        os.makedirs(work, exist_ok=True)
        log(f"[rows] {row.key}: running (work dir {work})")
        t0 = time.time()
        metrics = dict(row.fn(work))
        rec = {
            "version": ROW_VERSION,
            "name": row.name,
            "seed": int(row.seed),
            "fingerprint": row.fingerprint,
            "settings": _plain(row.settings),
            "metrics": _plain(metrics),
            "meta": _plain(row.meta),
            "seconds": round(time.time() - t0, 3),
        }
        atomic_write_json(rec, row_path(out, row.name, row.seed))
        records.append(rec)
    return records


def refuse_rows_on_other_data(out: str, data_dir: str, data_sha256: str) -> None:
    """Before any training: ValueError naming what changed when a stored row of ``out`` was computed on
    other data than ``data_dir`` holds now (its ``data_sha256`` setting differs); rows without the setting
    are left to ``run_rows``."""
    folder = os.path.join(out, "rows")
    if not os.path.isdir(folder):
        return
    new = {"data_dir": data_dir, "data_sha256": data_sha256}
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".json"):
            continue
        try:
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                old = json.load(f).get("settings", {})
        except (OSError, ValueError, AttributeError):
            continue  # run_rows names an unreadable row file
        change = data_change(old if isinstance(old, dict) else {}, new)
        if change is not None:
            raise ValueError(f"row {name[:-5]} in {os.path.join(folder, name)} was computed on other data: "
                             f"{change}; rerun with --recompute or another --out")


# ---------------------------------------------------------------------------------------------- run options
def check_run_options(cfg: Mapping[str, Any], options: Mapping[str, Any]) -> None:
    """ValueError naming the flag for a value that the train / evaluation commands would refuse only after
    the models are trained: ``--w``, ``--num_slices``, ``--eval_seeds``, ``--train_seed``, ``--threads``,
    and ``--out`` being a file."""
    w = [float(v) for v in cfg["w"]]
    bad = [v for v in w if not math.isfinite(v) or v < 0]
    if bad or len(set(w)) != len(w):
        raise ValueError(f"--w must be distinct finite numbers >= 0, got {w}")
    if cfg.get("num_slices") is not None and cfg["num_slices"] < 1:
        raise ValueError(f"--num_slices must be >= 1, got {cfg['num_slices']}")
    if any(s < 0 for s in cfg["eval_seeds"]):
        raise ValueError(f"--eval_seeds must be >= 0, got {list(cfg['eval_seeds'])}")
    for flag in ("train_seed", "threads"):
        if (options.get(flag) or 0) < 0:
            raise ValueError(f"--{flag} must be >= 0, got {options[flag]}")
    out = options.get("out")
    if out and os.path.exists(out) and not os.path.isdir(out):
        raise NotADirectoryError(f"--out {out} is a file; expected a folder")


# ---------------------------------------------------------------------------------------------- processes
def run_command(cmd: Sequence[str], cwd: str, env: Mapping[str, str] | None = None,
                log: Callable[[str], None] = print) -> None:
    """Run one entry point; a non-zero exit becomes RuntimeError naming the command and its last stderr."""
    log("$ " + shlex.join(cmd))
    proc = subprocess.run(list(cmd), cwd=cwd, env=dict(env or os.environ), stderr=subprocess.PIPE,
                          text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or "").strip().splitlines()[-1:] or ["(no stderr)"]
        raise RuntimeError(f"{os.path.basename(cmd[1]) if len(cmd) > 1 else cmd[0]} exited with "
                           f"{proc.returncode}: {tail[0]}")
    if proc.stderr:
        sys.stderr.write(proc.stderr[-2000:])


def final_checkpoint(log_dir: str, step: int, ema_rate: str | None) -> str:
    """Path of the last checkpoint of a run of ``step`` steps (EMA file when ``ema_rate`` is given)."""
    name = f"model{step:06d}.pt" if ema_rate is None else f"ema_{ema_rate}_{step:06d}.pt"
    return os.path.join(log_dir, name)


def train_once(
    name: str,
    train_cmd: Callable[[str], list[str]],
    settings: Mapping[str, Any],
    models_dir: str,
    max_steps: int,
    ema_rate: str | None,
    cwd: str,
    env: Mapping[str, str] | None = None,
    log: Callable[[str], None] = print,
) -> tuple[str, str]:
    """Train (name, settings) once -> (log dir, final checkpoint path).

    The log dir is ``models_dir/<name>-<fp12>`` (fp = fingerprint of ``settings``), so other settings never
    resume this model; ``train_cmd(log_dir)`` builds the command (it must pass ``--resume auto``). Skipped
    when the final checkpoint exists; otherwise the command runs (and continues a killed run itself).
    """
    _check_name(name)
    fp = fingerprint({"name": name, "settings": settings})
    log_dir = os.path.join(models_dir, f"{name}-{fp[:12]}")
    ckpt = final_checkpoint(log_dir, max_steps, ema_rate)
    if os.path.isfile(ckpt):
        log(f"[train] {name}: {ckpt} exists, reused")
        return log_dir, ckpt
    for other in _models_on_other_data(models_dir, name, settings):
        log(f"[train] {name}: the model in {other[0]} was trained on other data ({other[1]}); training a "
            "new one")
    os.makedirs(log_dir, exist_ok=True)
    atomic_write_json({"name": name, "fingerprint": fp, "settings": _plain(settings)},
                      os.path.join(log_dir, "train_settings.json"))
    t0 = time.time()
    run_command(train_cmd(log_dir), cwd=cwd, env=env, log=log)
    if not os.path.isfile(ckpt):
        raise RuntimeError(f"training {name} finished without writing {ckpt}")
    atomic_write_json({"seconds": round(time.time() - t0, 2)}, os.path.join(log_dir, "train_time.json"))
    return log_dir, ckpt


def _models_on_other_data(models_dir: str, name: str, settings: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(log dir, what changed) of the models ``name-*`` in ``models_dir`` trained with the same settings
    except the data fingerprint (so that a retraining after a data change says why)."""
    out: list[tuple[str, str]] = []
    if not os.path.isdir(models_dir) or "data_sha256" not in settings:
        return out
    for entry in sorted(os.listdir(models_dir)):
        path = os.path.join(models_dir, entry, "train_settings.json")
        if not entry.startswith(f"{name}-") or not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                old = json.load(f).get("settings", {})
        except (OSError, ValueError, AttributeError):
            continue
        if diff_settings(old, _plain(settings)) == ["data_sha256"]:
            change = data_change(old, settings)
            if change:
                out.append((os.path.join(models_dir, entry), change))
    return out


# ---------------------------------------------------------------------------------------------- AnoFPDM
TABLE_METRICS = tuple(f"{s}.{m}" for s in ("mixed", "unhealthy") for m in ("dice", "iou", "auprc"))
# per-patient 3-D means of metrics.json "volume" (None for an evaluation made before they existed)

def read_anofpdm_metrics(eval_dir: str) -> dict[str, Any]:
    """The metrics a table needs from a translation_FPDM.py log dir (its metrics.json).

    Returns {"mixed": {dice, iou, auprc}, "unhealthy": {...}, "image": {...}, "primary_setting",
    "chosen_w", "seconds_per_slice", "peak_memory_bytes", "per_w": {w: {"accuracy", "unhealthy_dice",
    "mixed_dice"}}, "volume": {VOLUME_METRICS}}; seconds per slice over the slices computed in this log dir
    (None if none were new); volume values None when metrics.json has no "volume" section.
    """
    path = os.path.join(eval_dir, "metrics.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: the evaluation did not finish")
    with open(path, encoding="utf-8") as f:
        m = json.load(f)
    timing = m.get("run", {}).get("timing", {})
    ranks = timing.get("per_rank", [])
    n_new = sum(int(t.get("new_slices", 0)) for t in ranks)
    secs = sum(float(t.get("seconds", 0.0)) for t in ranks)  # process-seconds (all ranks together)
    sel = m.get("guidance_selection") or {}
    acc = {float(r["w"]): r["accuracy"] for r in sel.get("table", [])}
    if not acc:
        acc = {float(w): c.get("accuracy") for w, c in m.get("calibration", {}).items()}
    per_w = {}
    for key, res in m.get("settings_results", {}).items():
        parts = dict(p.split("=") for p in key.split(","))
        if float(parts.get("t_e_ratio", 1)) != 1.0:
            continue
        w = float(parts["w"])
        per_w[f"{w:g}"] = {"accuracy": acc.get(w), "unhealthy_dice": res["unhealthy"].get("dice"),
                           "mixed_dice": res["mixed"].get("dice")}
    pick = ("dice", "iou", "auprc", "dice_lesion")
    volume = m.get("volume") or {}
    return {
        "mixed": {k: m["mixed"].get(k) for k in pick},
        "unhealthy": {k: m["unhealthy"].get(k) for k in pick},
        "image": {k: m.get("image", {}).get(k) for k in ("accuracy",)},
        "primary_setting": m.get("primary_setting"),
        "chosen_w": sel.get("chosen_w"),
        "seconds_per_slice": (secs / n_new) if n_new else None,
        "peak_memory_bytes": max((t.get("peak_memory_bytes") or 0 for t in ranks), default=None),
        "per_w": per_w,
        "volume": {k: volume.get(k) for k in VOLUME_METRICS},
    }
