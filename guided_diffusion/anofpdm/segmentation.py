"""AnoFPDM segmentation (docs/method.md, 'Segmentation') from a ForwardResult.

Per sample: cos = cosine similarity of the modality-averaged MSE sequences (HGP vs UGP); per modality
t_e = argmax_t M_t, scaled divergence s = clamp(max_t M_t / diff_max, 0, 1), quantile Q[round(100 s)] with
Q = linspace(0.90, 0.98, 101) reversed, aggregated sub-anomaly map H_m = mean of SAM_t over the chosen steps,
threshold = mean over modalities of quantile(H_m, Q); map = mean of H_m (5x5 median filter), mask_all =
map >= threshold, mask = mask_all if cos <= thr_01 (predicted unhealthy) else 0.

Fixed behaviour (default): t_e included (t in [0, t_e]), any number of modalities, index = round(100 s),
``last_only`` uses SAM_{t_e}. ``legacy=True`` reproduces upstream: end-exclusive [0, t_e), index
int(round(s, 2) * 100) (float32 truncation), ``last_only`` uses t_e - 1; the upstream NaN for t_e = 0 (empty
range) is guarded in both modes by falling back to SAM_0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import median_filter as _median_filter
from torch import Tensor

from guided_diffusion.anofpdm.forward import ForwardResult

QUANTILE_GRID = torch.flip(torch.linspace(0.90, 0.98, 101), dims=(0,))


@dataclass
class SegmentationResult:
    """Outputs for a batch of B samples (M modalities), all on CPU.

    mask / mask_all [B, 1, H, W] float (0/1): classification-gated / ungated masks; pred_lab [B] int64;
    anomaly_map [B, 1, H, W] (median-filtered if requested); end_steps [B, M] int64 (t_e used);
    cos [B]; quantile [B, M]; threshold [B]; scaled_divergence [B, M] (s).
    """

    mask: Tensor
    mask_all: Tensor
    pred_lab: Tensor
    anomaly_map: Tensor
    end_steps: Tensor
    cos: Tensor
    quantile: Tensor
    threshold: Tensor
    scaled_divergence: Tensor


def cosine_similarity(mse_h: Tensor, mse_null: Tensor) -> Tensor:
    """Cosine similarity (eps 1e-6) of the modality-averaged sequences: [..., S, M] x2 -> [...]."""
    return F.cosine_similarity(mse_h.float().mean(-1), mse_null.float().mean(-1), dim=-1, eps=1e-6)


def median_filter_5x5(amap: Tensor) -> Tensor:
    """5x5 median filter of [B, C, H, W] maps, padded like upstream's torch F.pad(mode="reflect"): the
    edge pixel is not repeated (scipy mode="mirror"; docs/method.md, 'Segmentation'). Same in default and
    legacy mode."""
    arr = amap.detach().cpu().numpy()
    return torch.from_numpy(np.stack([_median_filter(a, size=(1, 5, 5), mode="mirror") for a in arr]))


def quantile_index(s: Tensor, legacy: bool = False) -> Tensor:
    """Index into QUANTILE_GRID for scaled divergences s in [0, 1]: round(100 s), or upstream's
    int(round(s, 2) * 100) when ``legacy``: rounding, product and truncation in float32 as upstream's
    tensors are (0.53 -> 52, 0.59 -> 58; 0.29, 0.57, 0.58 stay exact;
    docs/method.md, 'Quantile index rounding')."""
    if legacy:
        return (torch.round(s.float(), decimals=2) * 100).to(torch.int64)
    return torch.round(s.double() * 100).to(torch.int64)


def aggregation_steps(
    t_e: int, steps: int, *, legacy: bool = False, last_only: bool = False, interval: int = -1
) -> list[int]:
    """Step indices averaged into H_m for end step ``t_e`` (any value; clamped to the S = ``steps`` range).

    fixed: [0..t_e], or [t_e] (last_only), or every interval-th step of [0, t_e) plus t_e.
    legacy: [0..t_e-1], or [t_e-1] (last_only), or every interval-th step of [0, t_e) plus t_e (if < S);
    an empty legacy range (t_e = 0, upstream NaN) falls back to [0].
    """
    if legacy:
        end = min(max(t_e, 0), steps)
        if last_only:
            idx = [end - 1]
        elif interval > 0:
            idx = list(range(0, end, interval)) + ([t_e] if 0 <= t_e < steps else [])
        else:
            idx = list(range(0, end))
        idx = [i for i in idx if i >= 0]
        return idx or [0]
    te = min(max(t_e, 0), steps - 1)
    if last_only:
        return [te]
    if interval > 0:
        return list(range(0, te, interval)) + [te]
    return list(range(0, te + 1))


def _online_maps(fr: ForwardResult, wi: int, legacy: bool, last_only: bool, interval: int) -> Tensor:
    """[B, M, H, W] aggregated SAMs at t_e = argmax from the online aggregates (exact)."""
    te = fr.end_step[:, wi].to(fr.agg["sum_incl"].device)[..., None, None].float()
    a = {k: v[:, wi] for k, v in fr.agg.items()}
    if last_only:
        return torch.where(te > 0, a["sam_prev"], a["sam_te"]) if legacy else a["sam_te"]
    if interval > 0:
        if fr.subset_interval != interval or "grid_excl" not in a:
            raise ValueError(
                f"subset_interval={interval} was not tracked by the forward pass "
                f"(it used {fr.subset_interval}); pass subset_interval to run_forward_process"
            )
        return (a["grid_excl"] + a["sam_te"]) / (torch.ceil(te / interval) + 1)
    if legacy:
        return torch.where(te > 0, a["sum_excl"] / te.clamp(min=1), a["sam_te"])
    return a["sum_incl"] / (te + 1)


def _stack_maps(
    fr: ForwardResult, wi: int, t_e: Tensor, legacy: bool, last_only: bool, interval: int
) -> Tensor:
    """[B, M, H, W] aggregated SAMs for arbitrary end steps t_e [B, M] from the float16 SAM stack."""
    if fr.sam_stack is None:
        raise ValueError(
            "t_e_ratio != 1 needs the per-step SAM stack: run run_forward_process with keep_sam_stack=True"
        )
    stack = fr.sam_stack[:, wi]
    b, steps, m = stack.shape[:3]
    out = torch.zeros(b, m, *stack.shape[-2:], device=stack.device)
    for i in range(b):
        for j in range(m):
            idx = aggregation_steps(
                int(t_e[i, j]), steps, legacy=legacy, last_only=last_only, interval=interval
            )
            out[i, j] = stack[i, idx, j].float().mean(0)
    return out


def segment(
    fr: ForwardResult,
    *,
    thr_01: float,
    diff_max: Sequence[float] | Tensor,
    w: float | None = None,
    t_e_ratio: float = 1.0,
    median_filter: bool = True,
    last_only: bool = False,
    subset_interval: int = -1,
    legacy: bool = False,
    thr: float | None = None,
    sam_mode: str | None = None,
) -> SegmentationResult:
    """Segment the batch of ``fr`` for guidance strength ``w`` (default: the only/first w of the pass).

    Args:
        thr_01: cosine threshold (cos <= thr_01 -> predicted unhealthy); diff_max: [M] from calibration.
        t_e_ratio: t_e <- round(t_e * ratio) (needs fr.sam_stack unless 1).
        median_filter: 5x5 median filter (median_filter_5x5) on the modality-averaged map.
        last_only: S_te variant (single step); subset_interval: k > 0 uses every k-th step plus t_e.
        legacy: upstream aggregation / quantile-index behaviour (see module docstring).
        thr: fixed mask threshold instead of the per-sample quantile threshold.
        sam_mode: if given, the SAM kind the caller expects ("default" / "gradient" / "gradient_para"); it is
            chosen in run_forward_process (the aggregates are built there) and must match fr.sam_mode.
    """
    if sam_mode is not None and sam_mode != fr.sam_mode:
        raise ValueError(
            f"sam_mode={sam_mode!r} but the forward pass built {fr.sam_mode!r} SAMs; pass sam_mode to "
            "run_forward_process"
        )
    if last_only and subset_interval > 0:
        raise ValueError("last_only and subset_interval > 0 cannot be combined (upstream asserts this too)")
    wi = 0 if w is None else fr.w_index(w)
    n_mod = len(fr.modality)
    diff_max = torch.as_tensor(diff_max, dtype=torch.float32).reshape(-1)
    if (
        diff_max.numel() != n_mod
        or not bool((diff_max > 0).all())
        or not bool(torch.isfinite(diff_max).all())
    ):
        raise ValueError(
            f"diff_max must hold {n_mod} positive finite values (one per modality {fr.modality}), "
            f"got {diff_max.tolist()}; recalibrate on a validation set with unhealthy slices"
        )
    if not math.isfinite(t_e_ratio) or t_e_ratio < 0:
        raise ValueError(f"t_e_ratio must be a finite number >= 0, got {t_e_ratio}")
    div = fr.div[:, wi].float().cpu()
    steps = div.shape[1]
    cos = cosine_similarity(fr.mse_h[:, wi].cpu(), fr.mse_null.cpu())
    s = torch.clamp(div.max(dim=1).values / diff_max, 0, 1)
    quant = QUANTILE_GRID[quantile_index(s, legacy)]
    t_e = fr.end_step[:, wi].cpu()
    if t_e_ratio != 1:
        t_e = torch.round(t_e.double() * t_e_ratio).to(torch.int64)
        maps = _stack_maps(fr, wi, t_e, legacy, last_only, subset_interval).cpu()
        t_e = t_e.clamp(max=steps if legacy else steps - 1)
    else:
        maps = _online_maps(fr, wi, legacy, last_only, subset_interval).float().cpu()
    b = maps.shape[0]
    thresholds = torch.zeros(b)
    for i in range(b):
        per_mod = [torch.quantile(maps[i, j].reshape(-1), quant[i, j]) for j in range(n_mod)]
        thresholds[i] = torch.stack(per_mod).sum() / n_mod
    if thr is not None:
        thresholds.fill_(float(thr))
    amap = maps.sum(dim=1, keepdim=True) / n_mod
    if median_filter:
        amap = median_filter_5x5(amap)
    mask_all = (amap >= thresholds[:, None, None, None]).float()
    pred_lab = (cos <= thr_01).to(torch.int64)
    mask = mask_all * pred_lab[:, None, None, None].float()
    return SegmentationResult(
        mask=mask,
        mask_all=mask_all,
        pred_lab=pred_lab,
        anomaly_map=amap,
        end_steps=t_e,
        cos=cos,
        quantile=quant,
        threshold=thresholds,
        scaled_divergence=s,
    )
