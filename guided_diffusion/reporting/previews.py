"""Training previews: DDIM/DDPM samples from the EMA weights written as PNG grids, without touching the
training RNG streams (exact resume depends on it)."""

from __future__ import annotations

import contextlib
import copy
import io
import math
import random
from collections.abc import Mapping, Sequence
from typing import Any

import blobfile as bf
import numpy as np
import torch

from guided_diffusion.utils import logger
from guided_diffusion.utils.io_util import atomic_write_bytes


def image_grid_png(x: torch.Tensor, pad: int = 2) -> bytes:
    """PNG bytes of a grey-scale grid of ``x`` [N, C, H, W] in [-1, 1]: one row per sample with its C
    channels side by side (C > 1), or rows of up to 8 samples (C = 1)."""
    from PIL import Image

    x = ((x.clamp(-1, 1) + 1) / 2).numpy()
    n, c, h, w = x.shape
    tiles = [x[i, j] for i in range(n) for j in range(c)]
    cols = c if c > 1 else min(n, 8)
    rows = math.ceil(len(tiles) / cols)
    grid = np.ones((rows * (h + pad) + pad, cols * (w + pad) + pad), dtype=np.float32)
    for k, tile in enumerate(tiles):
        r, col = divmod(k, cols)
        y0, x0 = pad + r * (h + pad), pad + col * (w + pad)
        grid[y0:y0 + h, x0:x0 + w] = tile
    buf = io.BytesIO()
    Image.fromarray((grid * 255).round().astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def ema_copy(model: torch.nn.Module, ema: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """A copy of ``model`` holding the parameters in ``ema`` ({name: tensor}), in eval mode."""
    m = copy.deepcopy(model)
    named = dict(m.named_parameters())
    with torch.no_grad():
        for n, value in ema.items():
            named[n].copy_(value)
    return m.eval()


def write_previews(
    model: torch.nn.Module,
    diffusion: Any,
    shape: Sequence[int],
    ws: Sequence[float | None],
    *,
    step: int,
    image_dir: str,
    noise_seed: int,
    device: torch.device,
    num_classes: int | None,
    ddpm: bool = False,
    autocast: contextlib.AbstractContextManager | None = None,
) -> list[str]:
    """Sample ``shape`` (N, C, H, W) with ``model`` once per guidance strength (None: plain conditional)
    and write ``{step:06d}_{tag}.png`` grids to ``image_dir``; returns the paths. The global RNG states
    are restored afterwards."""
    n, c, h, w = shape
    paths = []
    devices = [device] if device.type == "cuda" else []
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=devices), torch.no_grad(), autocast or contextlib.nullcontext():
        gen = torch.Generator(device=device)
        gen.manual_seed(noise_seed)
        noise = torch.randn((n, c, h, w), generator=gen, device=device)
        kwargs = {}
        if num_classes:
            kwargs["y"] = torch.tensor([0] * (n // 2) + [1] * (n - n // 2), device=device).clamp(
                max=num_classes - 1)
        loop = diffusion.p_sample_loop if ddpm else diffusion.ddim_sample_loop
        for guidance in ws:
            if guidance is not None and not num_classes:
                continue
            sample = loop(model, (n, c, h, w), noise=noise.clone(), w=guidance, clip_denoised=True,
                          model_kwargs=kwargs, device=device, generator=gen)
            tag = "cond" if guidance is None else f"w{guidance:g}"
            if not num_classes:
                tag = "uncond"
            path = bf.join(image_dir, f"{step:06d}_{tag}.png")
            atomic_write_bytes(image_grid_png(sample.float().cpu()), path)
            paths.append(path)
    random.setstate(py_state)
    np.random.set_state(np_state)
    logger.log(f"wrote {len(paths)} preview grid(s) to {image_dir}")
    return paths
