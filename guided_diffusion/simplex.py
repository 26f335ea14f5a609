"""Vectorised multi-octave 2-D simplex noise in torch (AnoDDPM (S), Wyatt et al. 2022).

Each [H, W] slice of every sample and channel is an independent fractal sum of 2-D simplex noise:
``sum_o persistence**o * simplex(col / wl_o + ox_o, row / wl_o + oy_o)`` with wavelength
``wl_o = frequency / 2**o`` pixels (upstream's ``frequency`` is the first octave's wavelength; it halves
every octave), then normalised to zero mean and unit variance per slice so that it can replace N(0, I) in
``q_sample`` and in the reverse chain. Defaults are upstream's (octaves 6, persistence 0.8, frequency 64).
Randomness (one permutation table and one offset per slice and octave) comes from ``generator`` only, so
a seeded generator gives the same noise on every call (on other devices up to float64 rounding).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_F2 = 0.5 * (math.sqrt(3.0) - 1.0)
_G2 = (3.0 - math.sqrt(3.0)) / 6.0
# 8 gradient directions of the 2-D lattice
_GRADS = ((1.0, 1.0), (-1.0, 1.0), (1.0, -1.0), (-1.0, -1.0),
          (1.0, 0.0), (-1.0, 0.0), (0.0, 1.0), (0.0, -1.0))


def _simplex2d(xs: Tensor, ys: Tensor, perm: Tensor) -> Tensor:
    """Raw 2-D simplex noise (range about [-1, 1]) at points xs, ys [N, P] with tables perm [N, 512]."""
    grads = torch.tensor(_GRADS, dtype=xs.dtype, device=xs.device)
    s = (xs + ys) * _F2
    i = torch.floor(xs + s)
    j = torch.floor(ys + s)
    t = (i + j) * _G2
    x0 = xs - (i - t)
    y0 = ys - (j - t)
    i1 = (x0 > y0).to(xs.dtype)
    j1 = 1.0 - i1
    ii = i.long() & 255
    jj = j.long() & 255
    corners = ((x0, y0, 0, 0), (x0 - i1 + _G2, y0 - j1 + _G2, i1.long(), j1.long()),
               (x0 - 1.0 + 2.0 * _G2, y0 - 1.0 + 2.0 * _G2, 1, 1))
    total = torch.zeros_like(xs)
    for dx, dy, ci, cj in corners:
        h = torch.gather(perm, 1, ii + ci + torch.gather(perm, 1, jj + cj)) % len(_GRADS)
        g = grads[h]  # [N, P, 2]
        weight = (0.5 - dx * dx - dy * dy).clamp(min=0.0)
        total = total + weight ** 4 * (g[..., 0] * dx + g[..., 1] * dy)
    return 70.0 * total


def simplex_noise(shape: tuple[int, ...] | torch.Size, *, octaves: int = 6, persistence: float = 0.8,
                  frequency: float = 64.0, generator: torch.Generator | None = None,
                  device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Multi-octave simplex noise of ``shape`` [B, C, H, W], zero mean and unit variance per [H, W] slice.

    Args:
        octaves: number of fractal layers (>= 1).
        persistence: amplitude ratio of consecutive octaves (> 0).
        frequency: wavelength in pixels of the first octave (> 0); halves every octave.
        generator: source of all randomness (drawn on its own device); None uses the global RNG.
        device / dtype: of the returned tensor (computation is float64 on ``device``).
    """
    if len(shape) != 4 or any(int(s) < 1 for s in shape):
        raise ValueError(f"simplex_noise: shape must be [B, C, H, W] with positive sizes, got {tuple(shape)}")
    if int(octaves) < 1 or not persistence > 0 or not frequency > 0:
        raise ValueError(f"simplex_noise: need octaves >= 1, persistence > 0, frequency > 0; got "
                         f"octaves={octaves}, persistence={persistence}, frequency={frequency}")
    b, c, h, w = (int(s) for s in shape)
    n = b * c
    device = torch.device(device) if device is not None else torch.device("cpu")
    gen_device = generator.device if generator is not None else torch.device("cpu")
    perm = torch.argsort(torch.rand(n, 256, generator=generator, device=gen_device), dim=1)
    perm = torch.cat([perm, perm], dim=1).to(device)  # [N, 512]
    offsets = torch.rand(int(octaves), n, 2, generator=generator, device=gen_device, dtype=torch.float64)
    offsets = (offsets * 256.0).to(device)
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64, device=device),
                                torch.arange(w, dtype=torch.float64, device=device), indexing="ij")
    rows, cols = rows.reshape(1, -1), cols.reshape(1, -1)
    noise = torch.zeros(n, h * w, dtype=torch.float64, device=device)
    wavelength, amplitude = float(frequency), 1.0
    for o in range(int(octaves)):
        xs = cols / wavelength + offsets[o, :, :1]
        ys = rows / wavelength + offsets[o, :, 1:]
        noise = noise + amplitude * _simplex2d(xs, ys, perm)
        wavelength /= 2.0
        amplitude *= persistence
    noise = noise - noise.mean(dim=1, keepdim=True)
    noise = noise / noise.std(dim=1, keepdim=True).clamp(min=1e-12)
    return noise.reshape(b, c, h, w).to(dtype)


def simplex_noise_like(x: Tensor, generator: torch.Generator | None = None, **kwargs) -> Tensor:
    """``simplex_noise(x.shape, device=x.device, dtype=x.dtype, ...)`` for x [B, C, H, W]."""
    return simplex_noise(x.shape, generator=generator, device=x.device, dtype=x.dtype, **kwargs)
