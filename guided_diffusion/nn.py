"""Small neural-network helpers shared by the UNets: layer factories, GroupNorm32, the sinusoidal
timestep embedding and an activation-checkpoint wrapper."""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

NORM_GROUPS = 32


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 (also under autocast) and cast back to the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device_type = x.device.type
        if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
            with torch.autocast(device_type, enabled=False):
                return self._fp32(x)
        return self._fp32(x)

    def _fp32(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        out = F.group_norm(x.float(), self.num_groups, weight, bias, self.eps)
        return out.to(x.dtype)


def normalization(channels: int) -> GroupNorm32:
    """GroupNorm32 with 32 groups (the upstream choice).

    Widths that are not a multiple of 32 (only tiny test models) use gcd(32, channels) groups; the
    parameters (per-channel weight and bias) are the same either way.
    """
    groups = NORM_GROUPS if channels % NORM_GROUPS == 0 else math.gcd(NORM_GROUPS, channels)
    return GroupNorm32(groups, channels)


def conv_nd(dims: int, *args: Any, **kwargs: Any) -> nn.Module:
    """Conv1d / Conv2d / Conv3d for ``dims`` = 1, 2, 3."""
    convs = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
    if dims not in convs:
        raise ValueError(f"conv_nd: dims must be 1, 2 or 3, got {dims}")
    return convs[dims](*args, **kwargs)


def avg_pool_nd(dims: int, *args: Any, **kwargs: Any) -> nn.Module:
    """AvgPool1d / AvgPool2d / AvgPool3d for ``dims`` = 1, 2, 3."""
    pools = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}
    if dims not in pools:
        raise ValueError(f"avg_pool_nd: dims must be 1, 2 or 3, got {dims}")
    return pools[dims](*args, **kwargs)


def linear(*args: Any, **kwargs: Any) -> nn.Linear:
    """nn.Linear (kept as a factory for symmetry with conv_nd)."""
    return nn.Linear(*args, **kwargs)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter of ``module`` in place and return it."""
    for p in module.parameters():
        p.detach().zero_()
    return module


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal timestep embedding.

    Args:
        timesteps: [B] integer or float timesteps.
        dim: embedding width; first half cosines, second half sines (a zero column is appended
            when ``dim`` is odd).
        max_period: frequencies are exp(-ln(max_period) * i / (dim // 2)), i = 0 .. dim//2 - 1.
    Returns:
        [B, dim] float32 tensor.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps.reshape(-1).float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


_CPU_FUSED_ATTENTION: contextvars.ContextVar[bool] = contextvars.ContextVar("cpu_fused_attention",
                                                                           default=False)


@contextlib.contextmanager
def cpu_fused_attention(enabled: bool = True) -> Iterator[None]:
    """Within this block, attention on the CPU uses torch's fused (flash) kernel, as it always does on an
    accelerator: about 6x faster at 1024 tokens (one thread, [16, 4, 1024, 8], forward and backward) and
    without the [T, T] matrix in memory, but not bit-identical to the default exact path, whose results the
    tests and the shipped model pin (``--cpu_fused_attention``, docs/speed.md)."""
    token = _CPU_FUSED_ATTENTION.set(bool(enabled))
    try:
        yield
    finally:
        _CPU_FUSED_ATTENTION.reset(token)


def attention_channels_first(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(qᵀk / √d) v for q [B, heads, d, Tq], k and v [B, heads, d, Tk] -> [B, heads, Tq, d].

    On an accelerator the tokens-first views are made contiguous first: the fused (flash, memory-efficient)
    kernels need the last dimension contiguous, and the math kernel they otherwise fall back to computes
    bf16 in fp32 (measured on an H200, [128, 4, 1024, 64]: 8.3 ms strided vs 0.36 ms contiguous in bf16;
    see docs/speed.md). On the CPU the strided call is kept, so CPU results stay bit for bit as pinned,
    unless inside ``cpu_fused_attention()``.
    """
    q, k, v = (z.transpose(-1, -2) for z in (q, k, v))
    if q.device.type != "cpu" or _CPU_FUSED_ATTENTION.get():
        q, k, v = (z.contiguous() for z in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v)


def checkpoint(func: Callable[..., Any], *args: Any, enabled: bool) -> Any:
    """Run ``func(*args)``, recomputing its activations in the backward pass when ``enabled`` and
    gradients are on (torch.utils.checkpoint, non-reentrant, RNG state preserved for dropout)."""
    if enabled and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(func, *args, use_reentrant=False)
    return func(*args)


def checks_on_host(t: torch.Tensor) -> bool:
    """True when ``t`` lives in host memory, where value checks (ranges, labels) cost no device
    synchronisation. On an accelerator the code skips them and lets the device lookup fail instead, so a
    step loop never waits for the device (issue 11); inside torch.compile too (no graph break)."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def count_parameters(model: nn.Module) -> int:
    """Number of parameters of ``model`` (every parameter, trainable or not; works on the meta device)."""
    return sum(p.numel() for p in model.parameters())


def format_param_count(n: int) -> str:
    """The one way a parameter count is printed: ``"571,234 parameters (0.57 M)"``, M = 10**6 (SI)."""
    return f"{int(n):,} parameters ({int(n) / 1e6:.2f} M)"
