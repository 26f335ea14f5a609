"""The one metric interface (guided_diffusion/metrics/base.py): SegmentationEvaluator, LegacyRunningMetrics
and VolumeMetrics accumulate SliceBatches, aggregate them and reset.

For the slice and volume metrics, two batches aggregated equal the same slices added at once. The legacy
running values are per-batch means by design (upstream's logging_metrics): their image-level part is
cumulative, their pixel part the mean of the per-batch values, which is what is checked for them.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from guided_diffusion.metrics.base import CumulativeMetric, SliceBatch
from guided_diffusion.metrics.evaluator import SegmentationEvaluator
from guided_diffusion.metrics.metrics_legacy import LegacyRunningMetrics, legacy_batch_metrics
from guided_diffusion.metrics.volume_metrics import VolumeMetrics, volume_metrics_from_records
from guided_diffusion.metrics.volume_outputs import volume_section

HW = 16


def _slices(seed: int = 0, n: int = 8) -> dict:
    """n slices of two patients (slices 10, 11, ... each), half with a square lesion, noisy predictions."""
    rng = np.random.default_rng(seed)
    gt = np.zeros((n, HW, HW), bool)
    for i in range(0, n, 2):
        r, q = rng.integers(2, HW - 7, size=2)
        gt[i, r:r + 5, q:q + 5] = True
    pred_all = rng.random((n, HW, HW)) > 0.9
    for i in range(n):
        r, q = rng.integers(0, HW - 6, size=2)
        pred_all[i, r:r + 5, q:q + 5] = True
    pred_label = rng.integers(0, 2, size=n)
    source = rng.random((n, 2, HW, HW)) * 2 - 1
    source[:, :, :2] = -1.0
    return dict(gt=gt, pred_mask_gated=pred_all & (pred_label[:, None, None] == 1), pred_mask_all=pred_all,
                anomaly_map=(rng.random((n, HW, HW)) + 0.5 * gt).astype(np.float32), source=source,
                label=gt.any(axis=(1, 2)).astype(np.int64), pred_label=pred_label,
                slice_ids=[(f"P{i % 2}", 10 + i // 2) for i in range(n)])


def _batch(fields: dict, sl: slice = slice(None)) -> SliceBatch:
    return SliceBatch(**{k: v[sl] for k, v in fields.items()})


def _same(a, b) -> bool:
    """Deep equality with NaN == NaN."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


METRICS = {
    "evaluator": lambda: SegmentationEvaluator(min_cc_size=3),
    "legacy": lambda: LegacyRunningMetrics(cc_thr=3),
    "volume": lambda: VolumeMetrics(None, default_spacing=(2.0, 1.0, 1.0)),
}


@pytest.mark.parametrize("name", list(METRICS))
def test_every_metric_is_a_cumulative_metric_that_resets_and_refuses_an_empty_aggregate(name):
    metric, fields = METRICS[name](), _slices()
    assert isinstance(metric, CumulativeMetric) and len(metric) == 0
    with pytest.raises(ValueError, match="nothing accumulated"):
        metric.aggregate()
    metric.accumulate(_batch(fields))
    assert len(metric) == (1 if name == "legacy" else 8)  # the legacy values count batches
    first = metric.aggregate()
    metric.reset()
    assert len(metric) == 0
    with pytest.raises(ValueError, match="nothing accumulated"):
        metric.aggregate()
    metric.accumulate(_batch(fields))  # the same slices again: accepted after the reset
    assert _same(metric.aggregate(), first)


@pytest.mark.parametrize("name", ["evaluator", "volume"])
def test_two_batches_aggregate_as_the_same_slices_at_once(name):
    fields = _slices(1)
    whole, parts = METRICS[name](), METRICS[name]()
    whole.accumulate(_batch(fields))
    parts.accumulate(_batch(fields, slice(5, None)))  # any order, any split
    parts.accumulate(_batch(fields, slice(0, 5)))
    got, want = parts.aggregate(), whole.aggregate()
    assert _same(got, want)
    counts = want["counts"]["n_slices"] if name == "evaluator" else want["summary"]["n_patients"]
    assert counts == (8 if name == "evaluator" else 2)


def test_evaluator_accumulate_and_aggregate_are_add_batch_and_results():
    fields = _slices(2)
    a, b = SegmentationEvaluator(min_cc_size=3), SegmentationEvaluator(min_cc_size=3)
    out = a.accumulate(_batch(fields))
    ref = b.add_batch(**fields)
    assert np.array_equal(out["pred_mask_gated"], ref["pred_mask_gated"])
    assert _same(a.aggregate(), b.results())
    assert a.aggregate()["counts"]["n_slices"] == 8


def test_legacy_two_batches_keep_upstreams_per_batch_means():
    fields = _slices(3)
    halves = (slice(0, 3), slice(3, None))
    parts, whole = LegacyRunningMetrics(cc_thr=3), LegacyRunningMetrics(cc_thr=3)
    for s in halves:
        parts.accumulate(_batch(fields, s))
    whole.accumulate(_batch(fields))
    got, once = parts.aggregate(), whole.aggregate()
    # image level: cumulative over the batches, as if added at once
    for k in ("cls_acc", "cls_recall", "cls_precision", "num_ano"):
        assert got[k] == once[k]
    # pixel level: the unweighted mean of the per-batch values (not the value of the whole set)
    per_batch = [legacy_batch_metrics(fields["gt"][s], fields["pred_mask_gated"][s], fields["source"][s],
                                      fields["anomaly_map"][s], None, True, 3) for s in halves]
    for k in ("dice", "AUC"):
        assert got[k] == pytest.approx(np.mean([m[k] for m in per_batch]), abs=0, rel=1e-15)
    assert got["AUC"] != once["AUC"]  # so the split matters, as it does for upstream's running values
    assert got["n_batches"] == 2 and once["n_batches"] == 1
    assert _same(got, parts.running())


def test_volume_metrics_equal_the_function_and_refuse_bad_batches():
    fields = _slices(4)
    metric = VolumeMetrics(None, default_spacing=(2.0, 1.0, 1.0))
    metric.accumulate(_batch({**fields, "gt": torch.from_numpy(fields["gt"])}))  # tensors are read too
    want = volume_metrics_from_records(fields["slice_ids"], list(fields["pred_mask_gated"]),
                                       list(fields["gt"]), None, default_spacing=(2.0, 1.0, 1.0))
    assert _same(metric.aggregate(), want)
    assert metric.patients() == ["P0", "P1"]
    with pytest.raises(ValueError, match="added twice"):
        metric.accumulate(_batch(fields, slice(0, 1)))
    with pytest.raises(ValueError, match=r"needs the batch fields \['gt'\]"):
        metric.accumulate(SliceBatch(slice_ids=[("P9", 1)], pred_mask_gated=fields["gt"][:1]))
    ungated = VolumeMetrics(None, default_spacing=(2.0, 1.0, 1.0), mask="pred_mask_all")
    ungated.accumulate(_batch(fields))
    n_pred = sum(r["n_pred_voxels"] for r in ungated.aggregate()["patients"])
    assert n_pred == int(fields["pred_mask_all"].sum()) > int(fields["pred_mask_gated"].sum())


def test_volume_section_of_no_slices_keeps_its_empty_summary(tmp_path):
    section, rows = volume_section([], [], [], str(tmp_path), "w=1,t_e_ratio=1")
    assert rows == [] and section["n_patients"] == 0 and math.isnan(section["dice_3d_mean"])
