"""HAE UNet (``unet_ver="hae"``), the design closest to the HAE paper.

The MSTB's regional tokens are patch embeddings: every non-overlapping p×p patch (p = 4, 8) of the
block input is flattened and projected by its scale's ``Linear(C·p² → C)``; the local tokens are the
block input itself (no 1×1 projection).  The two branches are concatenated and fused by a
zero-initialised 1×1 conv 2C→C.  The MLP is ``C → 4C → C``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

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

    Input/output ``[B, C, H, W]``; C must be a multiple of 8.  Subclasses change the token layout by
    overriding the class attributes ``PATCH_EMBED`` / ``LOCAL_PROJ`` and the MLP by ``make_mlp``;
    ``options`` (a variant's own, e.g. ``bottleneck_ratio``) go to ``make_mlp``.
    """

    PATCH_EMBED = True
    LOCAL_PROJ = False

    def __init__(self, channels: int, dropout: float = 0.0, **options: Any):
        super().__init__(channels, self.make_mlp(channels, dropout, **options),
                         patch_embed=self.PATCH_EMBED, local_proj=self.LOCAL_PROJ)

    @classmethod
    def make_mlp(cls, channels: int, dropout: float) -> nn.Module:
        """The token MLP (built before the block's own layers): ``C → 4C → C``."""
        return TokenMLP(channels, MLP_EXPANSION * channels, dropout)


class HybridCNNTransformerBlock(HybridCNNTransformerBlockBase):
    """Hybrid block of HAE (concatenation fusion, zero-initialised 1×1 conv 2C→C).

    Forward: ``x [B, C, H, W]``, ``emb [B, emb_channels]`` → ``[B, C, H, W]``.  Subclasses override
    ``FUSION`` and ``MSTB`` (the MSTB class); ``options`` are handed to the MSTB.
    """

    FUSION = "concat"
    MSTB: type[MultiScaleSparseTransformerBlock] = MultiScaleSparseTransformerBlock

    def __init__(self, channels: int, emb_channels: int, dropout: float = 0.0, use_checkpoint: bool = False,
                 **options: Any):
        super().__init__(channels, emb_channels, self.MSTB(channels, dropout=dropout, **options),
                         fusion=self.FUSION, use_checkpoint=use_checkpoint)


@register_model("hae")
class HAEUNetModel(HAEUNetBase):
    """FPDM UNet skeleton (SiLU ResBlocks) with a ``HYBRID_BLOCK`` (here ``HybridCNNTransformerBlock``)
    per decoder level except the finest.

    Args: the ``UNetModel`` arguments plus the variant's options, its keyword-only arguments (registry
    options): ``use_hae`` (False → no hybrid blocks).  A subclass adding an option takes it as a
    keyword-only argument and hands it to the blocks as ``block_options``.
    """

    HYBRID_BLOCK: type[HybridCNNTransformerBlock] = HybridCNNTransformerBlock

    def __init__(self, *args: Any, use_hae: bool = True, **kwargs: Any):
        super().__init__(*args, hybrid_block=self.HYBRID_BLOCK, use_hae=use_hae, **kwargs)
