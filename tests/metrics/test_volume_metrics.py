"""volume_metrics.py: 3-D Dice / HD95 / ASD / lesion-wise metrics against independent computations."""

from __future__ import annotations

import json

import numpy as np
import pytest

from guided_diffusion.metrics import volume_metrics as vm


def _sphere(shape, centre, radius):
    z, y, x = np.indices(shape)
    return (z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2 <= radius**2


def _surface(mask):
    """Mask voxels with at least one 6-neighbour outside the mask (zero padding): numpy shifts only."""
    pad = np.pad(mask, 1)
    inner = pad[1:-1, 1:-1, 1:-1].copy()
    for ax in range(3):
        for d in (-1, 1):
            inner &= np.roll(pad, d, axis=ax)[1:-1, 1:-1, 1:-1]
    return mask & ~inner


def _directed(a, b, spacing):
    pa = np.argwhere(_surface(a)) * np.asarray(spacing)
    pb = np.argwhere(_surface(b)) * np.asarray(spacing)
    return np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1)).min(1)


def _brute_force(a, b, spacing):
    ab, ba = _directed(a, b, spacing), _directed(b, a, spacing)
    hd95 = max(np.percentile(ab, 95), np.percentile(ba, 95))
    return hd95, max(ab.max(), ba.max()), np.concatenate([ab, ba]).mean()


def test_shifted_sphere_hd95_anisotropic():
    spacing = (3.0, 1.0, 1.5)  # (z, y, x) mm
    shape, r, k = (24, 20, 20), 5, 2
    gt = _sphere(shape, (10, 10, 10), r)
    pred = _sphere(shape, (10 + k, 10, 10), r)  # shifted k voxels along z = 6 mm
    out = vm.surface_metrics(pred, gt, spacing)
    hd95, hd, asd = _brute_force(pred, gt, spacing)
    assert out["hd_mm"] == pytest.approx(k * spacing[0], abs=1e-4)  # the poles move by exactly k slices
    assert out["hd95_mm"] == pytest.approx(hd95, abs=1e-4)
    assert out["asd_mm"] == pytest.approx(asd, abs=1e-4)
    assert 0.5 * k * spacing[0] < out["hd95_mm"] <= k * spacing[0]
    # spacing matters: the same shift along x (1.5 mm) gives HD = 3 mm
    pred_x = _sphere(shape, (10, 10, 10 + k), r)
    assert vm.surface_metrics(pred_x, gt, spacing)["hd_mm"] == pytest.approx(k * spacing[2], abs=1e-4)


def test_identical_volumes_have_zero_distance():
    gt = _sphere((12, 12, 12), (6, 6, 6), 3)
    out = vm.surface_metrics(gt, gt, (2.0, 1.0, 1.0))
    assert out == {"hd95_mm": 0.0, "hd_mm": 0.0, "asd_mm": 0.0}


def test_box_dice_by_hand():
    a = np.zeros((10, 10, 12), bool)
    b = np.zeros_like(a)
    a[2:6, 2:7, 3:9] = True  # 4*5*6 = 120 voxels
    b[4:8, 3:7, 3:9] = True  # 4*4*6 = 96 voxels; overlap [4:6, 3:7, 3:9] = 2*4*6 = 48
    out = vm.overlap_metrics(a, b)
    assert out["dice_3d"] == pytest.approx(2 * 48 / (120 + 96))
    assert out["iou_3d"] == pytest.approx(48 / (120 + 96 - 48))


def test_empty_cases_follow_brats_convention():
    empty = np.zeros((6, 8, 8), bool)
    blob = empty.copy()
    blob[2:4, 2:5, 2:5] = True
    both = vm.patient_metrics(empty, empty, (1, 1, 1))
    assert (both["dice_3d"], both["iou_3d"], both["hd95_mm"], both["asd_mm"]) == (1.0, 1.0, 0.0, 0.0)
    assert (both["lesion_tp"], both["lesion_fp"], both["lesion_fn"]) == (0, 0, 0)
    assert both["lesion_f1"] == 1.0 and both["lesion_dice"] == 1.0
    for pred, gt in ((blob, empty), (empty, blob)):
        one = vm.patient_metrics(pred, gt, (1, 1, 1))
        assert one["dice_3d"] == 0.0 and one["iou_3d"] == 0.0
        assert one["hd95_mm"] == vm.HD_MAX_MM == 373.13 and one["asd_mm"] == vm.HD_MAX_MM
        assert one["lesion_f1"] == 0.0 and one["lesion_dice"] == 0.0
    assert vm.lesion_metrics(blob, empty)["lesion_fp"] == 1
    assert vm.lesion_metrics(empty, blob)["lesion_fn"] == 1


def test_lesion_matching_two_gt_one_detected_one_fp():
    gt = np.zeros((16, 16, 16), bool)
    gt[1:4, 1:4, 1:4] = True  # lesion 1: 27 voxels
    gt[10:13, 10:13, 10:13] = True  # lesion 2: missed
    pred = np.zeros_like(gt)
    pred[2:5, 1:4, 1:4] = True  # overlaps lesion 1 in 2*3*3 = 18 voxels
    pred[1:3, 12:15, 1:3] = True  # touches no GT lesion: FP
    out = vm.lesion_metrics(pred, gt)
    assert (out["lesion_tp"], out["lesion_fp"], out["lesion_fn"]) == (1, 1, 1)
    assert out["lesion_f1"] == pytest.approx(2 * 1 / (2 * 1 + 1 + 1))
    assert out["lesion_dice"] == pytest.approx((2 * 18 / (27 + 27)) / 3)


def test_lesions_use_26_connectivity_and_dilation():
    gt = np.zeros((10, 10, 10), bool)
    gt[2, 2, 2] = gt[3, 3, 3] = True  # corner neighbours: one lesion with 26-connectivity
    pred = np.zeros_like(gt)
    pred[2, 2, 2] = True
    out = vm.lesion_metrics(pred, gt)
    assert (out["lesion_tp"], out["lesion_fp"], out["lesion_fn"]) == (1, 0, 0)
    near = np.zeros_like(gt)
    near[6, 3, 3] = True  # 3 voxels from the GT lesion: FP without dilation, matched with dilation 3
    assert vm.lesion_metrics(near, gt)["lesion_fp"] == 1
    dil = vm.lesion_metrics(near, gt, dilation=3)
    assert (dil["lesion_tp"], dil["lesion_fp"], dil["lesion_fn"]) == (1, 0, 0)
    assert dil["lesion_dice"] == 0.0  # matched, but no voxel overlap
    assert vm.lesion_metrics(pred, gt, min_lesion_voxels=3)["lesion_fp"] == 1  # the 2-voxel lesion is dropped


def test_grid_spacing_from_affine_and_resize():
    aff = np.diag([-1.0, -1.0, 1.0, 1.0])
    assert vm.grid_spacing(aff, (240, 240, 155), (128, 128)) == pytest.approx((1.0, 1.875, 1.875))
    rot = np.eye(4)
    rot[:3, :3] = np.array([[0, 2.0, 0], [2.0, 0, 0], [0, 0, 3.0]])  # permuted axes keep column norms
    assert vm.grid_spacing(rot, (128, 96, 96), (64, 64), slice_step=2) == pytest.approx((6.0, 4.0, 3.0))
    with pytest.raises(ValueError, match="4x4"):
        vm.grid_spacing(np.eye(3), (1, 1, 1), (1, 1))


def test_stack_slices_order_gaps_and_errors():
    s = [(7, np.ones((4, 4)), np.zeros((4, 4))), (3, np.zeros((4, 4)), np.ones((1, 4, 4)))]
    pred, gt, missing = vm.stack_slices(s, slice_step=2)
    assert pred.shape == (3, 4, 4) and missing == 1
    assert gt[0].all() and not gt[1:].any() and pred[2].all() and not pred[:2].any()
    with pytest.raises(ValueError, match="slice_step=2"):
        vm.stack_slices([(3, s[0][1], s[0][2]), (4, s[0][1], s[0][2])], slice_step=2)
    with pytest.raises(ValueError, match="duplicate"):
        vm.stack_slices([s[0], s[0]])


def test_adapter_reads_meta_and_summarises(tmp_path):
    pdir = tmp_path / "npy_test" / "patient_A"
    pdir.mkdir(parents=True)
    meta = {"affine": np.diag([2.0, 2.0, 2.0, 1.0]).tolist(), "shape": [16, 16, 10], "slices": [2, 6],
            "slice_step": 1}
    (pdir / "meta.json").write_text(json.dumps(meta))
    gt_vol = np.zeros((5, 8, 8), bool)
    gt_vol[1:4, 2:6, 2:6] = True
    ids, preds, gts = [], [], []
    for z in range(5):
        ids += [("A", 2 + z), ("B", 2 + z)]
        preds += [gt_vol[z], np.zeros((8, 8))]
        gts += [gt_vol[z].astype(np.float32)[None], gt_vol[z]]
    with pytest.raises(ValueError, match="patient_B"):
        vm.volume_metrics_from_records(ids, preds, gts, str(tmp_path))
    out = vm.volume_metrics_from_records(ids, preds, gts, str(tmp_path), default_spacing=(1, 1, 1))
    rows = {r["patient"]: r for r in out["patients"]}
    assert (rows["A"]["spacing_z_mm"], rows["A"]["spacing_y_mm"]) == (2.0, 4.0)  # 16 px -> 8 px at 2 mm
    assert rows["A"]["dice_3d"] == 1.0 and rows["A"]["hd95_mm"] == 0.0 and rows["A"]["lesion_tp"] == 1
    assert rows["B"]["dice_3d"] == 0.0 and rows["B"]["hd95_mm"] == vm.HD_MAX_MM
    assert rows["B"]["lesion_fn"] == 1
    summ = out["summary"]
    assert summ["n_patients"] == 2 and summ["dice_3d_mean"] == 0.5 and summ["dice_3d_std"] == 0.5
    assert summ["hd95_mm_mean"] == pytest.approx(vm.HD_MAX_MM / 2)
    assert summ["lesion_f1_pooled"] == pytest.approx(2 / (2 + 1))
    assert set(vm.ROW_COLUMNS) <= set(rows["A"])


def test_volume_section_for_the_evaluation_outputs(tmp_path):
    """volume_outputs: spacing from meta.json (a shifted box: HD95 known in mm), 1 mm assumed without it."""
    from guided_diffusion.metrics.volume_outputs import PATIENT_COLUMNS, merge_patient_rows, volume_section

    pdir = tmp_path / "npy_test" / "patient_A"
    pdir.mkdir(parents=True)
    # raw 2 x 3 mm in-plane at 32 px, slices 4 mm apart, stored every 2nd slice resized to 16 px:
    # grid spacing (8, 4, 6) mm
    affine = np.diag([2.0, 3.0, 4.0, 1.0]).tolist()
    (pdir / "meta.json").write_text(json.dumps({"affine": affine, "shape": [32, 32, 20], "slice_step": 2}))
    ids, preds, gts = [], [], []
    for pid in ("A", "B"):
        for n in (10, 12, 14):
            g = np.zeros((16, 16), bool)
            g[4:8, 4:8] = True
            ids.append((pid, n))
            gts.append(g)
            preds.append(np.roll(g, 2, axis=1))  # shifted by 2 columns
    section, rows = volume_section(ids, preds, gts, str(tmp_path), "w=1,t_e_ratio=1")
    assert section["n_patients"] == 2 and section["spacing_assumed_patients"] == ["B"]
    assert section["spacing_source"].startswith("meta.json; assumed 1 mm")
    a, b = rows
    assert (a["spacing_z_mm"], a["spacing_y_mm"], a["spacing_x_mm"]) == (8.0, 4.0, 6.0)
    assert (b["spacing_z_mm"], b["spacing_y_mm"], b["spacing_x_mm"]) == (1.0, 1.0, 1.0)
    # each face of the box moves 2 columns: the largest surface distance is 2 columns = 12 mm for A
    assert a["hd_mm"] == pytest.approx(12.0) and b["hd_mm"] == pytest.approx(2.0)
    assert a["dice_3d"] == b["dice_3d"] == pytest.approx(0.5)  # 2 of 4 columns overlap
    assert a["lesion_tp"] == 1 and a["lesion_fp"] == a["lesion_fn"] == 0
    assert section["dice_3d_mean"] == pytest.approx(0.5) and section["lesion_f1_pooled"] == 1.0
    base = [{"setting": s, "patient": p, "dice": 0.5} for s in ("w=1,t_e_ratio=1", "w=2,t_e_ratio=1")
            for p in ("A", "B")]
    merged = merge_patient_rows(base, rows, "w=1,t_e_ratio=1")
    assert [m["dice_3d"] for m in merged] == [a["dice_3d"], b["dice_3d"], None, None]
    assert all(set(PATIENT_COLUMNS) <= set(m) for m in merged) and merged[0]["dice"] == 0.5
    with pytest.raises(ValueError, match="meta.json"):
        (pdir / "meta.json").write_text("{broken")
        volume_section(ids, preds, gts, str(tmp_path), "w=1,t_e_ratio=1")
