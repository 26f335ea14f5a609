"""HAE UNet V2 (``unet_ver="hae_v2"``): HAE Lite with a bottleneck token MLP.

Differences from HAE Lite (docs/hae.md, 'Bottleneck MLP of HAE V2'): the MSTB's MLP is ``BottleneckMLP``
(``C → ⌊r·C⌋ → C``, ``bottleneck_ratio`` r ∈ (0, 1], default 0.25) instead of ``C → 4C → C``.
Everything else (shared 1×1 local projection, average-pooled regional tokens at p = 4, 8, average
fusion, zero-initialised fusion conv) is the Lite design, implemented once in ``hae_blocks``.
"""

from __future__ import annotations

import functools
import math

from guided_diffusion.hae_blocks import (
    HAEUNetBase,
    HybridCNNTransformerBlockBase,
    MultiScaleSparseTransformerBlockBase,
    TokenMLP,
    check_bottleneck_ratio,
)
from guided_diffusion.registry import register_model

DEFAULT_BOTTLENECK_RATIO = 0.25


class BottleneckMLP(TokenMLP):
    """Token MLP ``Linear(C→⌊rC⌋) → GELU → Dropout → Linear(⌊rC⌋→C) → Dropout``.

    Args:
        hidden_size: C, the token width.
        bottleneck_ratio: r ∈ (0, 1]; the hidden width is ⌊r·C⌋.
        dropout: dropout probability of both Dropout layers.
    """

    def __init__(self, hidden_size: int, bottleneck_ratio: float = DEFAULT_BOTTLENECK_RATIO,
                 dropout: float = 0.1):
        check_bottleneck_ratio(bottleneck_ratio, hidden_size)
        super().__init__(hidden_size, int(math.floor(float(bottleneck_ratio) * hidden_size)), dropout)
        self.bottleneck_ratio = float(bottleneck_ratio)


class MultiScaleSparseTransformerBlockV2(MultiScaleSparseTransformerBlockBase):
    """MSTB of HAE V2: Lite tokenisation (1×1 projection + pooling) and a ``BottleneckMLP``.

    Input/output ``[B, C, H, W]``; C must be a multiple of 8.
    """

    def __init__(self, channels: int, bottleneck_ratio: float = DEFAULT_BOTTLENECK_RATIO,
                 dropout: float = 0.0):
        super().__init__(channels, BottleneckMLP(channels, bottleneck_ratio, dropout),
                         patch_embed=False, local_proj=True)


class HybridCNNTransformerBlockV2(HybridCNNTransformerBlockBase):
    """Hybrid CNN-Transformer block of HAE V2 (average fusion, 1×1 conv C→C, zero-initialised).

    Forward: ``x [B, C, H, W]``, ``emb [B, emb_channels]`` → ``[B, C, H, W]``.
    """

    def __init__(self, channels: int, emb_channels: int, dropout: float = 0.0,
                 bottleneck_ratio: float = DEFAULT_BOTTLENECK_RATIO, use_checkpoint: bool = False):
        super().__init__(channels, emb_channels,
                         MultiScaleSparseTransformerBlockV2(channels, bottleneck_ratio, dropout),
                         fusion="average", use_checkpoint=use_checkpoint)


class HAEUNetModelV2(HAEUNetBase):
    """FPDM UNet skeleton (SiLU ResBlocks) with a ``HybridCNNTransformerBlockV2`` per decoder level
    except the finest.

    Args: the ``UNetModel`` arguments, plus ``bottleneck_ratio`` (r ∈ (0, 1]) and ``use_hae``
    (False → no hybrid blocks).
    """

    def __init__(self, *args, bottleneck_ratio: float = DEFAULT_BOTTLENECK_RATIO, use_hae: bool = True,
                 **kwargs):
        check_bottleneck_ratio(bottleneck_ratio)
        block = functools.partial(HybridCNNTransformerBlockV2, bottleneck_ratio=float(bottleneck_ratio))
        super().__init__(*args, hybrid_block=block, use_hae=use_hae, **kwargs)
        self.bottleneck_ratio = float(bottleneck_ratio)


@register_model("hae_v2")
def build_hae_v2(bottleneck_ratio: float = DEFAULT_BOTTLENECK_RATIO, use_hae: bool = True,
                 **unet_kwargs) -> HAEUNetModelV2:
    """Registry builder for ``unet_ver="hae_v2"`` (keyword args of ``UNetModel`` + HAE flags)."""
    return HAEUNetModelV2(bottleneck_ratio=bottleneck_ratio, use_hae=use_hae, **unet_kwargs)
