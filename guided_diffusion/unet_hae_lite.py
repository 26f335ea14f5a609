"""HAE UNet Lite (``unet_ver="hae_lite"``).

Relative to HAE (``hae_architecture.md`` §2–3): a shared 1×1 conv C→C gives the local map, the
regional tokens are its 4×4 and 8×8 average pools (no per-patch Linear), and the branches are fused
by averaging followed by a 1×1 conv C→C.  The MSTB MLP is the standard ``C → 4C → C``.
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


class MultiScaleSparseTransformerBlockLite(MultiScaleSparseTransformerBlockBase):
    """MSTB of HAE Lite: 1×1 projection, pooled regional tokens, MLP C→4C→C.

    Input/output ``[B, C, H, W]``; C must be a multiple of 8.
    """

    def __init__(self, channels: int, dropout: float = 0.0):
        super().__init__(channels, TokenMLP(channels, MLP_EXPANSION * channels, dropout),
                         patch_embed=False, local_proj=True)


class HybridCNNTransformerBlockLite(HybridCNNTransformerBlockBase):
    """Hybrid block of HAE Lite (average fusion, zero-initialised 1×1 conv C→C).

    Forward: ``x [B, C, H, W]``, ``emb [B, emb_channels]`` → ``[B, C, H, W]``.
    """

    def __init__(self, channels: int, emb_channels: int, dropout: float = 0.0, use_checkpoint: bool = False):
        super().__init__(channels, emb_channels, MultiScaleSparseTransformerBlockLite(channels, dropout),
                         fusion="average", use_checkpoint=use_checkpoint)


class HAEUNetModelLite(HAEUNetBase):
    """FPDM UNet skeleton (SiLU ResBlocks) with a ``HybridCNNTransformerBlockLite`` per decoder level
    except the finest.  Args: the ``UNetModel`` arguments plus ``use_hae``."""

    def __init__(self, *args, use_hae: bool = True, **kwargs):
        super().__init__(*args, hybrid_block=HybridCNNTransformerBlockLite, use_hae=use_hae, **kwargs)


@register_model("hae_lite")
def build_hae_lite(use_hae: bool = True, bottleneck_ratio: float | None = None,
                   **unet_kwargs) -> HAEUNetModelLite:
    """Registry builder for ``unet_ver="hae_lite"`` (``bottleneck_ratio`` is accepted and unused)."""
    return HAEUNetModelLite(use_hae=use_hae, **unet_kwargs)
