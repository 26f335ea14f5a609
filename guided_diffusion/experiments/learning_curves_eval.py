"""Measurements of one checkpoint for the learning curves
(``guided_diffusion.experiments.learning_curves``, whose
docstring defines every number): denoising loss, conditioning strength and the AnoFPDM evaluation on the
first N validation and test slices, with the evaluation pipeline's own functions."""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from guided_diffusion.anofpdm.calibration import calibrate, choose_primary_w
from guided_diffusion.anofpdm.forward import run_forward_process, sample_noise
from guided_diffusion.anofpdm.pipeline import SPLIT_CODES, setting_key, slice_generators
from guided_diffusion.anofpdm.segmentation import segment
from guided_diffusion.anofpdm.translation import RUNTIME_SETTINGS, process_batch
from guided_diffusion.anofpdm.translation_runtime import load_model
from guided_diffusion.configs.base import DiffusionConfig, ModelConfig
from guided_diffusion.configs.curves_config import CurvesConfig
from guided_diffusion.configs.eval_configs import (
    CheckpointConfig,
    EvalConfig,
    EvalRun,
    ForwardConfig,
    SegmentConfig,
    resolve_min_cc_size,
)
from guided_diffusion.data.brats import get_eval_loader
from guided_diffusion.metrics.evaluator import SegmentationEvaluator
from guided_diffusion.script_util import create_gaussian_diffusion

SPLITS = ("val", "test")
_PURPOSE = {"loss": 101, "cond": 102}  # seed streams of the loss and conditioning draws


def _generators(seed: int, split: str, ids: Sequence[int], purpose: str) -> list[torch.Generator]:
    out = []
    for i in ids:
        state = np.random.SeedSequence([int(seed), SPLIT_CODES[split], int(i), _PURPOSE[purpose]])
        a, b = state.generate_state(2, np.uint32)
        out.append(torch.Generator().manual_seed(int(a) << 31 ^ int(b)))
    return out


@torch.no_grad()
def denoising_loss(model: Any, diffusion: Any, x: torch.Tensor, labels: torch.Tensor,
                   gens: Sequence[torch.Generator], draws: int) -> torch.Tensor:
    """Per-slice training loss averaged over ``draws`` seeded (t, noise) pairs: x [B, C, H, W], labels [B]
    -> [B] (CPU). t uniform over the diffusion's steps, noise N(0, I), both from the slice's generator."""

    b, dev = x.shape[0], x.device
    t = torch.stack([torch.randint(diffusion.num_timesteps, (draws,), generator=g) for g in gens])  # [B, D]
    xs = x.repeat_interleave(draws, dim=0)
    noise = torch.cat([sample_noise(x[i:i + 1].expand(draws, *x.shape[1:]), gens[i]) for i in range(b)])
    y = labels.to(dev).long().repeat_interleave(draws)
    losses = diffusion.training_losses(model, xs, t.reshape(-1).to(dev), model_kwargs={"y": y},
                                       noise=noise.to(dev))["loss"]
    return losses.float().reshape(b, draws).mean(dim=1).cpu()


@torch.no_grad()
def conditioning_strength(model: Any, diffusion: Any, x: torch.Tensor, gens: Sequence[torch.Generator],
                          steps: int) -> torch.Tensor:
    """Per-slice mean over ``steps`` evenly spaced t of mean_pixels (eps(x_t, y=healthy) - eps(x_t, null))^2
    (one network call on 2B per t, as the forward process): x [B, C, H, W] -> [B] (CPU)."""

    b, dev = x.shape[0], x.device
    ts = torch.unique(torch.linspace(0, diffusion.num_timesteps - 1, steps).round().long())
    y = torch.zeros(2 * b, dtype=torch.long, device=dev)
    null = torch.cat([torch.zeros(b, dtype=torch.bool), torch.ones(b, dtype=torch.bool)]).to(dev)
    total = torch.zeros(b)
    for t in ts.tolist():
        tt = torch.full((b,), t, dtype=torch.long, device=dev)
        xt = diffusion.q_sample(x, tt, noise=sample_noise(x, list(gens)))
        eps = diffusion.model_eps(model, torch.cat([xt, xt]), torch.cat([tt, tt]),
                                  model_kwargs={"y": y, "null": null})["eps"].float()
        total += (eps[:b] - eps[b:]).pow(2).mean(dim=(1, 2, 3)).cpu()
    return total / len(ts)


def _nan_none(v: float) -> float | None:
    return None if v is None or not math.isfinite(float(v)) else float(v)


def _mean(values: np.ndarray) -> float | None:
    return _nan_none(float(values.mean())) if values.size else None


def _cpu(fr: Any) -> Any:
    """A ForwardResult with its tensors on the CPU (validation results wait for the calibration)."""
    moved = {k: getattr(fr, k).cpu() for k in ("mse_h", "mse_null", "div", "end_step")}
    return dataclasses.replace(fr, agg={k: v.cpu() for k, v in fr.agg.items()}, **moved)


def _segment_val(run: Any, fr: Any, cal: Any, w: float) -> Any:
    """segmentation.segment of a validation batch with the settings translation.process_batch uses."""

    seg = run.segment
    return segment(fr, w=w, thr_01=cal.thr_01, diff_max=cal.diff_max, t_e_ratio=seg.t_e_ratio[0],
                   median_filter=seg.median_filter, last_only=seg.last_only,
                   subset_interval=seg.subset_interval, legacy=seg.legacy_segmentation, sam_mode=seg.sam_mode)


def _split_metrics(ev: Any, t_e: list[int], forward_steps: int, extra: Mapping[str, Any]) -> dict[str, Any]:
    res = ev.results()
    te = np.asarray(t_e)
    return {
        **extra,
        "image_accuracy": _nan_none(res["image"]["accuracy"]),
        "image_recall": _nan_none(res["image"]["recall"]),
        "image_specificity": _nan_none(res["image"]["specificity"]),
        "dice": _nan_none(res["unhealthy"]["dice"]),
        "dice_pooled": _nan_none(res["unhealthy"]["dice_pooled"]),
        "auprc": _nan_none(res["unhealthy"]["auprc"]),
        "te_inside": _mean(((te > 0) & (te < forward_steps - 1)).astype(np.float64)),
        "n_slices": int(res["counts"]["n_slices"]),
        "n_unhealthy": int(res["counts"]["n_unhealthy"]),
    }


def eval_run(m: ModelConfig, d: DiffusionConfig, c: CurvesConfig, data_dir: str, log_dir: str, step: int,
             ema_rate: str) -> Any:
    """The translation EvalRun of one checkpoint: the curves flags as --w, --forward_steps, --modality,
    --timestep_respacing, --num_slices(_val), --batch_size(_val), --seed; the rest at its defaults."""

    return EvalRun(
        model=m.replace(class_cond=True),
        diffusion=d.replace(timestep_respacing=c.eval_respacing),
        checkpoint=CheckpointConfig(model_dir=log_dir, model_num=str(step), ema=c.eval_ema,
                                    ema_rate=ema_rate),
        forward=ForwardConfig(w=c.eval_w, forward_steps=c.forward_steps, modality=c.modality),
        eval=EvalConfig(data_dir=data_dir, seed=c.eval_seed, num_slices_val=c.eval_slices,
                        batch_size_val=c.eval_batch, num_slices=c.eval_slices, batch_size=c.eval_batch,
                        progress=False, selection_tolerance=c.selection_tolerance),
        segment=SegmentConfig(),
    )


@dataclasses.dataclass
class _Split:
    """One split's pass: per-batch (forward output, x, gt, labels, slice ids), losses, strengths, labels."""

    batches: list[tuple[Any, ...]]
    loss: torch.Tensor
    cond: torch.Tensor
    labels: torch.Tensor

    def measures(self) -> dict[str, float | None]:
        return {"loss": _mean(self.loss.numpy()), "cond_healthy": _mean(self.cond[self.labels == 0].numpy()),
                "cond_unhealthy": _mean(self.cond[self.labels == 1].numpy())}


def _pass(c: CurvesConfig, m: ModelConfig, data_dir: str, split: str, model: Any, train_diffusion: Any,
          forward: Any) -> _Split:
    """Loss and conditioning strength of every slice of the split's first N, and ``forward(x, ids)`` per
    batch (the AnoFPDM forward process, or translation.process_batch on the test split)."""

    loader, dataset = get_eval_loader(data_dir, split, c.eval_batch, num_slices=c.eval_slices,
                                      in_channels=m.in_channels, world_size=1, rank=0)
    dev = next(model.parameters()).device
    batches, loss, cond, labels = [], [], [], []
    for x, gt, lab, idx in loader:
        ids = [int(i) for i in idx]
        xd = x.to(dev)
        loss.append(denoising_loss(model, train_diffusion, xd, lab,
                                   _generators(c.eval_seed, split, ids, "loss"), c.loss_draws))
        cond.append(conditioning_strength(model, train_diffusion, xd,
                                          _generators(c.eval_seed, split, ids, "cond"), c.cond_steps))
        labels.append(torch.as_tensor(lab).long())
        batches.append((forward(x, ids), x, gt, lab, [tuple(dataset.slice_info(i)) for i in ids]))
    return _Split(batches, torch.cat(loss), torch.cat(cond), torch.cat(labels))


def evaluate_checkpoint(m: ModelConfig, d: DiffusionConfig, c: CurvesConfig, data_dir: str, log_dir: str,
                        step: int, ema_rate: str) -> dict[str, Any]:
    """One row: the checkpoint of ``step`` measured on the first N validation and test slices."""

    t0 = time.perf_counter()
    run = eval_run(m, d, c, data_dir, log_dir, step, ema_rate)
    model, diffusion, path, sha = load_model(run.model, run.diffusion, run.checkpoint)
    if c.forward_steps > diffusion.num_timesteps - 1:
        raise ValueError(f"--forward_steps {c.forward_steps} must be < the {diffusion.num_timesteps} steps "
                         "of the evaluation chain (--eval_respacing / --diffusion_steps)")
    train_diffusion = create_gaussian_diffusion(d)
    settings, seg = run.forward.settings_kwargs(), run.segment
    dev = next(model.parameters()).device

    def val_forward(x: torch.Tensor, ids: list[int]) -> Any:  # one pass: calibration and segmentation
        fr = run_forward_process(model, diffusion, x.to(dev), ws=list(run.forward.w),
                                 generator=slice_generators(c.eval_seed, "val", ids),
                                 subset_interval=seg.subset_interval, sam_mode=seg.sam_mode,
                                 legacy_gradient_schedule=seg.legacy_segmentation, **settings)
        return _cpu(fr)

    val = _pass(c, m, data_dir, "val", model, train_diffusion, val_forward)
    stats = [torch.cat([getattr(b[0], k) for b in val.batches]) for k in ("mse_h", "mse_null", "div")]
    cal_kwargs = {k: v for k, v in settings.items() if k not in RUNTIME_SETTINGS}
    cals = {float(w): calibrate(stats[0][:, i], stats[1], stats[2][:, i], val.labels, w=w,
                                checkpoint_sha256=sha, **cal_kwargs)
            for i, w in enumerate(run.forward.w)}
    primary_w, _ = choose_primary_w(run.forward.w, cals, c.selection_tolerance)
    cal = cals[primary_w]
    min_cc = resolve_min_cc_size(seg.min_cc_size, m.image_size)

    ev, t_e = SegmentationEvaluator(min_cc_size=min_cc), []
    for fr, x, gt, lab, slice_ids in val.batches:
        out = _segment_val(run, fr, cal, primary_w)
        ev.add_batch(pred_mask_gated=out.mask, pred_mask_all=out.mask_all, anomaly_map=out.anomaly_map, gt=gt,
                     source=x, label=lab, pred_label=out.pred_lab, slice_ids=slice_ids)
        t_e += [int(v) for v in out.end_steps.reshape(len(slice_ids), -1).max(dim=1).values]
    row_val = _split_metrics(ev, t_e, c.forward_steps, val.measures())
    val.batches.clear()

    test = _pass(c, m, data_dir, "test", model, train_diffusion,
                 lambda x, ids: process_batch(run, model, diffusion, cals, x, ids))
    key = setting_key(primary_w, seg.t_e_ratio[0])
    ev, t_e = SegmentationEvaluator(min_cc_size=min_cc), []
    for records, x, gt, lab, slice_ids in test.batches:
        outs = [r["out"][key] for r in records]
        ev.add_batch(pred_mask_gated=np.stack([o["mask"] for o in outs]),
                     pred_mask_all=np.stack([o["mask_all"] for o in outs]),
                     anomaly_map=np.stack([o["map"] for o in outs]), gt=gt, source=x, label=lab,
                     pred_label=np.array([o["pred_lab"] for o in outs]), slice_ids=slice_ids)
        t_e += [int(np.max(o["end_steps"])) for o in outs]
    row_test = _split_metrics(ev, t_e, c.forward_steps, test.measures())
    return {
        "step": int(step),
        "checkpoint": os.path.basename(path),
        "checkpoint_sha256": sha,
        "w": float(primary_w),
        "calibration": {"thr_01": cal.thr_01, "accuracy": cal.accuracy, "diff_max": list(cal.diff_max),
                        "val_accuracy_by_w": {f"{w:g}": cals[w].accuracy for w in sorted(cals)}},
        "val": row_val,
        "test": row_test,
        "seconds": round(time.perf_counter() - t0, 3),
    }
