"""Anomaly maps of the paper's comparison methods (Table 1) on a batch of slices.

Every method returns ``(anomaly_map [B, 1, H, W] float32 on x's device, evaluations)`` where
``evaluations`` is the measured number of network evaluations per slice (UNet and classifier calls,
each counted once per sample row they process; a guided call on a doubled batch counts 2).

* ``anoddpm_map`` (Wyatt et al. 2022): noise x_0 to level L (Gaussian or simplex), run the ancestral
  reverse chain from L with an unconditional model (the same noise type at every step); map = squared
  residual averaged over the evaluated modalities, 5x5 median filter. Evaluations = L.
* ``clf_guided_ddim_map`` (Wolleb et al. 2022): deterministic DDIM encoding to L with the diffusion
  model, then DDIM decoding with eps' = eps - sqrt(1 - abar_t) * s * grad log p(healthy | x_t).
  Evaluations = 2L UNet + L classifier = 3L.
* ``cfg_ddim_map`` (Sanchez et al. 2022, DDIB-style): DDIM encoding with the null condition, decoding with
  classifier-free healthy guidance w (one batched call per step). Evaluations = L + 2L = 3L.
* ``flair_map`` (Meissen et al. 2021): the FLAIR channel min-max normalised per slice to [0, 1]. 0.
* ``best_threshold``: the threshold maximising the Dice pooled over the UNHEALTHY validation slices WITH
  pixel labels (an empty prediction scores 0 there, so "predict nothing" cannot win). The comparison rows
  tuned this way (and their L, s, w) use pixel labels; AnoFPDM stays label-free.

Levels L are counts of steps of ``diffusion`` (its respaced index space, 0 <= L <= num_timesteps).
Encoding runs indices 0..L-1 and decoding L-1..0 (as upstream's DDIB/Wolleb scripts); L = 0 returns x_0
itself (zero map). DDIM maps are the absolute residual averaged over the modalities (no filter unless
``median_filter``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from scipy.ndimage import median_filter as _scipy_median
from torch import Tensor

from guided_diffusion.baselines.classifier import classifier_log_prob_grad
from guided_diffusion.configs.train_config import NOISE_TYPES
from guided_diffusion.gaussian_diffusion import randn_like
from guided_diffusion.metrics.slice_metrics import dice_per_sample, pixel_precision_recall
from guided_diffusion.simplex import simplex_noise_like

# AnoDDPM noise level L (of 1000 steps) per noise type in upstream's config/run_translation_brats_anoddpm.sh
ANODDPM_LEVELS = {"gaussian": 300, "simplex": 200}
# rows whose hyper-parameters (L, s or w) and threshold are tuned on validation slices WITH pixel labels
PIXEL_LABEL_TUNED = ("anoddpm_gaussian", "anoddpm_simplex", "ddim_classifier", "ddim_cfg", "flair")
# what ``best_threshold`` maximises on the validation slices (see its docstring); the first is the default
TUNING_OBJECTIVES = ("pooled_unhealthy", "mean_unhealthy")


class _CountingModel:
    """Wraps a network and counts the sample rows it is called on."""

    def __init__(self, model: Callable[..., Tensor]):
        self.model, self.rows = model, 0

    def __call__(self, x: Tensor, t: Tensor, **kwargs: Any) -> Tensor:
        self.rows += int(x.shape[0])
        return self.model(x, t, **kwargs)


def median_filter_maps(maps: Tensor, size: int = 5) -> Tensor:
    """``size`` x ``size`` median filter per slice, padded like upstream's torch F.pad(mode="reflect") (edge
    pixel not repeated: scipy mode "mirror"), as segmentation.median_filter_5x5.
    [B, 1, H, W] -> same shape, dtype and device."""
    arr = maps.detach().float().cpu().numpy()
    out = np.stack([_scipy_median(a, size=(1, size, size), mode="mirror") for a in arr])
    return torch.from_numpy(out).to(device=maps.device, dtype=maps.dtype)


def _check(x: Tensor, diffusion: Any, level: int, modality: Sequence[int] | None) -> list[int]:
    if x.ndim != 4:
        raise ValueError(f"tensor x must have shape [B, C, H, W]; got {tuple(x.shape)}")
    if isinstance(level, bool) or not isinstance(level, (int, np.integer)) or not (
            0 <= int(level) <= diffusion.num_timesteps):
        raise ValueError(f"noise level L must be an integer in [0, {diffusion.num_timesteps}] (steps of the "
                         f"diffusion), got {level!r}")
    mods = list(range(x.shape[1])) if modality is None else [int(m) for m in modality]
    if not mods or any(not 0 <= m < x.shape[1] for m in mods):
        raise ValueError(f"modality {modality} must list channel indices of x in [0, {x.shape[1] - 1}]")
    return mods


def residual_map(x0: Tensor, recon: Tensor, modality: Sequence[int], squared: bool) -> Tensor:
    """Mean over ``modality`` of (x0 - recon)**2 (``squared``) or |x0 - recon|.
    [B, C, H, W] x2 -> [B, 1, H, W]."""
    diff = (x0[:, list(modality)] - recon[:, list(modality)]).float()
    return (diff.pow(2) if squared else diff.abs()).mean(dim=1, keepdim=True)


def _steps(level: int, batch: int, device: torch.device, reverse: bool):
    order = range(level - 1, -1, -1) if reverse else range(level)
    for i in order:
        yield torch.full((batch,), i, dtype=torch.long, device=device)


def anoddpm_map(model: Callable[..., Tensor], diffusion: Any, x: Tensor, level: int, *,
                noise: str = "gaussian", modality: Sequence[int] | None = None,
                generator: torch.Generator | None = None, simplex_kwargs: dict | None = None,
                median_filter: bool = True, clip_denoised: bool = True,
                model_kwargs: dict | None = None) -> tuple[Tensor, int]:
    """AnoDDPM (G) / (S): partial diffusion to L and the full ancestral reverse chain from L.

    x [B, C, H, W] in [-1, 1]; noise "gaussian" or "simplex" (``simplex_kwargs``: octaves, persistence,
    frequency); every draw comes from ``generator``. Returns (map [B, 1, H, W], L).
    """
    if noise not in NOISE_TYPES:
        raise ValueError(f"--noise_type {noise!r}: expected one of {NOISE_TYPES}")
    mods = _check(x, diffusion, level, modality)
    counter = _CountingModel(model)

    def draw(like: Tensor) -> Tensor:
        if noise == "simplex":
            return simplex_noise_like(like, generator=generator, **(simplex_kwargs or {}))
        return randn_like(like, generator)

    recon = x
    with torch.no_grad():
        if level > 0:
            t0 = torch.full((x.shape[0],), level - 1, dtype=torch.long, device=x.device)
            recon = diffusion.q_sample(x, t0, noise=draw(x))
        for t in _steps(int(level), x.shape[0], x.device, reverse=True):
            out = diffusion.p_mean_variance(counter, recon, t, clip_denoised=clip_denoised,
                                            model_kwargs=model_kwargs)
            nonzero = (t != 0).to(recon.dtype).reshape(-1, 1, 1, 1)
            recon = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * draw(recon)
    amap = residual_map(x, recon, mods, squared=True)
    if median_filter:
        amap = median_filter_maps(amap)
    return amap, counter.rows // max(x.shape[0], 1)


def ddim_encode(model: Callable[..., Tensor], diffusion: Any, x: Tensor, level: int,
                model_kwargs: dict | None = None, clip_denoised: bool = True) -> Tensor:
    """Deterministic DDIM encoding of x_0 over indices 0..L-1 (x itself for L = 0)."""
    _check(x, diffusion, level, None)
    if level == 0:
        return x
    return diffusion.ddim_reverse_sample_loop(model, x, int(level), clip_denoised=clip_denoised,
                                              model_kwargs=model_kwargs)


def clf_guided_ddim_map(model: Callable[..., Tensor], classifier: torch.nn.Module, diffusion: Any, x: Tensor,
                        level: int, scale: float, *, modality: Sequence[int] | None = None,
                        healthy_label: int = 0, clip_denoised: bool = True, model_kwargs: dict | None = None,
                        median_filter: bool = False) -> tuple[Tensor, int]:
    """Wolleb et al.: DDIM-encode to L, decode toward ``healthy_label`` with classifier gradient scale s.
    Deterministic (no noise is drawn). Returns (map [B, 1, H, W], 3L)."""
    mods = _check(x, diffusion, level, modality)
    counter, clf = _CountingModel(model), _CountingModel(classifier)
    target = torch.full((x.shape[0],), int(healthy_label), dtype=torch.long, device=x.device)
    with torch.no_grad():
        h = ddim_encode(counter, diffusion, x, level, model_kwargs, clip_denoised)
        for t in _steps(int(level), x.shape[0], x.device, reverse=True):
            out = diffusion.p_mean_variance(counter, h, t, clip_denoised=clip_denoised,
                                            model_kwargs=model_kwargs)
            eps = diffusion.predict_eps_from_xstart(h, t, out["pred_xstart"])
            grad = classifier_log_prob_grad(clf, diffusion, h, t, target)
            sigma = diffusion._extract(diffusion.sqrt_one_minus_alphas_cumprod, t, h)
            eps = eps - sigma * float(scale) * grad
            x0 = diffusion.predict_xstart_from_eps(h, t, eps)
            abar_prev = diffusion._extract(diffusion.alphas_cumprod_prev, t, h)
            h = x0 * abar_prev.sqrt() + (1.0 - abar_prev).sqrt() * eps
    amap = residual_map(x, h, mods, squared=False)
    if median_filter:
        amap = median_filter_maps(amap)
    return amap, (counter.rows + clf.rows) // max(x.shape[0], 1)


def cfg_ddim_map(model: Callable[..., Tensor], diffusion: Any, x: Tensor, level: int, w: float, *,
                 modality: Sequence[int] | None = None, healthy_label: int = 0, clip_denoised: bool = True,
                 median_filter: bool = False) -> tuple[Tensor, int]:
    """DDIB-style: DDIM-encode with the null condition, decode with healthy classifier-free guidance w
    (the AnoFPDM model, ``model(x, t, y=..., null=...)``). Deterministic. Returns (map, 3L)."""
    mods = _check(x, diffusion, level, modality)
    if getattr(model, "num_classes", 1) is None:
        raise ValueError("DDIM + classifier-free guidance needs a class-conditional classifier-free model "
                         "(--class_cond True, e.g. the AnoFPDM model); this one is unconditional")
    counter = _CountingModel(model)
    y = torch.full((x.shape[0],), int(healthy_label), dtype=torch.long, device=x.device)
    with torch.no_grad():
        h = ddim_encode(counter, diffusion, x, level, {"null": True}, clip_denoised)
        for t in _steps(int(level), x.shape[0], x.device, reverse=True):
            h = diffusion.ddim_sample(counter, h, t, w=float(w), clip_denoised=clip_denoised,
                                      model_kwargs={"y": y})["sample"]
    amap = residual_map(x, h, mods, squared=False)
    if median_filter:
        amap = median_filter_maps(amap)
    return amap, counter.rows // max(x.shape[0], 1)


def flair_map(x: Tensor, flair_channel: int) -> tuple[Tensor, int]:
    """FLAIR intensity baseline: channel ``flair_channel`` min-max normalised per slice to [0, 1]
    (a constant slice maps to 0). Returns (map [B, 1, H, W], 0)."""
    if x.ndim != 4 or not 0 <= int(flair_channel) < x.shape[1]:
        raise ValueError(f"flair_channel {flair_channel} must index a channel of x [B, C, H, W]; x has shape "
                         f"{tuple(x.shape)}")
    f = x[:, int(flair_channel):int(flair_channel) + 1].float()
    lo = f.amin(dim=(2, 3), keepdim=True)
    span = f.amax(dim=(2, 3), keepdim=True) - lo
    return torch.where(span > 0, (f - lo) / span.clamp(min=1e-12), torch.zeros_like(f)), 0


def best_threshold(maps: Any, gt: Any, thresholds: Sequence[float] | int = 101,
                   objective: str = "pooled_unhealthy") -> tuple[float, float]:
    """Grid-search the map threshold with the best validation Dice over the UNHEALTHY slices (PIXEL LABELS).

    Why not the mean Dice over all slices (the earlier objective): an empty prediction scores 1 on every
    healthy slice, so with weak maps a threshold above every map value ("predict nothing") wins with the
    healthy share as its score and the row gets 0 unhealthy Dice. Over the unhealthy slices only, an empty
    prediction scores 0, so it can only win when no threshold finds a single lesion pixel.

    objective: "pooled_unhealthy" (default): Dice 2TP / (2TP + FP + FN) of the pixels pooled over the
    slices with lesions; one ratio of counts, so a few slices with tiny lesions (whose per-slice Dice jumps
    between 0 and 1) do not steer the threshold, which matters on small validation sets. "mean_unhealthy":
    the mean per-slice Dice over the slices with lesions (the validation twin of the unhealthy Dice
    column). maps / gt [N, 1, H, W] or [N, H, W] (gt binary); thresholds: explicit values, or a count of
    evenly spaced values between the maps' min and max. Returns (threshold, its Dice); ties keep the
    first grid value. Raises ValueError when gt has no lesion pixel (the objective is undefined).
    """
    if objective not in TUNING_OBJECTIVES:
        raise ValueError(f"threshold objective {objective!r}: expected one of {TUNING_OBJECTIVES}")
    m = np.asarray(maps.detach().cpu() if isinstance(maps, Tensor) else maps, dtype=np.float64)
    g = np.asarray(gt.detach().cpu() if isinstance(gt, Tensor) else gt) > 0.5
    if m.shape != g.shape or m.ndim not in (3, 4) or m.size == 0:
        raise ValueError(f"maps {m.shape} and gt {g.shape} must be equal non-empty [N, (1,) H, W] arrays")
    unhealthy = g.reshape(g.shape[0], -1).any(axis=1)
    if not unhealthy.any():
        raise ValueError("best_threshold: the validation gt has no lesion pixels, so the unhealthy Dice "
                         "objective is undefined (use more validation slices)")
    if isinstance(thresholds, (int, np.integer)):
        if thresholds < 2:
            raise ValueError(f"thresholds: need a count >= 2 or explicit values, got {thresholds}")
        grid = np.linspace(float(m.min()), float(m.max()), int(thresholds))
    else:
        grid = np.asarray(list(thresholds), dtype=np.float64)
        if grid.size == 0:
            raise ValueError("thresholds: the list of candidate values is empty")
    mu, gu = m[unhealthy], g[unhealthy]
    best_t, best_d = float(grid[0]), -1.0
    for thr in grid:
        if objective == "pooled_unhealthy":
            d = float(pixel_precision_recall(mu >= thr, gu)["dice"])
        else:
            d = float(np.mean(dice_per_sample(mu >= thr, gu)))
        if d > best_d:
            best_t, best_d = float(thr), d
    return best_t, best_d
