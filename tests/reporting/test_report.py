"""Tests for guided_diffusion.reporting.report: every writer produces readable files atomically."""

import csv
import json
import math
import os

import matplotlib.image as mpimg
import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import REPO

from guided_diffusion.metrics.evaluator import SegmentationEvaluator
from guided_diffusion.reporting import report as R


def _no_temp_files(d):
    leftovers = [f for _, _, files in os.walk(d) for f in files if f.startswith(".") or ".tmp" in f]
    assert leftovers == []


def test_write_metrics_json_round_trip(tmp_path):
    metrics = {"mixed": {"dice": np.float64(0.5), "auroc": float("nan"), "n": np.int64(3)},
               "list": np.arange(3), "t": torch.tensor([1.5]), "name": "x"}
    path = R.write_metrics_json(str(tmp_path / "sub" / "metrics.json"), metrics)
    with open(path) as f:
        text = f.read()
    assert "NaN" not in text  # strict JSON
    back = json.loads(text)
    assert back == {"mixed": {"dice": 0.5, "auroc": None, "n": 3}, "list": [0, 1, 2], "t": [1.5], "name": "x"}
    with pytest.raises(ValueError, match="metrics JSON"):
        R.write_metrics_json(str(tmp_path / "bad.json"), {"a": object()})
    assert not (tmp_path / "bad.json").exists()
    _no_temp_files(tmp_path)


def test_write_csv_round_trip(tmp_path):
    rows = [{"patient": "p1", "slice": 3, "dice": 0.25}, {"patient": "p2", "slice": 4, "extra": None,
                                                          "dice": float("nan")}]
    path = R.write_csv(str(tmp_path / "slices.csv"), rows)
    with open(path, newline="") as f:
        back = list(csv.DictReader(f))
    assert list(back[0].keys()) == ["patient", "slice", "dice", "extra"]
    assert back[0]["dice"] == "0.25" and back[1]["extra"] == "" and math.isnan(float(back[1]["dice"]))
    _no_temp_files(tmp_path)


def _evaluated(rng, hw=32):
    n = 4
    gt = np.zeros((n, hw, hw), bool)
    gt[:2, 8:18, 8:18] = True
    pred = np.zeros_like(gt)
    pred[:3, 10:20, 10:20] = True
    amap = (rng.random((n, hw, hw)) + gt).astype(np.float32)
    src = rng.random((n, 4, hw, hw)) * 2 - 1
    ev = SegmentationEvaluator()
    out = ev.add_batch(pred_mask_gated=pred, pred_mask_all=pred, anomaly_map=amap, gt=gt, source=src,
                       label=gt.any((1, 2)), pred_label=pred.any((1, 2)),
                       slice_ids=[("BraTS/01", 10 + i) for i in range(n)])
    return ev, out, gt, pred, amap, src


def test_save_panels_and_index(tmp_path):
    rng = np.random.default_rng(0)
    ev, out, gt, pred, amap, src = _evaluated(rng)
    items = [dict(source=torch.from_numpy(src[i]), gt=gt[i], anomaly_map=amap[i][None], pred_mask=pred[i],
                  **{k: r[k] for k in ("patient", "slice", "label", "pred_label", "dice")})
             for i, r in enumerate(out["records"][:3])]
    paths = R.save_panels(str(tmp_path / "panels"), items, ["FLAIR", "T1", "T1ce", "T2"], modalities=[0, 3],
                          metrics=ev.results())
    assert len(paths) == 4 and paths[-1].endswith("index.html")
    for p in paths[:3]:
        img = mpimg.imread(p)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 4 * img.shape[0]  # 6 columns
        assert img.std() > 0.01  # something was drawn
    with open(paths[-1]) as f:
        page = f.read()
    for p in paths[:3]:
        assert os.path.basename(p) in page
    assert "mixed.dice" in page and "unhealthy.auprc" in page and "Headline" in page
    assert "BraTS_01" in os.path.basename(paths[0])  # sanitised file name
    with pytest.raises(ValueError, match="modalities"):
        R.save_panels(str(tmp_path / "bad"), items[:1], ["FLAIR"], modalities=[7])
    with pytest.raises(ValueError, match="pred_mask"):
        R.save_panels(str(tmp_path / "bad"), [{"source": src[0], "gt": gt[0], "anomaly_map": amap[0]}], ["a"])
    _no_temp_files(tmp_path)


def test_resampled_affine_maps_voxel_centres():
    aff = np.diag([1.0, 1.0, 1.0, 1.0])
    aff[:3, 3] = [-120, -120, -70]
    new = R.resampled_affine(aff, (240, 240, 155), (128, 128))
    s = 240 / 128
    assert np.allclose(np.abs(np.diag(new))[:3], [s, s, 1.0])
    # new voxel 0 centre = original continuous index 0.5*s - 0.5 ; last voxel = 239.5 - 0.5*s
    assert np.allclose(new @ [0, 0, 5, 1], aff @ [0.5 * s - 0.5, 0.5 * s - 0.5, 5, 1])
    assert np.allclose(new @ [127, 127, 0, 1], aff @ [239.5 - 0.5 * s, 239.5 - 0.5 * s, 0, 1])
    with pytest.raises(ValueError, match="4x4"):
        R.resampled_affine(np.eye(3), (240, 240, 155), (128, 128))


def test_save_nifti_volumes_with_and_without_meta(tmp_path):
    rng = np.random.default_rng(1)
    amap = rng.random((3, 16, 16)).astype(np.float32)
    mask = amap > 0.5
    aff = np.array([[-1.0, 0, 0, 90], [0, -1.0, 0, 126], [0, 0, 1.0, -72], [0, 0, 0, 1]])
    meta = {"affine": aff.tolist(), "shape": [32, 48, 20], "slices": [2, 17], "modalities": ["flair"]}
    meta_path = tmp_path / "meta.json"
    meta_path.write_text(json.dumps(meta))
    out = R.save_nifti_volumes(str(tmp_path / "nii"), "p/1", [4, 7, 9], amap, mask[:, None],
                               meta=str(meta_path), gt=mask)
    assert set(out) == {"anomaly_map", "pred_mask", "gt"}
    img = nib.load(out["anomaly_map"])
    assert img.shape == (16, 16, 20)
    assert np.allclose(img.affine, R.resampled_affine(aff, (32, 48, 20), (16, 16)))
    assert np.allclose(np.abs(np.diag(img.affine))[:3], [2.0, 3.0, 1.0])
    data = np.asarray(img.dataobj)
    assert np.allclose(data[:, :, 7], amap[1]) and np.all(data[:, :, 0] == 0)
    m = np.asarray(nib.load(out["pred_mask"]).dataobj)
    assert m.dtype == np.uint8 and np.array_equal(m[:, :, 9] == 1, mask[2])
    # no meta -> identity affine, depth = max slice + 1
    out2 = R.save_nifti_volumes(str(tmp_path / "nii2"), "p2", [0, 5], amap[:2], mask[:2],
                                meta=str(tmp_path / "missing.json"))
    img2 = nib.load(out2["pred_mask"])
    assert img2.shape == (16, 16, 6) and np.allclose(img2.affine, np.eye(4))
    with pytest.raises(ValueError, match="slice"):
        R.save_nifti_volumes(str(tmp_path / "x"), "p", [1, 1, 2], amap, mask)
    _no_temp_files(tmp_path)


def test_save_arrays(tmp_path):
    path = R.save_arrays(str(tmp_path / "data_1"), source=np.ones((2, 3)),
                         mask=torch.zeros(2, dtype=torch.bool))
    assert path.endswith("data_1.npz")
    with np.load(path) as z:
        assert set(z.files) == {"source", "mask"}
        assert np.array_equal(z["source"], np.ones((2, 3))) and z["mask"].dtype == bool
    with pytest.raises(ValueError, match="no arrays"):
        R.save_arrays(str(tmp_path / "empty.npz"))
    _no_temp_files(tmp_path)


def test_empty_predicted_mask_panel_says_why(tmp_path):
    """"label 1 | pred 1" next to an empty mask: the title names the size filter / the threshold."""
    side = 16
    src = np.full((1, 2, side, side), 0.5, np.float32)
    gt = np.zeros((1, side, side), bool)
    gt[0, 4:9, 4:9] = True
    raw = np.zeros((1, side, side), bool)
    raw[0, 5:7, 5:7] = True  # a 4 px component: removed by a 10 px size filter
    ev = SegmentationEvaluator(min_cc_size=10)
    res = ev.add_batch(pred_mask_gated=raw, pred_mask_all=raw, anomaly_map=raw.astype(np.float32), gt=gt,
                       source=src, label=[1], pred_label=[1], slice_ids=[("P1", 3)])
    filtered = res["pred_mask_gated"][0]
    assert not filtered.any()
    item = dict(source=src[0], gt=gt[0], anomaly_map=raw[0].astype(np.float32), pred_mask=filtered,
                pred_mask_raw=raw[0], min_cc_size=10, label=1, pred_label=1, patient="P1", slice=3)
    title = R.panel_title(item)
    assert title.startswith("patient P1 | slice 3 | label 1 | pred 1")
    assert "every component removed by the size filter (components <= 10 px are dropped)" in title
    below = {**item, "pred_mask_raw": np.zeros((side, side), bool)}
    assert "no pixel of the anomaly map reached the threshold" in R.panel_title(below)
    assert R.empty_mask_reason({**item, "pred_label": 0}) is None  # predicted healthy: "pred 0" says it
    assert R.empty_mask_reason({**item, "pred_mask": raw[0]}) is None  # mask not empty
    paths = R.save_panels(str(tmp_path / "panels"), [item, below], ["FLAIR", "T2"])
    assert len(paths) == 3 and all(os.path.getsize(p) > 0 for p in paths)
    html_text = open(paths[-1]).read()  # index.html captions each panel with its title and reason
    assert "every component removed by the size filter (components &lt;= 10 px are dropped)" in html_text
    assert "no pixel of the anomaly map reached the threshold" in html_text


def test_parameter_count_has_one_definition():
    """The same model's count is printed identically everywhere (M = 10**6; not 0.57 M here, 0.54 M there)."""
    import ast

    from guided_diffusion.configs.base import DiffusionConfig, ModelConfig
    from guided_diffusion.nn import count_parameters, format_param_count
    from guided_diffusion.script_util import create_from_configs
    from guided_diffusion.training.run import hae_v2_summary

    assert format_param_count(571_234) == "571,234 parameters (0.57 M)"
    m = ModelConfig(unet_ver="hae_v2", num_channels=32, image_size=32, attention_resolutions="16",
                    in_channels=4, num_classes=2)
    d = DiffusionConfig()
    with torch.device("meta"):
        model, _ = create_from_configs(m, d)
    assert format_param_count(count_parameters(model)) in hae_v2_summary(m, d)
    # no training code formats a parameter count on its own (e.g. / 1024 ** 2 next to / 1e6)
    path = REPO / "guided_diffusion" / "training" / "run.py"
    tree = ast.parse(path.read_text())
    calls = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and hasattr(n.func, "id")}
    assert "format_param_count" in calls
    text = path.read_text()
    assert "1024 ** 2" not in text and "/ 1e6" not in text
