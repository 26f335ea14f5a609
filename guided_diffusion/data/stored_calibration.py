"""Whether a stored calibration file may be used by an evaluation run.

A file of earlier statistics (an export's ``calibration.json``, a resumed run's own, or ``--calibration
FILE``) is used only when it holds every w of the run and was made under every statistics-changing setting
and the checkpoint of the run. A file the run did not choose itself must also come from the run's own
validation pass: the same ``--num_slices_val`` and ``--seed`` (``extra``) and the same validation split's
content fingerprint (``extra.data_sha256``; older files without it are not checked). See docs/edges.md.
"""

from __future__ import annotations

from collections.abc import Iterable

from guided_diffusion.configs.calibration import Calibration, load_calibrations
from guided_diffusion.configs.eval_configs import EvalConfig, EvalRun
from guided_diffusion.data.fingerprint import data_fingerprint, explain

__all__ = ["check_calibration_data", "check_validation_pass", "checked_calibrations",
           "validation_pass_record"]

DATA_KEY = "data_sha256"


def validation_pass_record(num_slices_val: int | None, seed: int, data_sha256: str | None = None) -> dict:
    """The ``extra`` a calibration stores about the validation pass it came from (``--num_slices_val``,
    ``--seed``, and the split's fingerprint when given), read back by :func:`check_validation_pass` and
    :func:`check_calibration_data`."""
    record = {"num_slices_val": num_slices_val, "seed": seed}
    return record if data_sha256 is None else {**record, DATA_KEY: data_sha256}


def checked_calibrations(path: str, run: EvalRun, sha: str, *, hint: str, same_pass: bool,
                         source: str | None = None, pass_hint: str | None = None,
                         data_hint: str | None = None) -> dict[float, Calibration]:
    """The calibrations in ``path`` for each w of ``run`` ({w: Calibration}, the run's order), checked
    against the run and the checkpoint ``sha``; with ``same_pass`` also against its validation pass and
    data. ValueError naming what differs (``source``, default "calibration PATH") and ending with how to
    fix it: ``hint``, or ``pass_hint`` / ``data_hint`` when the validation pass / data differ."""
    source = source or f"calibration {path}"
    stored = load_calibrations(path)
    missing = [w for w in run.forward.w if float(w) not in stored]
    if missing:
        raise ValueError(f"{source} has no entry for w={missing} (it holds w={sorted(stored)}); {hint}")
    expect = {**run.stats_settings(), "checkpoint_sha256": sha}
    cals = {float(w): stored[float(w)] for w in run.forward.w}
    for w, cal in cals.items():
        cal.check_matches({**expect, "w": w}, source=source, hint=hint)
    if same_pass:
        check_validation_pass(cals.values(), run.eval, source, pass_hint or hint)
        check_calibration_data(cals.values(), run.eval.data_dir, source, data_hint or hint)
    return cals


def check_validation_pass(cals: Iterable[Calibration], ev: EvalConfig, source: str, hint: str) -> None:
    """ValueError when one of ``cals`` came from another validation pass than ``ev``'s: another
    ``--num_slices_val`` or ``--seed`` (as recorded in its ``extra``)."""
    ours = validation_pass_record(ev.num_slices_val, ev.seed)
    diffs = sorted({f"{k}: {source} has {cal.extra[k]!r}, this run uses {v!r}" for cal in cals
                    for k, v in ours.items() if k in cal.extra and cal.extra[k] != v})
    if diffs:
        raise ValueError(f"{source} was made from another validation pass ({'; '.join(diffs)}); {hint}")


def check_calibration_data(cals: Iterable[Calibration], data_dir: str, source: str, hint: str) -> None:
    """ValueError naming what changed when one of ``cals`` (its ``extra["data_sha256"]``) was calibrated
    on another validation split than ``data_dir``'s now. The fingerprint is computed once, and only when a
    calibration holds the record (older files are not checked)."""
    now = None
    for cal in cals:
        old = cal.extra.get(DATA_KEY) if isinstance(cal.extra, dict) else None
        if not old:
            continue
        now = now or data_fingerprint(data_dir, ("val",))
        if now.digest != old:
            raise ValueError(f"{source} was made on other validation data: "
                             f"{explain(data_dir, str(old), now)}; {hint}")
