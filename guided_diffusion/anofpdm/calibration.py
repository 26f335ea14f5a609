"""Validation calibration of AnoFPDM (docs/method.md, 'Calibration') and guidance selection
(docs/method.md, 'Choosing the guidance strength').

Only validation images and image-level labels are used (no pixel masks):

* cos per sample between the modality-averaged MSE sequences of HGP and UGP (eps 1e-6);
* thr_01 = quantile(cos_healthy, q) for the first q in linspace(0.005, 0.095, 100) with the strictly
  smallest number of errors n_q = #(cos_unhealthy > τ_q) + #(cos_healthy < τ_q); accuracy = 1 - n_min / N;
* diff_min / diff_max per modality = min / max over unhealthy samples of max_t M_t.

There are no hard-coded fallback numbers: a validation set without healthy or without unhealthy slices is
an error. Results are persisted as JSON together with the settings they depend on; loading a calibration
made with different settings is an error, and every number read back is checked (finite, in range).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from guided_diffusion.anofpdm.segmentation import cosine_similarity
from guided_diffusion.configs.calibration import Calibration
from guided_diffusion.utils import logger

Q_GRID = torch.linspace(0.005, 0.095, 100)


def cos_threshold(cos_healthy: Tensor, cos_unhealthy: Tensor) -> tuple[float, int, float]:
    """(thr_01, n_min, q*) by the quantile grid Q_GRID over the healthy cosines (first strict minimum)."""
    cos0, cos1 = cos_healthy.double().reshape(-1), cos_unhealthy.double().reshape(-1)
    best_n, best_thr, best_q = None, 0.0, 0.0
    for q in Q_GRID.tolist():
        tau = torch.quantile(cos0, q)
        n = int((cos1 > tau).sum()) + int((cos0 < tau).sum())
        if best_n is None or n < best_n:
            best_n, best_thr, best_q = n, float(tau), float(q)
    return best_thr, int(best_n), best_q


def calibrate(
    mse_h: Tensor,
    mse_null: Tensor,
    div: Tensor,
    labels: Tensor | Sequence[int],
    *,
    w: float,
    forward_steps: int,
    modality: Sequence[int],
    checkpoint_sha256: str = "",
    encoding: str = "ddim",
    ugp: str = "null",
    legacy_indexing: bool = False,
    clip_denoised: bool = True,
    dynamic_clip: bool = False,
    extra: dict | None = None,
    settings: Mapping | None = None,
) -> Calibration:
    """Calibrate from validation statistics of one w.

    Args:
        mse_h / mse_null / div: [N, S, M] per-sample, per-step, per-modality statistics (ForwardResult).
        labels: [N] image-level labels (0 healthy, 1 unhealthy).
        remaining: the settings stored with the result; ``settings``: every setting that changes the
            statistics (EvalRun.stats_settings), checked when the calibration is reused.
    """
    labels = torch.as_tensor(labels).reshape(-1).long().cpu()
    if mse_h.dim() != 3 or mse_h.shape != mse_null.shape or div.shape != mse_h.shape:
        raise ValueError(
            f"mse_h, mse_null and div must all be [N, S, M]; got {tuple(mse_h.shape)}, "
            f"{tuple(mse_null.shape)}, {tuple(div.shape)}"
        )
    if labels.numel() != mse_h.shape[0]:
        raise ValueError(f"labels has {labels.numel()} entries for {mse_h.shape[0]} validation samples")
    healthy, unhealthy = labels == 0, labels == 1
    n0, n1 = int(healthy.sum()), int(unhealthy.sum())
    if n0 == 0 or n1 == 0:
        raise ValueError(
            f"calibration needs healthy AND unhealthy validation slices, got {n0} healthy and "
            f"{n1} unhealthy of {labels.numel()}; use more validation slices (--num_slices_val) "
            "or pass a stored calibration with --calibration"
        )
    cos = cosine_similarity(mse_h.cpu(), mse_null.cpu())
    thr_01, n_min, q = cos_threshold(cos[healthy], cos[unhealthy])
    mmax = div.float().cpu()[unhealthy].max(dim=1).values  # [N1, M]
    n = labels.numel()
    return Calibration(
        thr_01=thr_01,
        n_min=n_min,
        accuracy=1.0 - n_min / n,
        q=q,
        diff_min=mmax.min(dim=0).values.tolist(),
        diff_max=mmax.max(dim=0).values.tolist(),
        n_val=n,
        n_healthy=n0,
        n_unhealthy=n1,
        w=float(w),
        forward_steps=int(forward_steps),
        modality=[int(m) for m in modality],
        encoding=encoding,
        ugp=ugp,
        legacy_indexing=bool(legacy_indexing),
        clip_denoised=bool(clip_denoised),
        dynamic_clip=bool(dynamic_clip),
        checkpoint_sha256=checkpoint_sha256,
        extra=dict(extra or {}),
        settings=dict(settings or {}),
    )


def select_guidance(
    calibrations_by_w: Mapping[float, Calibration], tolerance: float = 0.99
) -> tuple[float, list[dict]]:
    """Largest w whose validation accuracy >= tolerance * best accuracy (paper §4.2).

    Returns (w, table) with one row per w (ascending): w, accuracy, n_min, n_val, thr_01, diff_max, selected.
    """
    if not calibrations_by_w:
        raise ValueError("select_guidance needs at least one calibration (one per w)")
    items = sorted(((float(w), c) for w, c in calibrations_by_w.items()), key=lambda kv: kv[0])
    best = max(c.accuracy for _, c in items)
    chosen = max(w for w, c in items if c.accuracy >= tolerance * best)
    table = [
        {
            "w": w,
            "accuracy": c.accuracy,
            "n_min": c.n_min,
            "n_val": c.n_val,
            "thr_01": c.thr_01,
            "diff_max": c.diff_max,
            "selected": w == chosen,
        }
        for w, c in items
    ]
    return chosen, table


def guidance_selection(cals: Mapping[float, Calibration], tolerance: float = 0.99) -> dict:
    """Apply the paper's w-selection rule to calibrations {w: Calibration} and log the table.

    Returns {"chosen_w", "tolerance", "rule", "table"}; table: one row per w ascending (w, accuracy, n_min,
    n_val, thr_01, diff_max, selected) from calibration.select_guidance (largest w whose validation
    accuracy >= tolerance * best; docs/method.md, 'Choosing the guidance strength').
    """
    chosen, table = select_guidance(cals, tolerance=tolerance)
    logger.log(f"guidance selection (largest w with val accuracy >= {tolerance:g} x best): w={chosen:g}")
    for row in table:
        logger.log(
            f"  w={row['w']:g}: accuracy={row['accuracy']:.4f} n_min={row['n_min']}/{row['n_val']} "
            f"thr_01={row['thr_01']:.6f}{'  <- chosen' if row['selected'] else ''}"
        )
    return {
        "chosen_w": chosen,
        "tolerance": float(tolerance),
        "rule": "largest w whose validation accuracy >= tolerance * best accuracy (paper §4.2)",
        "table": table,
    }


def choose_primary_w(
    ws: Sequence[float], cals: Mapping[float, Calibration], tolerance: float = 0.99
) -> tuple[float, dict | None]:
    """Primary guidance strength of a run -> (w, selection or None).

    One w: that w and None (no selection). Several: guidance_selection over ``ws`` -> (chosen w, selection).
    """
    ws = [float(w) for w in ws]
    if len(ws) == 1:
        return ws[0], None
    selection = guidance_selection({w: cals[w] for w in ws}, tolerance)
    return selection["chosen_w"], selection
