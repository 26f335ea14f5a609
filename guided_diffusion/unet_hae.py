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

    Input/output ``[B, C, H, W]``; C must be a multiple of 8.  Subclasses change the token layout by
    overriding the class attributes ``PATCH_EMBED`` / ``LOCAL_PROJ``.
    """

    PATCH_EMBED = True
    LOCAL_PROJ = False

    def __init__(self, channels: int, dropout: float = 0.0):
        super().__init__(channels, TokenMLP(channels, MLP_EXPANSION * channels, dropout),
                         patch_embed=self.PATCH_EMBED, local_proj=self.LOCAL_PROJ)


class HybridCNNTransformerBlock(HybridCNNTransformerBlockBase):
    """Hybrid block of HAE (concatenation fusion, zero-initialised 1×1 conv 2C→C).

    Forward: ``x [B, C, H, W]``, ``emb [B, emb_channels]`` → ``[B, C, H, W]``.  Subclasses override
    ``FUSION`` and ``MSTB`` (the MSTB class).
    """

    FUSION = "concat"
    MSTB: type[MultiScaleSparseTransformerBlockBase] = MultiScaleSparseTransformerBlock

    def __init__(self, channels: int, emb_channels: int, dropout: float = 0.0, use_checkpoint: bool = False):
        super().__init__(channels, emb_channels, self.MSTB(channels, dropout),
                         fusion=self.FUSION, use_checkpoint=use_checkpoint)


class HAEUNetModel(HAEUNetBase):
    """FPDM UNet skeleton (SiLU ResBlocks) with a ``HYBRID_BLOCK`` (here ``HybridCNNTransformerBlock``)
    per decoder level except the finest.  Args: the ``UNetModel`` arguments plus ``use_hae``."""

    HYBRID_BLOCK: type[HybridCNNTransformerBlockBase] = HybridCNNTransformerBlock

    def __init__(self, *args, use_hae: bool = True, **kwargs):
        super().__init__(*args, hybrid_block=self.HYBRID_BLOCK, use_hae=use_hae, **kwargs)

    @classmethod
    def build(cls, use_hae: bool = True, bottleneck_ratio: float | None = None,
              **unet_kwargs) -> HAEUNetModel:
        """Registry builder (keyword args of ``UNetModel`` + ``use_hae``; ``bottleneck_ratio`` is accepted
        and unused: it belongs to HAE V2)."""
        return cls(use_hae=use_hae, **unet_kwargs)


register_model("hae")(HAEUNetModel.build)
