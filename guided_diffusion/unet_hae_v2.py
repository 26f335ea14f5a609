"""HAE UNet V2 (``unet_ver="hae_v2"``): HAE Lite with a bottleneck token MLP.

Differences from HAE Lite (docs/hae.md, 'Bottleneck MLP of HAE V2'): the MSTB's MLP is ``BottleneckMLP``
(``C → ⌊r·C⌋ → C``, ``bottleneck_ratio`` r ∈ (0, 1], default 0.25) instead of ``C → 4C → C``.
Everything else (shared 1×1 local projection, average-pooled regional tokens at p = 4, 8, average
fusion, zero-initialised fusion conv) is the Lite design, inherited: the classes below subclass
Lite's, override the ``make_mlp`` hook and take ``bottleneck_ratio``, the option this variant owns
(a keyword-only argument of ``HAEUNetModelV2``, handed to the blocks as ``block_options``).
"""

from __future__ import annotations

import math
from typing import Any

from guided_diffusion.hae_blocks import TokenMLP, check_bottleneck_ratio
from guided_diffusion.registry import register_model
from guided_diffusion.unet_hae_lite import (
    HAEUNetModelLite,
    HybridCNNTransformerBlockLite,
    MultiScaleSparseTransformerBlockLite,
)

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


class MultiScaleSparseTransformerBlockV2(MultiScaleSparseTransformerBlockLite):
    """MSTB of HAE V2: Lite tokenisation (1×1 projection + pooling) and a ``BottleneckMLP``.

    Input/output ``[B, C, H, W]``; C must be a multiple of 8.
    """

    def __init__(self, channels: int, bottleneck_ratio: float = DEFAULT_BOTTLENECK_RATIO,
                 dropout: float = 0.0):
        super().__init__(channels, dropout, bottleneck_ratio=bottleneck_ratio)

    @classmethod
    def make_mlp(cls, channels: int, dropout: float,  # type: ignore[override]
                 bottleneck_ratio: float = DEFAULT_BOTTLENECK_RATIO) -> BottleneckMLP:
        """The bottleneck token MLP ``C → ⌊r·C⌋ → C``."""
        return BottleneckMLP(channels, bottleneck_ratio, dropout)


class HybridCNNTransformerBlockV2(HybridCNNTransformerBlockLite):
    """Hybrid CNN-Transformer block of HAE V2 (average fusion, 1×1 conv C→C, zero-initialised).

    Forward: ``x [B, C, H, W]``, ``emb [B, emb_channels]`` → ``[B, C, H, W]``.
    """

    MSTB = MultiScaleSparseTransformerBlockV2

    def __init__(self, channels: int, emb_channels: int, dropout: float = 0.0,
                 bottleneck_ratio: float = DEFAULT_BOTTLENECK_RATIO, use_checkpoint: bool = False):
        super().__init__(channels, emb_channels, dropout, use_checkpoint, bottleneck_ratio=bottleneck_ratio)


@register_model("hae_v2")
class HAEUNetModelV2(HAEUNetModelLite):
    """FPDM UNet skeleton (SiLU ResBlocks) with a ``HybridCNNTransformerBlockV2`` per decoder level
    except the finest.

    Args: the ``UNetModel`` arguments, plus the options of this variant (keyword-only): ``use_hae``
    (False → no hybrid blocks) and ``bottleneck_ratio`` (r ∈ (0, 1]).
    """

    HYBRID_BLOCK = HybridCNNTransformerBlockV2

    def __init__(self, *args: Any, use_hae: bool = True, bottleneck_ratio: float = DEFAULT_BOTTLENECK_RATIO,
                 **kwargs: Any):
        check_bottleneck_ratio(bottleneck_ratio)
        ratio = float(bottleneck_ratio)
        super().__init__(*args, use_hae=use_hae, block_options={"bottleneck_ratio": ratio}, **kwargs)
        self.bottleneck_ratio = ratio
