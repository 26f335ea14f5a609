"""Tests for guided_diffusion.metrics.slice_metrics: agreement with scikit-learn, CC filter, evaluator,
legacy formulas."""

import math
import pickle

import numpy as np
import pytest
import torch
from skimage.measure import label as sk_label
from sklearn.metrics import (
    average_precision_score,
    f1_score,
    jaccard_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from guided_diffusion.metrics import evaluator as E
from guided_diffusion.metrics import metrics_legacy as L
from guided_diffusion.metrics import slice_metrics as M


def _random_batch(rng, n=12, hw=24, c=2):
    gt = np.zeros((n, hw, hw), bool)
    for i in range(n // 2):  # first half unhealthy with a square lesion
        r, q, s = rng.integers(2, hw - 10), rng.integers(2, hw - 10), rng.integers(4, 9)
        gt[i, r:r + s, q:q + s] = True
    pred_all = rng.random((n, hw, hw)) > 0.85
    for i in range(n):
        r, q = rng.integers(0, hw - 9, size=2)
        pred_all[i, r:r + 8, q:q + 8] = True
    pred_label = rng.integers(0, 2, size=n)
    pred_gated = pred_all & (pred_label[:, None, None] == 1)
    amap = (rng.random((n, hw, hw)) + 0.7 * gt).astype(np.float32)
    source = rng.random((n, c, hw, hw)) * 2 - 1
    source[:, :, :3, :] = -1.0  # background rows
    label = gt.any(axis=(1, 2)).astype(np.int64)
    return dict(pred_mask_gated=pred_gated, pred_mask_all=pred_all, anomaly_map=amap, gt=gt, source=source,
                label=label, pred_label=pred_label)


def _same(a, b):
    """Deep equality treating NaN == NaN."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


# ------------------------------------------------------------------------------------------ basics
def test_dice_iou_match_sklearn_on_nonempty_masks():
    rng = np.random.default_rng(0)
    pred = rng.random((6, 16, 16)) > 0.5
    gt = rng.random((6, 16, 16)) > 0.6
    d = M.dice_per_sample(pred, gt)
    j = M.iou_per_sample(torch.from_numpy(pred)[:, None], torch.from_numpy(gt)[:, None])
    for i in range(6):
        assert d[i] == pytest.approx(f1_score(gt[i].ravel(), pred[i].ravel()), abs=1e-8)
        assert j[i] == pytest.approx(jaccard_score(gt[i].ravel(), pred[i].ravel()), abs=1e-8)


def test_dice_empty_conventions_and_lesion_only():
    gt = np.zeros((3, 8, 8), bool)
    gt[2, 2:4, 2:4] = True
    pred = np.zeros((3, 8, 8), bool)
    pred[1, 0, 0] = True
    pred[2, 2:4, 2:4] = True
    d = M.dice_per_sample(pred, gt)
    assert d[0] == 1.0  # empty / empty
    assert d[1] < 1e-5  # predicted pixel on empty GT
    assert d[2] == pytest.approx(1.0)
    les = M.dice_per_sample(pred, gt, lesion_only=True)
    assert np.isnan(les[0]) and np.isnan(les[1]) and les[2] == pytest.approx(1.0)
    assert np.isnan(M.iou_per_sample(pred, gt, lesion_only=True)[:2]).all()


def test_pixel_precision_recall_match_sklearn():
    rng = np.random.default_rng(1)
    pred = rng.random((4, 16, 16)) > 0.7
    gt = rng.random((4, 16, 16)) > 0.5
    out = M.pixel_precision_recall(pred, gt)
    assert out["precision"] == pytest.approx(precision_score(gt.ravel(), pred.ravel()), abs=1e-12)
    assert out["recall"] == pytest.approx(recall_score(gt.ravel(), pred.ravel()), abs=1e-12)
    assert out["dice"] == pytest.approx(f1_score(gt.ravel(), pred.ravel()), abs=1e-12)
    assert out["precision"] != pytest.approx(out["recall"], abs=1e-3)  # asymmetric example
    empty = M.pixel_precision_recall(np.zeros((1, 4, 4)), np.zeros((1, 4, 4)))
    assert math.isnan(empty["precision"]) and math.isnan(empty["recall"])


def test_pooled_auroc_auprc_match_sklearn_and_single_class_is_nan():
    rng = np.random.default_rng(2)
    b = _random_batch(rng)
    out = M.foreground_auroc_auprc(b["anomaly_map"], b["gt"], b["source"])
    fg = b["source"].mean(axis=1) > -0.95
    s, y = b["anomaly_map"][fg], b["gt"][fg]
    assert out["auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert out["auprc"] == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert out["n_pixels"] == fg.sum() and out["n_positive"] == y.sum()
    single = M.auroc_auprc(rng.random(50), np.zeros(50))
    assert math.isnan(single["auroc"]) and math.isnan(single["auprc"])
    assert math.isnan(M.auroc_auprc(np.zeros(0), np.zeros(0))["auroc"])


def test_image_level_stats_correct_names_vs_legacy_swap():
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    p = np.array([1, 1, 1, 0, 1, 1, 0, 0])  # TP 3, FN 1, FP 2: precision 3/5, recall 3/4
    st = M.image_level_stats(y, p)
    assert st["precision"] == pytest.approx(precision_score(y, p)) == pytest.approx(0.6)
    assert st["recall"] == pytest.approx(recall_score(y, p)) == pytest.approx(0.75)
    assert st["f1"] == pytest.approx(f1_score(y, p))
    assert st["accuracy"] == pytest.approx(5 / 8)
    assert (st["tp"], st["fp"], st["fn"], st["tn"]) == (3, 2, 1, 2)
    legacy = L.legacy_get_stats([torch.tensor(y[:4]), torch.tensor(y[4:])], [torch.tensor(p[:4]),
                                                                            torch.tensor(p[4:])])
    assert legacy["precision"] == pytest.approx(0.75, abs=1e-6)  # upstream "precision" = recall
    assert legacy["recall"] == pytest.approx(0.6, abs=1e-6)  # upstream "recall" = precision
    assert legacy["precision"] != pytest.approx(st["precision"], abs=0.1)
    assert legacy["num_ano_total"] == 4 and legacy["num_ano_curr"] == 0


# ------------------------------------------------------------------------------------------ CC filter
def test_cc_filter_threshold_and_8_connectivity():
    m = np.zeros((3, 48, 48), bool)
    m[0, 2:6, 2:12] = True  # 40 px -> removed
    m[1, 2:6, 2:12] = True
    m[1, 6, 2] = True  # 41 px -> kept
    idx = np.arange(41)
    m[2, idx, idx] = True  # diagonal chain of 41 px: one 8-connected component -> kept
    assert sk_label(m[2], connectivity=1).max() == 41  # 41 separate pieces under 4-connectivity
    out = M.cc_filter(torch.from_numpy(m)[:, None], min_size=40)
    assert out.shape == (3, 48, 48) and out.dtype == bool
    assert not out[0].any()
    assert out[1].sum() == 41 and np.array_equal(out[1], m[1])
    assert out[2].sum() == 41
    assert M.cc_filter(m[2:3], min_size=41).sum() == 0  # and it is exactly 41 px


def test_cc_filter_filled_area_vs_upstream_area():
    ring = np.zeros((1, 16, 16), bool)
    ring[0, 2:9, 2:9] = True
    ring[0, 4:7, 4:7] = False  # area 40, filled area 49
    assert M.cc_filter(ring, 40, fill_holes=True).sum() == 40  # kept (filled area 49 > 40)
    assert M.cc_filter(ring, 40, fill_holes=False).sum() == 0  # removed (area 40)
    # the upstream [1, H, W] / connectivity=3 path behaves like fill_holes=False
    assert L._legacy_cc(ring, 40).sum() == 0


# ------------------------------------------------------------------------------------------ evaluator
def _feed(ev, b, ids, order):
    for chunk in order:
        ev.add_batch(**{k: v[chunk] for k, v in b.items()}, slice_ids=[ids[i] for i in chunk],
                     extra={"t_e": np.asarray(chunk) * 2})


def test_evaluator_matches_direct_computation():
    rng = np.random.default_rng(3)
    b = _random_batch(rng, n=12)
    ids = [(f"p{i % 3}", i) for i in range(12)]
    ev = E.SegmentationEvaluator()
    out = ev.add_batch(**b, slice_ids=ids)
    res = ev.results()
    gated = M.cc_filter(b["pred_mask_gated"])
    allm = M.cc_filter(b["pred_mask_all"])
    assert np.array_equal(out["pred_mask_gated"], gated)
    want = M.dice_per_sample(gated, b["gt"], smooth=0).mean()
    assert res["mixed"]["dice"] == pytest.approx(want, abs=1e-12)
    assert res["mixed"]["dice_lesion"] == pytest.approx(
        np.nanmean(M.dice_per_sample(gated, b["gt"], smooth=0, lesion_only=True)), abs=1e-12)
    pr = M.pixel_precision_recall(gated, b["gt"])
    assert res["mixed"]["precision"] == pytest.approx(pr["precision"])
    assert res["mixed"]["recall"] == pytest.approx(pr["recall"])
    fg = b["source"].mean(axis=1) > -0.95
    assert res["mixed"]["auroc"] == pytest.approx(roc_auc_score(b["gt"][fg], b["anomaly_map"][fg]), abs=1e-12)
    u = b["label"] == 1
    assert res["unhealthy"]["n_slices"] == u.sum()
    assert res["unhealthy"]["dice"] == pytest.approx(M.dice_per_sample(allm[u], b["gt"][u], smooth=0).mean())
    fgu = fg[u]
    assert res["unhealthy"]["auprc"] == pytest.approx(
        average_precision_score(b["gt"][u][fgu], b["anomaly_map"][u][fgu]), abs=1e-12)
    assert res["image"] == M.image_level_stats(b["label"], b["pred_label"])
    # per-patient volume Dice over stacked slices
    for row in ev.patient_records():
        sel = [i for i, (p, _) in enumerate(ids) if p == row["patient"]]
        f1 = f1_score(b["gt"][sel].ravel(), gated[sel].ravel(), zero_division=1.0)
        assert row["dice"] == pytest.approx(f1, abs=1e-6)
    dices = [r["dice"] for r in ev.patient_records()]
    assert res["patient"]["dice_mean"] == pytest.approx(np.mean(dices))
    assert res["patient"]["dice_std"] == pytest.approx(np.std(dices))
    assert res["counts"]["n_patients"] == 3 and len(ev) == 12


def test_evaluator_order_and_sharding_independent():
    rng = np.random.default_rng(4)
    b = _random_batch(rng, n=16)
    ids = [(f"p{i % 4}", 100 + i) for i in range(16)]
    ref = E.SegmentationEvaluator()
    _feed(ref, b, ids, [list(range(0, 5)), list(range(5, 16))])
    perm = rng.permutation(16)
    shuffled = E.SegmentationEvaluator()
    _feed(shuffled, b, ids, [list(perm[:3]), list(perm[3:10]), list(perm[10:])])
    r0, r1 = E.SegmentationEvaluator(), E.SegmentationEvaluator()
    _feed(r0, b, ids, [list(perm[0::2])])
    _feed(r1, b, ids, [list(perm[1::2])])
    states = [pickle.loads(pickle.dumps(r.state_dict())) for r in (r0, r1)]  # as all_gather_object does
    merged = E.SegmentationEvaluator.from_states(states)
    gathered = r1.gather(lambda obj: [r0.state_dict(), obj])
    for other in (shuffled, merged, gathered):
        assert _same(ref.results(), other.results())
        assert _same(ref.slice_records(), other.slice_records())
    assert ref.slice_records()[0]["t_e"] == 0 and ref.slice_records()[3]["t_e"] == 24


def test_evaluator_rejects_bad_input():
    rng = np.random.default_rng(5)
    b = _random_batch(rng, n=4)
    ids = [("a", i) for i in range(4)]
    ev = E.SegmentationEvaluator()
    ev.add_batch(**b, slice_ids=ids)
    with pytest.raises(ValueError, match="already added"):
        ev.add_batch(**b, slice_ids=ids)
    bad = dict(b, anomaly_map=np.full_like(b["anomaly_map"], np.nan))
    with pytest.raises(ValueError, match="anomaly_map"):
        E.SegmentationEvaluator().add_batch(**bad, slice_ids=ids)
    with pytest.raises(ValueError, match="gt"):
        E.SegmentationEvaluator().add_batch(**dict(b, gt=b["gt"][:, :5]), slice_ids=ids)
    with pytest.raises(ValueError, match="settings"):
        E.SegmentationEvaluator(min_cc_size=10).merge(ev)
    other = E.SegmentationEvaluator()
    other.add_batch(**b, slice_ids=ids)
    with pytest.raises(ValueError, match="both"):
        ev.merge(other)


def test_evaluator_single_class_gives_nan_auc():
    rng = np.random.default_rng(6)
    b = _random_batch(rng, n=4)
    b["gt"][:] = False
    b["label"][:] = 0
    ev = E.SegmentationEvaluator(score_dtype="float16")
    ev.add_batch(**b, slice_ids=[("x", i) for i in range(4)])
    res = ev.results()
    assert math.isnan(res["mixed"]["auroc"]) and math.isnan(res["mixed"]["auprc"])
    assert res["unhealthy"]["n_slices"] == 0 and math.isnan(res["unhealthy"]["dice"])
    assert math.isnan(res["mixed"]["dice_lesion"])


# ------------------------------------------------------------------------------------------ legacy
def test_legacy_reproduces_upstream_formulas_with_swap_and_weighting():
    hw = 12
    src = np.zeros((3, 1, hw, hw))
    gt = np.zeros((3, hw, hw), bool)
    gt[0, 0:7, 0:7] = True  # 49 px lesion
    gt[1, 0:7, 0:7] = True
    pred = np.zeros((3, hw, hw), bool)
    pred[0, 0:7, 0:9] = True  # 63 px: TP 49, FP 14
    pred[1, 0:7, 0:6] = True  # 42 px: TP 42, FN 7
    pred[2, 5:12, 5:12] = True  # 49 px on a healthy slice: FP 49
    amap = gt.astype(np.float32) + 0.1 * np.arange(hw * hw).reshape(1, hw, hw) / (hw * hw)
    label = np.array([1, 1, 0])
    m = L.legacy_batch_metrics(gt, pred, src, amap, None, cc_filter=True)
    eps = 1e-6
    d = [(2 * 49 + eps) / (63 + 49 + eps), (2 * 42 + eps) / (42 + 49 + eps), eps / (49 + eps)]
    assert m["dice"] == pytest.approx(np.mean(d), abs=1e-12)
    i = [(49 + eps) / (63 + eps), (42 + eps) / (49 + eps), eps / (49 + eps)]
    assert m["iou"] == pytest.approx(np.mean(i), abs=1e-12)
    tp, fp, fn = 49 + 42, 14 + 49, 7
    assert m["precision"] == pytest.approx(tp / (tp + fn + 1e-6))  # swapped: really recall
    assert m["recall"] == pytest.approx(tp / (tp + fp + 1e-6))  # swapped: really precision
    assert m["AUC"] == pytest.approx(1.0) and m["AUPRC"] == pytest.approx(1.0)
    ano = L.legacy_batch_metrics(gt, pred, src, amap, label)
    assert ano["n"] == 2 and ano["dice"] == pytest.approx(np.mean(d[:2]), abs=1e-12)

    # running values over two batches: mixed = plain mean, unhealthy = weighted by n_ano per batch
    run = L.LegacyRunningMetrics()
    r1 = run.add_batch(gt, pred, pred, src, amap, label, np.array([1, 1, 1]))
    gt2, pred2 = gt[:1], np.zeros_like(gt[:1])  # one unhealthy slice, nothing predicted after CC
    pred2[0, 0, 0:5] = True  # 5 px component -> removed by the CC filter
    r2 = run.add_batch(gt2, pred2, pred2, src[:1], amap[:1], np.array([1]), np.array([0]))
    b2_dice = eps / (49 + eps)
    assert r2["batch"]["dice"] == pytest.approx(b2_dice)
    running = run.running()
    assert running["dice"] == pytest.approx((r1["batch"]["dice"] + b2_dice) / 2)
    assert running["dice_ano"] == pytest.approx((np.mean(d[:2]) * 2 + b2_dice * 1) / 3)
    assert running["dice_ano"] != pytest.approx((np.mean(d[:2]) + b2_dice) / 2, abs=1e-3)
    assert running["num_ano"] == 3
    # cls stats cumulative over 4 slices: y=[1,1,0,1], p=[1,1,1,0]: TP 2, FP 1, FN 1
    assert running["cls_acc"] == pytest.approx(0.5)
    assert running["cls_recall"] == pytest.approx(2 / 3, abs=1e-6)
    assert running["cls_precision"] == pytest.approx(2 / 3, abs=1e-6)


def test_legacy_names_differ_from_correct_names_on_asymmetric_example():
    gt = np.zeros((1, 16, 16), bool)
    gt[0, 0:10, 0:10] = True  # 100 px
    pred = np.zeros((1, 16, 16), bool)
    pred[0, 0:10, 0:5] = True  # 50 px, all inside: precision 1, recall 0.5
    src = np.zeros((1, 1, 16, 16))
    amap = gt.astype(np.float32)
    correct = M.pixel_precision_recall(pred, gt)
    legacy = L.legacy_batch_metrics(gt, pred, src, amap)
    assert correct["precision"] == pytest.approx(1.0) and correct["recall"] == pytest.approx(0.5)
    assert legacy["precision"] == pytest.approx(0.5, abs=1e-6)
    assert legacy["recall"] == pytest.approx(1.0, abs=1e-6)
    # the evaluator uses the correct names
    ev = E.SegmentationEvaluator()
    ev.add_batch(pred_mask_gated=pred, pred_mask_all=pred, anomaly_map=amap, gt=gt, source=src,
                 label=[1], pred_label=[1], slice_ids=[("p", 0)])
    assert ev.results()["mixed"]["precision"] == pytest.approx(1.0)
    assert ev.results()["mixed"]["recall"] == pytest.approx(0.5)


def test_missed_lesion_reports_dice_zero():
    """Issue 8 §7: a missed lesion's per-slice Dice/IoU is exactly 0 (no smoothing term), a healthy slice
    without prediction is 1; the smoothed upstream value stays available (legacy functions)."""
    gt = np.zeros((2, 16, 16), bool)
    gt[0, 4:9, 4:9] = True  # slice 0: a lesion, predicted nothing; slice 1: healthy, predicted nothing
    pred = np.zeros_like(gt)
    ev = E.SegmentationEvaluator(cc_filter=False)
    out = ev.add_batch(pred_mask_gated=pred, pred_mask_all=pred, anomaly_map=np.zeros(gt.shape, np.float32),
                       gt=gt, source=np.ones((2, 1, 16, 16), np.float32), label=[1, 0], pred_label=[0, 0],
                       slice_ids=[("P0", 0), ("P0", 1)])
    rec = {r["slice"]: r for r in out["records"]}
    assert rec[0]["dice"] == 0.0 and rec[0]["iou"] == 0.0 and rec[0]["dice_all"] == 0.0
    assert rec[1]["dice"] == 1.0 and rec[1]["iou"] == 1.0
    assert ev.patient_records()[0]["dice"] == 0.0
    assert M.dice_per_sample(pred, gt)[0] == pytest.approx(1e-6 / 25)  # the smoothed (legacy) value
