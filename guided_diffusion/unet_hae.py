"""HAE UNet (``unet_ver="hae"``), the design closest to the HAE paper.

The MSTB's regional tokens are patch embeddings: every non-overlapping p×p patch (p = 4, 8) of the
block input is flattened and projected by its scale's ``Linear(C·p² → C)``; the local tokens are the
block input itself (no 1×1 projection).  The two branches are concatenated and fused by a
zero-initialised 1×1 conv 2C→C.  The MLP is ``C → 4C → C``.
"""

from __future__ import annotations

from guided_diffusion.hae_blocks import (
    MLP_EXPANSION,
    HAEUNetBase,
    HybridCNNTransformerBlockBase,
    MultiScaleSparseTransformerBlockBase,
    TokenMLP,
)
from guided_diffusion.registry import register_model


class MultiScaleSparseTransformerBlock(MultiScaleSparseTransformerBlockBase):
    """MSTB of HAE: patch-embedded regional tokens, no local projection, MLP C→4C→C.

    Input/output ``[B, C, H, W]``; C must be a multiple of 8.
    """

    def __init__(self, channels: int, dropout: float = 0.0):
        super().__init__(channels, TokenMLP(channels, MLP_EXPANSION * channels, dropout),
                         patch_embed=True, local_proj=False)


class HybridCNNTransformerBlock(HybridCNNTransformerBlockBase):
    """Hybrid block of HAE (concatenation fusion, zero-initialised 1×1 conv 2C→C).

    Forward: ``x [B, C, H, W]``, ``emb [B, emb_channels]`` → ``[B, C, H, W]``.
    """

    def __init__(self, channels: int, emb_channels: int, dropout: float = 0.0, use_checkpoint: bool = False):
        super().__init__(channels, emb_channels, MultiScaleSparseTransformerBlock(channels, dropout),
                         fusion="concat", use_checkpoint=use_checkpoint)


class HAEUNetModel(HAEUNetBase):
    """FPDM UNet skeleton (SiLU ResBlocks) with a ``HybridCNNTransformerBlock`` per decoder level
    except the finest.  Args: the ``UNetModel`` arguments plus ``use_hae``."""

    def __init__(self, *args, use_hae: bool = True, **kwargs):
        super().__init__(*args, hybrid_block=HybridCNNTransformerBlock, use_hae=use_hae, **kwargs)


@register_model("hae")
def build_hae(use_hae: bool = True, bottleneck_ratio: float | None = None, **unet_kwargs) -> HAEUNetModel:
    """Registry builder for ``unet_ver="hae"`` (``bottleneck_ratio`` is accepted and unused)."""
    return HAEUNetModel(use_hae=use_hae, **unet_kwargs)
