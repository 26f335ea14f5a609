"""Gradient-SAM ablation of AnoFPDM (docs/method.md, 'Gradient-SAM ablation').

With ``--use_gradient_sam`` the sub-anomaly map SAM_t = (x̂h0,t - x0)² is replaced by the guidance term
(x̂h0,t - x̂∅0,t)² / (B_t² (1 + w)²), B_t = (1 - ᾱ_t) / sqrt(ᾱ_t) (a rescaled eps_y - eps_null "gradient");
``--use_gradient_para_sam`` keeps it undivided. The classifier statistics (MSEs, M_t, t_e) are unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from guided_diffusion.configs.eval_configs import SAM_MODES


def gradient_sam_scale(
    diffusion,
    forward_steps: int,
    ws: Sequence[float],
    *,
    sam_mode: str,
    legacy_schedule: bool = False,
    diffusion_steps: int | None = None,
) -> Tensor | None:
    """[S, nW] float32 factors multiplying (x̂h0,t - x̂∅0,t)² into the gradient SAM, or None (default SAMs).

    "gradient": 1 / (B_t² (1 + w)²) with B_t = (1 - ᾱ_t) / sqrt(ᾱ_t), ᾱ_t from the diffusion's own
    (possibly respaced) schedule at the forward-step indices t (docs/method.md, 'Gradient-SAM schedule'); with
    ``legacy_schedule`` from upstream's hard-coded linspace(1e-4, 0.02, diffusion_steps) (default: the
    diffusion's original step count), first S entries. "gradient_para": all ones (undivided).
    """
    if sam_mode not in SAM_MODES:
        raise ValueError(f"sam_mode={sam_mode!r} is not one of {SAM_MODES}")
    if sam_mode == "default":
        return None
    if sam_mode == "gradient_para":
        return torch.ones(forward_steps, len(ws))
    if legacy_schedule:
        steps = int(diffusion_steps or getattr(diffusion, "original_num_steps", diffusion.num_timesteps))
        if steps < forward_steps:
            raise ValueError(f"diffusion_steps={steps} is smaller than forward_steps={forward_steps}")
        abar = np.cumprod(1.0 - np.linspace(1e-4, 0.02, steps, dtype=np.float64))[:forward_steps]
    else:
        abar = np.asarray(diffusion.alphas_cumprod, dtype=np.float64)[:forward_steps]
    b_t = torch.tensor((1.0 - abar) / np.sqrt(abar), dtype=torch.float32)
    w = torch.tensor([float(v) for v in ws], dtype=torch.float32)
    return 1.0 / (b_t[:, None] ** 2 * (1.0 + w[None]) ** 2)
