"""The calibration record: the AnoFPDM hyper-parameters chosen on the validation split for one guidance
strength w (thr_01, n_min, q, diff_min/diff_max, ...) with the settings they were computed under, and its
JSON file (``--calibration FILE``; several w in one file). Every number is checked when read. Computing a
calibration is ``anofpdm.calibration``'s job."""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

from guided_diffusion.utils.io_util import atomic_write_text

_WARNED_UNVERIFIED: set[str] = set()


@dataclass
class Calibration:
    """Validation hyper-parameters for one guidance strength w (see module docstring)."""

    thr_01: float
    n_min: int
    accuracy: float
    q: float
    diff_min: list[float]
    diff_max: list[float]
    n_val: int
    n_healthy: int
    n_unhealthy: int
    w: float
    forward_steps: int
    modality: list[int]
    encoding: str = "ddim"
    ugp: str = "null"
    legacy_indexing: bool = False
    clip_denoised: bool = True
    dynamic_clip: bool = False
    checkpoint_sha256: str = ""
    extra: dict = field(default_factory=dict)
    # every setting that changes the statistics (model, diffusion, forward; see EvalRun.stats_settings)
    settings: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = "calibration JSON") -> Calibration:
        """Parse and check one calibration (every number finite and in range); errors name ``source``."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{source} is not JSON ({err}); recreate it by calibrating") from None
        if not isinstance(data, dict):
            raise ValueError(f"{source} must hold a JSON object, got {type(data).__name__}")
        missing = [k for k in ("thr_01", "diff_max", "w", "forward_steps", "modality") if k not in data]
        if missing:
            raise ValueError(
                f"{source} lacks the keys {missing}; recreate it by running without --calibration"
            )
        _check_values(data, source)
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, path: str) -> None:
        atomic_write_text(self.to_json(), path)

    @classmethod
    def load(cls, path: str) -> Calibration:
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"calibration file {path} (--calibration) does not exist; omit the flag to "
                "calibrate on the validation split"
            )
        with open(path, encoding="utf-8") as f:
            return cls.from_json(f.read(), source=f"calibration file {path}")

    def check_matches(self, expected: Mapping, source: str = "calibration", hint: str = "") -> None:
        """ValueError listing every setting of ``expected`` that differs from this calibration's.

        The keys are those of ``expected`` (built from the run's configs). A key an older file does not
        hold cannot be verified: one warning names it. ``hint`` says how to fix a mismatch.
        """
        diffs, unknown = [], []
        for key, theirs in expected.items():
            if key in self.settings:
                mine = self.settings[key]
            elif key in self.__dataclass_fields__ and key not in ("settings", "extra"):
                mine = getattr(self, key)
            else:
                unknown.append(key)
                continue
            if not _same(key, mine, theirs):
                diffs.append(f"{key}: {source} has {mine!r}, this run uses {theirs!r}")
        if diffs:
            raise ValueError(f"{source} does not match this run ({'; '.join(diffs)}); "
                             f"{hint or 'run with the calibration settings'}")
        new = [k for k in unknown if k not in _WARNED_UNVERIFIED]
        if new:
            _WARNED_UNVERIFIED.update(new)
            warnings.warn(f"{source} predates the settings {new}; they cannot be verified", stacklevel=2)


def _same(key: str, mine, theirs) -> bool:
    if key == "w":
        return math.isclose(float(mine), float(theirs), rel_tol=0, abs_tol=1e-12)
    if isinstance(mine, (list, tuple)) or isinstance(theirs, (list, tuple)):
        return list(mine if isinstance(mine, (list, tuple)) else [mine]) == list(
            theirs if isinstance(theirs, (list, tuple)) else [theirs])
    return mine == theirs


def _finite(source: str, key: str, value, low: float | None = None, high: float | None = None,
            integer: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (not integer or float(value).is_integer())
    ok = ok and (low is None or value >= low) and (high is None or value <= high)
    if not ok:
        rng = f" in [{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
        kind = "an integer" if integer else "a finite number"
        raise ValueError(f"{source}: `{key}` must be {kind}{rng}; got {value!r}")


def _check_values(data: Mapping, source: str) -> None:
    """Every number of a calibration entry finite and in range (thr_01 is a cosine, diff_* >= 0, ...)."""
    _finite(source, "thr_01", data["thr_01"], -1.0, 1.0)
    _finite(source, "w", data["w"], 0.0)
    _finite(source, "forward_steps", data["forward_steps"], 1, integer=True)
    for key in ("diff_max", "diff_min", "modality"):
        if key not in data:
            continue
        values = data[key]
        if not isinstance(values, list) or not values:
            raise ValueError(f"{source}: `{key}` must be a non-empty list of numbers; got {values!r}")
        for i, v in enumerate(values):
            _finite(source, f"{key}[{i}]", v, 0.0, integer=key == "modality")
    if len(data["diff_max"]) != len(data["modality"]):
        raise ValueError(f"{source}: `diff_max` has {len(data['diff_max'])} entries for "
                         f"{len(data['modality'])} modalities")
    for key, (low, high, integer) in {"accuracy": (0.0, 1.0, False), "q": (0.0, 1.0, False),
                                      "n_min": (0, None, True), "n_val": (1, None, True),
                                      "n_healthy": (0, None, True), "n_unhealthy": (0, None, True)}.items():
        if key in data:
            _finite(source, key, data[key], low, high, integer)
    for key in ("settings", "extra"):
        if key in data and not isinstance(data[key], dict):
            raise ValueError(f"{source}: `{key}` must be a JSON object; got {data[key]!r}")


def save_calibrations(path: str, calibrations: Mapping[float, Calibration]) -> None:
    """Write one or several calibrations (one per w) to a JSON file atomically."""

    items = [asdict(c) for _, c in sorted(calibrations.items(), key=lambda kv: float(kv[0]))]
    atomic_write_text(json.dumps({"calibrations": items}, indent=2, sort_keys=True) + "\n", path)


def load_calibrations(path: str) -> dict[float, Calibration]:
    """Read a file written by save_calibrations (or a single Calibration JSON) -> {w: Calibration}."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"calibration file {path} (--calibration) does not exist; omit the flag to "
            "calibrate on the validation split"
        )
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"calibration file {path} is not JSON ({err}); recreate it by calibrating") from None
    items = data["calibrations"] if isinstance(data, dict) and "calibrations" in data else [data]
    if not isinstance(items, list) or not items:
        raise ValueError(f"calibration file {path}: `calibrations` must be a non-empty list")
    cals = [Calibration.from_json(json.dumps(item), source=f"calibration file {path}") for item in items]
    return {float(c.w): c for c in cals}
