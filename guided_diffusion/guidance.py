"""Classifier-free guidance (paper Eq. 6) evaluated as ONE batched network call.

The conditional and null-condition predictions come from a single forward pass on ``cat([x, x])`` whose
second half is flagged ``null=True``; the guided prediction is ``(1 + w) * eps_y - w * eps_null``.
Guidance "off" is expressed by not calling these functions at all (``w=None`` in the diffusion API);
every real ``w`` -- including ``w = -1`` (the pure null model) -- is a valid guidance strength.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def cfg_model_outputs(model: Callable[..., Tensor], x: Tensor, t: Tensor, y: Tensor | None,
                      **model_kwargs) -> tuple[Tensor, Tensor]:
    """Conditional and null outputs of ``model`` from one call on a doubled batch.

    Args:
        model: called as ``model(x2, t2, y=y2, null=null2, **model_kwargs)``.
        x: [B, C, ...] noisy input.
        t: [B] timesteps (passed to the model as given, duplicated).
        y: [B] integer class labels of the conditional half.
        model_kwargs: extra keyword arguments for the model (e.g. ``threshold``, ``generator``); must not
            contain ``null``, which guidance sets itself.

    Returns:
        ``(out_cond, out_null)``, each the model output for the B original samples.
    """
    if y is None:
        raise ValueError("classifier-free guidance needs class labels: pass model_kwargs['y'] "
                         "(LongTensor [B]) or use w=None to sample without guidance")
    if "null" in model_kwargs:
        raise ValueError("model_kwargs must not contain 'null' when guidance is on (w is not None): "
                         "guidance sets null itself; drop the key or use w=None for a plain call")
    if not isinstance(y, Tensor) or y.shape != (x.shape[0],):
        raise ValueError(f"y must be a tensor of shape [B]=[{x.shape[0]}] class labels, got "
                         f"{type(y).__name__} {tuple(getattr(y, 'shape', ()))}")
    batch = x.shape[0]
    null = torch.cat([torch.zeros(batch, dtype=torch.bool, device=x.device),
                      torch.ones(batch, dtype=torch.bool, device=x.device)])
    out = model(torch.cat([x, x]), torch.cat([t, t]), y=torch.cat([y, y]), null=null, **model_kwargs)
    return out[:batch], out[batch:]


def guided_eps(eps_cond: Tensor, eps_null: Tensor, w: float) -> Tensor:
    """Guided noise prediction ``(1 + w) * eps_cond - w * eps_null`` (same shape as the inputs)."""
    return (1.0 + w) * eps_cond - w * eps_null
