"""The model registry: ``unet_ver`` name -> builder ``builder(**unet_kwargs) -> nn.Module``.

Variant modules register their builder with ``@register_model(name)``; ``guided_diffusion.variants``
imports every variant explicitly (one line each), so the registry is complete once it is imported.
This module imports nothing of the package, so variants can import it without a cycle.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

Builder = Callable[..., nn.Module]
MODEL_REGISTRY: dict[str, Builder] = {}


def register_model(name: str) -> Callable[[Builder], Builder]:
    """Decorator registering ``builder(**model_kwargs) -> nn.Module`` under ``unet_ver`` = ``name``."""

    def wrap(builder: Builder) -> Builder:
        old = MODEL_REGISTRY.get(name)
        ident = (builder.__module__, builder.__qualname__)
        if old is not None and (old.__module__, old.__qualname__) != ident:
            raise ValueError(
                f"unet_ver {name!r} is already registered by {old.__module__}.{old.__qualname__}"
            )
        MODEL_REGISTRY[name] = builder
        return builder

    return wrap


def get_builder(name: str) -> Builder:
    """The builder registered as ``name``; ValueError listing the valid names otherwise."""
    if name not in MODEL_REGISTRY:
        raise ValueError(f"unknown --unet_ver {name!r}; valid names: {', '.join(sorted(MODEL_REGISTRY))}")
    return MODEL_REGISTRY[name]
