"""The AnoFPDM method as one object: a batch of slices in, anomaly maps, masks and labels out.

``AnoFPDMPipeline`` holds what the method needs and nothing about the run around it: the network, the
diffusion, the calibration of every guidance strength (thr_01, diff_max per w) and the forward / segment
settings. Calling it on a batch runs the forward process once (all w share it) and segments the result
for every (w, t_e_ratio) setting:

    pipe = AnoFPDMPipeline(model, diffusion, {2.0: cal}, forward_cfg, segment_cfg, seed=0)
    out = pipe(x, idx)              # x [B, C, H, W], idx: the B dataset indices (they seed the noise)
    seg = out.settings["w=2,t_e_ratio=1"]   # anomaly_map / mask / mask_all [B, 1, H, W], pred_lab [B], ...
    out.records()                   # one plain record per slice, the format of LOGDIR/results

Resume, sharding over ranks, progress and log lines, and every file are the caller's business
(``translation.run_test``); the pipeline neither reads nor writes anything. Each slice's noise comes from its
own generator seeded from (seed, split, dataset index), so a slice's result does not depend on the batch it
is in or on the number of processes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from guided_diffusion.anofpdm.forward import ForwardResult, run_forward_process
from guided_diffusion.anofpdm.segmentation import SegmentationResult, segment
from guided_diffusion.configs.calibration import Calibration
from guided_diffusion.configs.eval_configs import EvalRun, ForwardConfig, SegmentConfig

SPLIT_CODES = {"train": 0, "val": 1, "test": 2}

__all__ = ["SPLIT_CODES", "AnoFPDMPipeline", "PipelineOutput", "setting_key", "slice_generators"]


def setting_key(w: float, ratio: float) -> str:
    """Name of one (guidance strength, t_e ratio) setting, e.g. ``w=2,t_e_ratio=1``."""
    return f"w={w:g},t_e_ratio={ratio:g}"


def slice_generators(seed: int, split: str, indices: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per slice, seeded from (seed, split, dataset index)."""
    out = []
    for i in indices:
        state = np.random.SeedSequence([int(seed), SPLIT_CODES.get(split, 9), int(i)]).generate_state(
            2, np.uint32
        )
        out.append(torch.Generator().manual_seed(int(state[0]) << 31 ^ int(state[1])))
    return out


@dataclass
class PipelineOutput:
    """What the pipeline makes of one batch of B slices (nW guidance strengths, S steps, M modalities).

    Attributes:
        idx: the B dataset indices, in batch order.
        steps_run: forward steps actually run (fewer than S only with early stopping).
        mse_h [B, nW, S, M], mse_null [B, S, M], div [B, nW, S, M]: the forward statistics, on the CPU.
        settings: {setting_key(w, ratio): SegmentationResult} for every w and t_e ratio, in the order
            w-major; each holds anomaly_map, mask (gated by the predicted label), mask_all (ungated)
            [B, 1, H, W], pred_lab [B], end_steps (t_e per modality) [B, M], cos [B], threshold [B],
            quantile [B, M].
    """

    idx: list[int]
    steps_run: int
    mse_h: Tensor
    mse_null: Tensor
    div: Tensor
    settings: dict[str, SegmentationResult]

    def records(self) -> list[dict]:
        """One record per slice (numpy arrays and Python scalars), as saved under LOGDIR/results and read
        by ``translation_outputs.write_outputs``: idx, steps_run, mse_h, mse_null, div and
        out = {setting: {mask, mask_all (bool [H, W]), map (float32 [H, W]), pred_lab, cos, end_steps [M],
        threshold, quantile [M]}}."""
        records = [
            {
                "idx": int(i),
                "steps_run": self.steps_run,
                "out": {},
                "mse_h": self.mse_h[b].numpy(),
                "mse_null": self.mse_null[b].numpy(),
                "div": self.div[b].numpy(),
            }
            for b, i in enumerate(self.idx)
        ]
        for key, seg in self.settings.items():
            for b, rec in enumerate(records):
                rec["out"][key] = {
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


class AnoFPDMPipeline:
    """Forward process + segmentation of a batch for every (w, t_e_ratio) setting of a run.

    Args:
        model: the classifier-free-guided network (eval mode; possibly compiled).
        diffusion: the respaced diffusion the forward process walks.
        calibrations: {w: Calibration}; must hold every w of ``forward.w`` (thr_01 gates the masks,
            diff_max scales the divergence into the quantile).
        forward: the forward-process settings (w, steps, modalities, encoding, precision, ...).
        segment: the segmentation settings (t_e ratios, median filter, last_only, subset interval, legacy,
            SAM kind).
        seed: the noise seed; split: the split the slices come from (part of each slice's seed).
        device: where the network runs (default: the device of the model's first parameter).
        progress: a progress bar over the forward steps.
        forward_process: the function that runs the forward process (default ``run_forward_process``);
            the evaluation hands in the one its validation pass uses, so a wrapper (a spy in a test, a
            profiler) sees both passes.
    Raises:
        ValueError: a w of ``forward.w`` without a calibration.
    """

    def __init__(self, model, diffusion, calibrations: Mapping[float, Calibration], forward: ForwardConfig,
                 segment: SegmentConfig, *, seed: int, split: str = "test",
                 device: torch.device | str | None = None, progress: bool = False,
                 forward_process: Callable[..., ForwardResult] = run_forward_process):
        missing = [float(w) for w in forward.w if float(w) not in calibrations]
        if missing:
            held = sorted(float(w) for w in calibrations)
            raise ValueError(f"no calibration for w={missing} (the calibrations hold w={held}); calibrate "
                             "every --w on the validation split or drop it from --w")
        if device is None:
            device = next(model.parameters()).device
        self.model, self.diffusion = model, diffusion
        self.calibrations = {float(w): calibrations[float(w)] for w in forward.w}
        self.forward_cfg, self.segment_cfg = forward, segment
        self.seed, self.split, self.device, self.progress = int(seed), split, torch.device(device), progress
        self.forward_process = forward_process

    @classmethod
    def from_run(cls, run: EvalRun, model, diffusion, calibrations: Mapping[float, Calibration], *,
                 device: torch.device | str | None = None, progress: bool | None = None,
                 split: str = "test", forward_process: Callable[..., ForwardResult] = run_forward_process,
                 ) -> AnoFPDMPipeline:
        """The pipeline of an evaluation run's settings (``progress`` defaults to ``run.eval.progress``)."""
        return cls(model, diffusion, calibrations, run.forward, run.segment, seed=run.eval.seed, split=split,
                   device=device, progress=run.eval.progress if progress is None else progress,
                   forward_process=forward_process)

    @property
    def keys(self) -> list[str]:
        """The settings every output holds, w-major: ``setting_key(w, ratio)``."""
        return [setting_key(w, r) for w in self.forward_cfg.w for r in self.segment_cfg.t_e_ratio]

    def run_forward(self, x: Tensor, idx: Sequence[int]) -> ForwardResult:
        """The forward process of x [B, C, H, W] for every w (one pass), each slice's noise from its index."""
        seg = self.segment_cfg
        return self.forward_process(
            self.model,
            self.diffusion,
            x.to(self.device, non_blocking=True),
            ws=list(self.forward_cfg.w),
            generator=slice_generators(self.seed, self.split, idx),
            subset_interval=seg.subset_interval,
            keep_sam_stack=any(r != 1 for r in seg.t_e_ratio),
            progress=self.progress,
            sam_mode=seg.sam_mode,
            legacy_gradient_schedule=seg.legacy_segmentation,
            **self.forward_cfg.settings_kwargs(),
        )

    def segment(self, fr: ForwardResult, w: float, ratio: float) -> SegmentationResult:
        """The segmentation of ``fr`` for guidance strength ``w`` and end-step ratio ``ratio``."""
        seg, cal = self.segment_cfg, self.calibrations[float(w)]
        return segment(
            fr,
            w=w,
            thr_01=cal.thr_01,
            diff_max=cal.diff_max,
            t_e_ratio=ratio,
            median_filter=seg.median_filter,
            last_only=seg.last_only,
            subset_interval=seg.subset_interval,
            legacy=seg.legacy_segmentation,
            sam_mode=seg.sam_mode,
        )

    def __call__(self, x: Tensor, idx: Sequence[int]) -> PipelineOutput:
        """x [B, C, H, W] in [-1, 1] (any device) and its B dataset indices -> PipelineOutput."""
        ids = [int(i) for i in idx]
        if len(ids) != x.shape[0]:
            raise ValueError(f"got {len(ids)} dataset indices for a batch of {x.shape[0]} slices")
        fr = self.run_forward(x, ids)
        steps_run = int(fr.steps_run if fr.steps_run is not None else self.forward_cfg.forward_steps)
        stats = {k: getattr(fr, k).cpu() for k in ("mse_h", "mse_null", "div")}
        settings = {setting_key(w, r): self.segment(fr, w, r)
                    for w in self.forward_cfg.w for r in self.segment_cfg.t_e_ratio}
        return PipelineOutput(idx=ids, steps_run=steps_run, settings=settings, **stats)
