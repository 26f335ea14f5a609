"""Every network variant, imported explicitly so that its ``@register_model`` builder runs.

To add a variant: write its module with ``@register_model("name")`` (from ``guided_diffusion.registry``)
and add one import line below. Its options are its builder's keyword-only parameters (each with a
default): the factory hands it those and no other variant's (see ``registry.options_for``).
"""

from __future__ import annotations

from typing import Any

from guided_diffusion import unet_hae, unet_hae_lite, unet_hae_v2, unet_v1
from guided_diffusion.registry import MODEL_REGISTRY, Builder, get_builder, register_model
from guided_diffusion.unet import UNetModel

VARIANT_MODULES = (unet_hae, unet_hae_lite, unet_hae_v2, unet_v1)  # imported for their registration

__all__ = ["MODEL_REGISTRY", "VARIANT_MODULES", "build_fpdm_unet", "builder"]


@register_model("v2")
def build_fpdm_unet(**kwargs: Any) -> UNetModel:
    """The AnoFPDM UNet: upstream UNet v2, missing SiLU activations included (no options of its own)."""
    return UNetModel(resblock_activation=False, **kwargs)


def builder(name: str) -> Builder:
    """The builder of ``unet_ver`` ``name`` (every variant above is registered)."""
    return get_builder(name)
