"""Metrics of a segmentation: per-slice and pooled (slice_metrics), the accumulating evaluator, the
upstream formulas kept for --legacy_metrics (metrics_legacy), 3-D per-patient metrics and their section
of metrics.json (volume_metrics, volume_outputs). The accumulating ones share one interface
(base.CumulativeMetric: accumulate a SliceBatch, aggregate, reset).

May import: configs, cli, utils.

The layers are checked by ``lint-imports`` (pyproject.toml; docs/architecture.md).
"""
