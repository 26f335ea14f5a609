"""AnoFPDMPipeline (guided_diffusion/anofpdm/pipeline.py): the runtime's per-batch step as one object.

* the evaluation calls the pipeline once per test batch, and the records it saves are the pipeline's;
* the pipeline called on its own reproduces those records bit for bit, and so does the per-batch code the
  runtime ran before the pipeline existed (copied below as the reference);
* bad input (a calibration without one of the w, indices that do not match the batch) is refused.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_eval import make_run, run_argv

from guided_diffusion.anofpdm import translation
from guided_diffusion.anofpdm.forward import run_forward_process
from guided_diffusion.anofpdm.pipeline import AnoFPDMPipeline, PipelineOutput, setting_key, slice_generators
from guided_diffusion.anofpdm.segmentation import segment
from guided_diffusion.anofpdm.translation_flags import parse_run
from guided_diffusion.anofpdm.translation_runtime import load_model
from guided_diffusion.configs.calibration import Calibration, load_calibrations
from guided_diffusion.configs.eval_configs import ForwardConfig, SegmentConfig
from guided_diffusion.data.brats import get_eval_loader


def _reference_records(run, model, diffusion, cals, x, idx):
    """translation.process_batch as it was before the pipeline (commit d3733c9), on the CPU."""
    seg_cfg = run.segment
    fr = run_forward_process(model, diffusion, x, ws=list(run.forward.w),
                             generator=slice_generators(run.eval.seed, "test", idx),
                             subset_interval=seg_cfg.subset_interval,
                             keep_sam_stack=any(r != 1 for r in seg_cfg.t_e_ratio), progress=False,
                             sam_mode=seg_cfg.sam_mode, legacy_gradient_schedule=seg_cfg.legacy_segmentation,
                             **run.forward.settings_kwargs())
    steps_run = int(fr.steps_run if fr.steps_run is not None else run.forward.forward_steps)
    records = [{"idx": int(i), "steps_run": steps_run, "out": {}, "mse_h": fr.mse_h[b].cpu().numpy(),
                "mse_null": fr.mse_null[b].cpu().numpy(), "div": fr.div[b].cpu().numpy()}
               for b, i in enumerate(idx)]
    for w in run.forward.w:
        cal = cals[float(w)]
        for ratio in seg_cfg.t_e_ratio:
            seg = segment(fr, w=w, thr_01=cal.thr_01, diff_max=cal.diff_max, t_e_ratio=ratio,
                          median_filter=seg_cfg.median_filter, last_only=seg_cfg.last_only,
                          subset_interval=seg_cfg.subset_interval, legacy=seg_cfg.legacy_segmentation,
                          sam_mode=seg_cfg.sam_mode)
            for b, rec in enumerate(records):
                rec["out"][setting_key(w, ratio)] = {
                    "mask": seg.mask[b, 0].numpy().astype(bool),
                    "mask_all": seg.mask_all[b, 0].numpy().astype(bool),
                    "map": seg.anomaly_map[b, 0].numpy().astype(np.float32),
                    "pred_lab": int(seg.pred_lab[b]),
                    "cos": float(seg.cos[b]),
                    "end_steps": seg.end_steps[b].numpy(),
                    "threshold": float(seg.threshold[b]),
                    "quantile": seg.quantile[b].numpy(),
                }
    return records


def _assert_same(a, b, where="record"):
    """Bit-for-bit equality of nested records: same keys, types, dtypes, shapes and values."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape, where
        assert a.tobytes() == b.tobytes(), where
    else:
        assert type(a) is type(b) and a == b, where


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny evaluation (2 w, 2 t_e ratios, 7 test slices in batches of 3) with every pipeline output
    the runtime produced, in call order."""
    root = tmp_path_factory.mktemp("pipeline")
    data, mdir = make_run(root)
    argv = run_argv(data, mdir, root / "out")
    seen: list[PipelineOutput] = []
    real_call = AnoFPDMPipeline.__call__

    def spy(self, x, idx):
        out = real_call(self, x, idx)
        seen.append(out)
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(AnoFPDMPipeline, "__call__", spy)
        translation.main(argv)
    saved = {}
    for path in sorted((root / "out" / "results").glob("slices_*.pt")):
        saved.update({r["idx"]: r for r in torch.load(path, weights_only=False)})
    run = parse_run(argv)
    return run, root / "out", seen, saved


def test_the_runtime_runs_the_pipeline_once_per_test_batch(tiny_run):
    run, _out, seen, saved = tiny_run
    assert [o.idx for o in seen] == [[0, 1, 2], [3, 4, 5], [6]]
    keys = [setting_key(w, r) for w in run.forward.w for r in run.segment.t_e_ratio]
    assert keys == ["w=1,t_e_ratio=1", "w=1,t_e_ratio=2", "w=3,t_e_ratio=1", "w=3,t_e_ratio=2"]
    for out in seen:
        assert list(out.settings) == keys
        for rec in out.records():
            _assert_same(rec, saved[rec["idx"]], f"slice {rec['idx']}")
        for seg in out.settings.values():
            b = len(out.idx)
            assert seg.anomaly_map.shape == seg.mask.shape == seg.mask_all.shape == (b, 1, 16, 16)
            assert seg.end_steps.shape == (b, 2) and seg.pred_lab.shape == (b,)
            # the gated mask is the ungated one where the slice is predicted unhealthy, empty elsewhere
            assert torch.equal(seg.mask, seg.mask_all * seg.pred_lab[:, None, None, None].float())


def test_the_pipeline_alone_reproduces_the_run_and_the_former_per_batch_code(tiny_run):
    run, out, _seen, saved = tiny_run
    cals = load_calibrations(str(out / "calibration.json"))
    model, diffusion, _path, _sha = load_model(run.model, run.diffusion, run.checkpoint)
    pipe = AnoFPDMPipeline.from_run(run, model, diffusion, cals, progress=False)
    assert pipe.keys == list(saved[0]["out"])
    loader, _ = get_eval_loader(run.eval.data_dir, "test", run.eval.batch_size, num_slices=None,
                                in_channels=run.model.in_channels, image_size=run.model.image_size,
                                world_size=1, rank=0)
    n = 0
    for x, _gt, _lab, idx in loader:
        ids = [int(i) for i in idx]
        got = pipe(x, ids).records()
        want = _reference_records(run, model, diffusion, cals, x, ids)
        for g, w in zip(got, want):
            _assert_same(g, w, f"slice {g['idx']} (reference)")
            _assert_same(g, saved[g["idx"]], f"slice {g['idx']} (run)")
        n += len(ids)
    assert n == len(saved) == 7


def _cal_stub(w: float):
    return Calibration(
        thr_01=0.99, n_min=1, accuracy=1.0, q=0.9, diff_min=[0.1, 0.1], diff_max=[1.0, 1.0], n_val=2,
        n_healthy=1, n_unhealthy=1, w=w, forward_steps=3, modality=[0, 1])


def test_a_calibration_without_one_of_the_w_is_refused():
    fwd = ForwardConfig(w=(1.0, 3.0), forward_steps=3, modality=(0, 1))
    with pytest.raises(ValueError, match=r"no calibration for w=\[3\.0\].*hold w=\[1\.0\]"):
        AnoFPDMPipeline(torch.nn.Linear(1, 1), None, {1.0: _cal_stub(1.0)}, fwd, SegmentConfig(), seed=0)


def test_indices_that_do_not_match_the_batch_are_refused():
    fwd = ForwardConfig(w=(1.0,), forward_steps=3, modality=(0, 1))
    pipe = AnoFPDMPipeline(torch.nn.Linear(1, 1), None, {1.0: _cal_stub(1.0)}, fwd, SegmentConfig(), seed=0)
    assert pipe.device == torch.device("cpu")  # the model's device when none is given
    with pytest.raises(ValueError, match="2 dataset indices for a batch of 3"):
        pipe(torch.zeros(3, 2, 16, 16), [0, 1])
