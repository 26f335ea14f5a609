"""The one interface of the metrics that add up over a split: accumulate batches, aggregate, reset.

Every such metric (the slice evaluator ``evaluator.SegmentationEvaluator``, the upstream running values
``metrics_legacy.LegacyRunningMetrics`` and the per-patient 3-D ``volume_metrics.VolumeMetrics``) is a
``CumulativeMetric``:

    metric.accumulate(batch)   # batch: a SliceBatch; returns what the metric makes of that batch (or None)
    metric.aggregate()         # -> dict of the metric's values over everything accumulated so far
    metric.reset()             # forget every batch (the metric's settings stay)
    len(metric)                # what it holds: slices (the evaluator, the volume metrics) or batches
                               # (the legacy running values, which are per-batch means)

``aggregate()`` on a metric holding nothing raises ValueError: an empty split is a mistake of the caller,
not a result. Each metric reads the fields of the batch it needs and names the missing ones in a
ValueError. The older method names (``add_batch``, ``results``, ``running``) stay as they were.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["CumulativeMetric", "SliceBatch"]


@dataclass(frozen=True)
class SliceBatch:
    """One batch of B evaluated slices (numpy arrays or torch tensors; masks binary, ``> 0.5`` if float).

    Attributes:
        gt: [B,(1,)H,W] ground-truth masks.
        pred_mask_gated: [B,(1,)H,W] predicted masks gated by the predicted image label (empty where the
            slice is predicted healthy).
        pred_mask_all: [B,(1,)H,W] predicted masks of every slice (ungated).
        anomaly_map: [B,(1,)H,W] continuous anomaly maps.
        source: [B,C,H,W] input slices in [-1, 1] (all channels; they define the foreground).
        label: [B] image labels (1 = unhealthy); pred_label: [B] predicted image labels.
        slice_ids: B pairs (patient, slice number), unique over a split.
        extra: per-slice scalars {name: [B]} a metric may copy into its per-slice records.
    """

    gt: Any = None
    pred_mask_gated: Any = None
    pred_mask_all: Any = None
    anomaly_map: Any = None
    source: Any = None
    label: Any = None
    pred_label: Any = None
    slice_ids: Sequence[tuple[Any, Any]] | None = None
    extra: Mapping[str, Any] | None = None

    def require(self, metric: str, *names: str) -> None:
        """ValueError naming ``metric`` and every field of ``names`` the batch does not hold."""
        missing = [n for n in names if getattr(self, n) is None]
        if missing:
            raise ValueError(f"{metric} needs the batch fields {missing}; pass them in the SliceBatch")


class CumulativeMetric(ABC):
    """A metric accumulated batch by batch over a split (see the module docstring)."""

    @abstractmethod
    def accumulate(self, batch: SliceBatch) -> Any:
        """Add one batch; returns the metric's per-batch output (its own documentation says which)."""

    @abstractmethod
    def reset(self) -> None:
        """Forget every accumulated batch; the settings the metric was made with stay."""

    @abstractmethod
    def __len__(self) -> int:
        """How much is accumulated (slices or batches; 0 right after construction or reset)."""

    @abstractmethod
    def _aggregate(self) -> dict[str, Any]:
        """The values over everything accumulated (called only when something is)."""

    def aggregate(self) -> dict[str, Any]:
        """The metric's values over every accumulated batch; ValueError when nothing is accumulated."""
        if len(self) == 0:
            raise ValueError(f"{type(self).__name__}.aggregate(): nothing accumulated (call "
                             "accumulate(batch) first; reset() empties the metric)")
        return self._aggregate()
