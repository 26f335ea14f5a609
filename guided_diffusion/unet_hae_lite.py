"""HAE UNet Lite (``unet_ver="hae_lite"``).

Relative to HAE (docs/hae.md, 'Multi-scale sparse attention'): a shared 1×1 conv C→C gives the local map, the
regional tokens are its 4×4 and 8×8 average pools (no per-patch Linear), and the branches are fused
by averaging followed by a 1×1 conv C→C.  The MSTB MLP is the standard ``C → 4C → C``.  Only these
choices differ from HAE, so the classes below override HAE's class attributes and nothing else
(the one way an HAE variant is built from its parent, see ``hae_blocks``); its option is HAE's
``use_hae``.
"""

from __future__ import annotations

from guided_diffusion.registry import register_model
from guided_diffusion.unet_hae import (
    HAEUNetModel,
    HybridCNNTransformerBlock,
    MultiScaleSparseTransformerBlock,
)


class MultiScaleSparseTransformerBlockLite(MultiScaleSparseTransformerBlock):
    """MSTB of HAE Lite: 1×1 projection, pooled regional tokens, MLP C→4C→C (``[B, C, H, W]``)."""

    PATCH_EMBED = False
    LOCAL_PROJ = True


class HybridCNNTransformerBlockLite(HybridCNNTransformerBlock):
    """Hybrid block of HAE Lite: average fusion, zero-initialised 1×1 conv C→C."""

    FUSION = "average"
    MSTB = MultiScaleSparseTransformerBlockLite


@register_model("hae_lite")
class HAEUNetModelLite(HAEUNetModel):
    """FPDM UNet skeleton with a ``HybridCNNTransformerBlockLite`` per decoder level except the finest."""

    HYBRID_BLOCK = HybridCNNTransformerBlockLite

