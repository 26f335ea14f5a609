"""Training extras (issue 12): a PNG of the loss curves from progress.csv and an optional TensorBoard writer.

``write_loss_curves_png(progress_csv, out_png)`` plots every loss column (``loss``, ``mse``, ``vb`` and any
column with "loss" in its name; the ``_q0.._q3`` quartile columns are left out) against ``step`` (the row
number when there is no step column), log-scaled when all values are positive, plus ``grad_norm`` in a
second panel when logged. Matplotlib with the Agg backend; the PNG is written atomically.

``ScalarWriter(log_dir)`` writes TensorBoard events with ``torch.utils.tensorboard`` when the
``tensorboard`` package is importable and is a no-op otherwise (``enabled`` says which).
"""

from __future__ import annotations

import csv
import importlib.util
import io
import math
import os
import re
from collections.abc import Mapping
from typing import Any

from guided_diffusion.utils.io_util import atomic_write_bytes

LOSS_NAMES = ("loss", "mse", "vb")
_QUARTILE = re.compile(r"_q[0-3]$")

__all__ = ["read_progress", "loss_columns", "write_loss_curves_png", "ScalarWriter", "tensorboard_available"]


def read_progress(progress_csv: str) -> dict[str, list[float]]:
    """Columns of progress.csv as float lists (empty or non-numeric cells become NaN)."""
    if not os.path.isfile(progress_csv):
        raise FileNotFoundError(f"progress file {progress_csv} is missing (the training logger writes it)")
    with open(progress_csv, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    if not rows or not rows[0]:
        raise ValueError(f"{progress_csv} is empty; expected a header row and one row per log interval")
    header, body = rows[0], rows[1:]
    cols: dict[str, list[float]] = {k: [] for k in header}
    for row in body:
        for i, k in enumerate(header):
            cell = row[i] if i < len(row) else ""
            try:
                cols[k].append(float(cell))
            except ValueError:
                cols[k].append(math.nan)
    return cols


def loss_columns(header: list[str]) -> list[str]:
    """The loss columns of a progress.csv header (see module docstring), in header order."""
    return [k for k in header if (k in LOSS_NAMES or "loss" in k) and not _QUARTILE.search(k)
            and k != "lg_loss_scale"]


def write_loss_curves_png(progress_csv: str, out_png: str, title: str | None = None) -> list[str]:
    """Plot the loss curves of ``progress_csv`` into ``out_png``; returns the columns plotted."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    cols = read_progress(progress_csv)
    names = loss_columns(list(cols))
    if not names:
        raise ValueError(f"{progress_csv} has no loss column (expected one of {LOSS_NAMES} or '*loss*'); "
                         f"columns: {sorted(cols)}")
    n_rows = len(next(iter(cols.values())))
    if n_rows == 0:
        raise ValueError(f"{progress_csv} has a header but no rows yet; log at least one interval first")
    steps = cols.get("step") or [float(i) for i in range(n_rows)]
    panels = 2 if "grad_norm" in cols else 1
    fig, axes = plt.subplots(panels, 1, figsize=(7, 3.2 * panels), squeeze=False)
    ax = axes[0][0]
    positive = True
    for name in names:
        pts = [(s, v) for s, v in zip(steps, cols[name]) if math.isfinite(s) and math.isfinite(v)]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name, linewidth=1.2)
            positive = positive and all(p[1] > 0 for p in pts)
    if positive:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_title(title or os.path.basename(os.path.dirname(os.path.abspath(progress_csv))) or "training")
    if panels == 2:
        gx = axes[1][0]
        pts = [(s, v) for s, v in zip(steps, cols["grad_norm"]) if math.isfinite(s) and math.isfinite(v)]
        gx.plot([p[0] for p in pts], [p[1] for p in pts], color="tab:gray", linewidth=1.0)
        gx.set_xlabel("step")
        gx.set_ylabel("grad_norm")
        gx.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(buf.getvalue(), out_png)
    return names


def tensorboard_available() -> bool:
    """True when the ``tensorboard`` package (needed by torch.utils.tensorboard) is importable."""
    return importlib.util.find_spec("tensorboard") is not None


class ScalarWriter:
    """TensorBoard scalars when tensorboard is installed, else a no-op; ``log_scalars(step, dict)``."""

    def __init__(self, log_dir: str, enabled: bool | None = None):
        want = tensorboard_available() if enabled is None else bool(enabled)
        if want and not tensorboard_available():
            raise ValueError("TensorBoard logging was asked for but the tensorboard package is not "
                             "installed; pip install tensorboard or leave it off")
        self._writer = None
        if want:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=log_dir)

    @property
    def enabled(self) -> bool:
        return self._writer is not None

    def log_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Write every finite numeric value of ``scalars`` at ``step`` (others are skipped)."""
        if self._writer is None:
            return
        for key, value in scalars.items():
            try:
                v = float(value)
            except (TypeError, ValueError):
                continue
            if math.isfinite(v):
                self._writer.add_scalar(key, v, int(step))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None
