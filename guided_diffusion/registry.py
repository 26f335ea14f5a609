"""The model registry: ``unet_ver`` name -> builder ``builder(**unet_kwargs, **options) -> nn.Module``.

Variant modules register their builder with ``@register_model(name)`` (or ``register_model(name)(cls)``);
``guided_diffusion.variants`` imports every variant explicitly (one line each), so the registry is
complete once it is imported. This module imports nothing of the package, so variants can import it
without a cycle.

A variant owns its options: they are the keyword-only parameters of its builder (``def build(*,
use_hae: bool = True, **unet_kwargs)``, or a class whose ``__init__(self, *args, use_hae=True, **kw)``),
each with a default. The factory (``script_util.create_model``) hands every builder the shared UNet
arguments plus, through ``options_for``, only the options that builder declares; an option of another
variant is dropped while it holds its default and refused (one line naming both variants) otherwise.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

Builder = Callable[..., nn.Module]
MODEL_REGISTRY: dict[str, Builder] = {}


def declared_options(builder: Builder) -> dict[str, Any]:
    """{option: default} of a builder: its keyword-only parameters, in signature order."""
    params = inspect.signature(builder).parameters.values()
    return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def _check_options(name: str, builder: Builder) -> None:
    """ValueError when an option of ``builder`` has no default, or a default unlike another variant's."""
    for option, default in declared_options(builder).items():
        if default is inspect.Parameter.empty:
            raise ValueError(f"unet_ver {name!r}: option {option!r} of its builder needs a default value")
        for other, other_builder in MODEL_REGISTRY.items():
            theirs = declared_options(other_builder).get(option, default)
            if other != name and theirs != default:
                raise ValueError(f"unet_ver {name!r}: option {option!r} defaults to {default!r}, but "
                                 f"{other!r} declares it with default {theirs!r}; one flag has one default")


def register_model(name: str) -> Callable[[Builder], Builder]:
    """Decorator registering ``builder(**model_kwargs) -> nn.Module`` under ``unet_ver`` = ``name``; the
    builder's keyword-only parameters (each with a default) are the variant's own options."""

    def wrap(builder: Builder) -> Builder:
        old = MODEL_REGISTRY.get(name)
        ident = (builder.__module__, builder.__qualname__)
        if old is not None and (old.__module__, old.__qualname__) != ident:
            raise ValueError(
                f"unet_ver {name!r} is already registered by {old.__module__}.{old.__qualname__}"
            )
        _check_options(name, builder)
        MODEL_REGISTRY[name] = builder
        return builder

    return wrap


def get_builder(name: str) -> Builder:
    """The builder registered as ``name``; ValueError listing the valid names otherwise."""
    if name not in MODEL_REGISTRY:
        raise ValueError(f"unknown --unet_ver {name!r}; valid names: {', '.join(sorted(MODEL_REGISTRY))}")
    return MODEL_REGISTRY[name]


def variant_options(name: str) -> dict[str, Any]:
    """{option: default} that variant ``name`` declares (ValueError for an unknown name)."""
    return declared_options(get_builder(name))


def all_options() -> dict[str, Any]:
    """{option: default} of every registered variant (a shared option has one default)."""
    out: dict[str, Any] = {}
    for builder in MODEL_REGISTRY.values():
        out.update(declared_options(builder))
    return out


def option_owners(option: str) -> list[str]:
    """The registered variants declaring ``option``, sorted."""
    return sorted(n for n, b in MODEL_REGISTRY.items() if option in declared_options(b))


def options_for(name: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """The options to pass variant ``name``'s builder, out of ``values`` (option -> value; None = not
    given).

    Its own options are passed (None ones left to the builder's default). An option of other variants
    that is None or equal to its default is dropped (a flag left at its default); with any other value it
    is refused with one line, e.g. "--bottleneck_ratio is an option of hae_v2, not of v2". A name that
    no variant declares is refused too.
    """
    own = variant_options(name)
    passed: dict[str, Any] = {}
    for option, value in values.items():
        if option in own:
            if value is not None:
                passed[option] = value
            continue
        owners = option_owners(option)
        if not owners:
            known = ", ".join(sorted(all_options())) or "none"
            raise ValueError(f"--{option} is not an option of any network variant (variant options: {known})")
        if value is None or value == declared_options(MODEL_REGISTRY[owners[0]])[option]:
            continue
        raise ValueError(f"--{option} is an option of {', '.join(owners)}, not of {name}")
    return passed


def drop_foreign_options(record: Mapping[str, Any], unet_ver: str | None = None) -> dict[str, Any]:
    """``record`` (saved flags or a resolved model config) without the options of variants other than
    ``unet_ver`` (default: ``record["unet_ver"]``), whatever their value; unchanged when neither names a
    variant.

    Records written before variants owned their options hold e.g. ``bottleneck_ratio`` for a ``v2`` or
    ``hae`` model; such a value was never used by that network, so it is not a setting of the record.
    """
    name = unet_ver or record.get("unet_ver")
    if name is None:
        return dict(record)
    own = set(variant_options(name)) if name in MODEL_REGISTRY else set()
    foreign = set(all_options()) - own
    return {k: v for k, v in record.items() if k not in foreign}
