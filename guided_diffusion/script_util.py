"""Flag defaults, model/diffusion factories and argparse helpers.

The networks come from the registry (``guided_diffusion.registry``), completed by
``guided_diffusion.variants``, which imports every variant explicitly; ``MODEL_REGISTRY`` and
``register_model`` are re-exported here. Nothing here knows a variant by name: each variant declares
its own options (its builder's keyword-only parameters) and ``create_model`` hands it only those
(``registry.options_for``: another variant's option is dropped at its default, refused otherwise).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn

from guided_diffusion import gaussian_diffusion as gd
from guided_diffusion import variants
from guided_diffusion.cli import add_dict_to_argparser, args_to_dict, str2bool
from guided_diffusion.configs.base import DiffusionConfig, ModelConfig
from guided_diffusion.registry import (
    MODEL_REGISTRY,
    all_options,
    drop_foreign_options,
    options_for,
    register_model,
    variant_options,
)
from guided_diffusion.respace import SpacedDiffusion, space_timesteps

# re-exported from registry / configs / cli (the guided-diffusion names)
__all__ = ["MODEL_REGISTRY", "add_dict_to_argparser", "args_to_dict", "drop_foreign_options",
           "register_model", "str2bool"]

# channel_mult chosen from the image size when --channel_mult is empty (docs/method.md, 'Model flags')
DEFAULT_CHANNEL_MULT: dict[int, tuple[float, ...]] = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
    32: (1, 2, 2, 2),
}

def diffusion_defaults() -> dict[str, Any]:
    """Defaults of the flags that define the Gaussian diffusion process (the fields of DiffusionConfig)."""
    return DiffusionConfig().to_dict()


def model_and_diffusion_defaults() -> dict[str, Any]:
    """Defaults of every model and diffusion flag (docs/method.md, 'Model flags'), plus every registered
    variant's options (e.g. v1's ``resblock_updown``, hae_v2's ``bottleneck_ratio``) at their defaults."""
    res = ModelConfig().to_dict()
    res.update(use_fp16=False)  # upstream flag accepted by create_model (a training-loop flag)
    for option, default in all_options().items():
        res.setdefault(option, default)
    res.update(diffusion_defaults())
    return res


def parse_channel_mult(image_size: int, channel_mult: str | Iterable[float]) -> tuple[float, ...]:
    """Resolve ``--channel_mult``: empty -> the per-image-size default, else "1,2,4" -> (1, 2, 4)."""
    if isinstance(channel_mult, str):
        text = channel_mult.strip()
        if not text:
            if image_size not in DEFAULT_CHANNEL_MULT:
                raise ValueError(
                    f"no default channel_mult for image_size={image_size} (defaults exist for "
                    f"{sorted(DEFAULT_CHANNEL_MULT)}); pass --channel_mult, e.g. '1,2,4'"
                )
            return DEFAULT_CHANNEL_MULT[image_size]
        try:
            values = [float(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise ValueError(
                f"--channel_mult must be comma-separated numbers like '1,2,4'; got {channel_mult!r}"
            ) from None
    else:
        values = [float(v) for v in channel_mult]
    if not values or any(v <= 0 for v in values):
        raise ValueError(f"--channel_mult must list positive multipliers, e.g. '1,2,4'; got {channel_mult!r}")
    return tuple(int(v) if v.is_integer() else v for v in values)


def attention_downsample_factors(image_size: int, attention_resolutions: str | Iterable[int]) -> set[int]:
    """Convert feature-map sizes ("32,16,8") to downsample factors (image_size // res, e.g. {4, 8, 16})."""
    if isinstance(attention_resolutions, str):
        try:
            sizes = [int(v) for v in attention_resolutions.split(",") if v.strip()]
        except ValueError:
            raise ValueError(
                f"--attention_resolutions must be comma-separated feature-map sizes like '32,16,8'; "
                f"got {attention_resolutions!r}"
            ) from None
    else:
        sizes = [int(v) for v in attention_resolutions]
    for res in sizes:
        if res <= 0 or image_size % res:
            raise ValueError(
                f"--attention_resolutions entry {res} must be a positive divisor of image_size={image_size}"
            )
    return {image_size // res for res in sizes}


def _resolve_num_classes(class_cond: bool, num_classes: int | None) -> int | None:
    if not class_cond or num_classes is None or num_classes <= 0:
        return None
    return int(num_classes)


def create_model(
    image_size: int | ModelConfig,
    num_channels: int = 128,
    num_res_blocks: int = 2,
    channel_mult: str | Iterable[float] = "",
    learn_sigma: bool = False,
    class_cond: bool = False,
    use_checkpoint: bool = False,
    attention_resolutions: str | Iterable[int] = "16,8",
    num_heads: int = 1,
    num_head_channels: int = -1,
    num_heads_upsample: int = -1,
    use_scale_shift_norm: bool = False,
    dropout: float = 0.0,
    use_fp16: bool = False,
    in_channels: int = 3,
    num_classes: int | None = 2,
    unet_ver: str = "v2",
    clf_free: bool = True,
    **options: Any,
) -> nn.Module:
    """Build the network selected by ``unet_ver`` from the command-line flags.

    ``num_classes`` is used only with ``class_cond`` (and > 0); otherwise the model is unconditional.
    ``out_channels`` = ``in_channels`` (x2 with ``learn_sigma``). ``use_fp16`` is a training-loop flag
    (mixed precision is applied by the training loop, the model is built in float32).
    ``options`` are the variants' own options (e.g. ``resblock_updown``, ``use_hae``,
    ``bottleneck_ratio``): the selected variant gets those it declares; another variant's option is
    ignored at its default (or None) and refused otherwise ("--X is an option of A, not of B").
    ``image_size`` may instead be a ``ModelConfig`` (the other arguments are then ignored, except
    ``learn_sigma``).
    """
    if isinstance(image_size, ModelConfig):
        return create_model(**{**image_size.to_dict(), "learn_sigma": learn_sigma})
    build = variants.builder(unet_ver)
    own_options = options_for(unet_ver, options)
    classes = _resolve_num_classes(class_cond, num_classes)
    if classes is not None and not clf_free:
        raise ValueError("--clf_free False with class conditioning is not supported (the UNet only has "
                         "classifier-free label layers); use --clf_free True or --class_cond False")
    if in_channels < 1:
        raise ValueError(f"--in_channels must be >= 1, got {in_channels}")
    mult = parse_channel_mult(image_size, channel_mult)
    multiple = 2 ** (len(mult) - 1)
    if image_size % multiple:
        lower, upper = image_size // multiple * multiple or multiple, (image_size // multiple + 1) * multiple
        raise ValueError(
            f"--image_size {image_size} must be a multiple of {multiple} (the UNet downsamples "
            f"{len(mult) - 1} times for channel_mult={mult}); use {lower} or {upper}, "
            "or a shorter --channel_mult"
        )
    factors = attention_downsample_factors(image_size, attention_resolutions)
    reachable = {2**level for level in range(len(mult))}
    if not factors <= reachable:
        # upstream silently ignores such entries (the 'compare' reference config has one): keep, but warn
        sizes = ",".join(str(image_size // f) for f in sorted(reachable))
        bad = ",".join(str(image_size // f) for f in sorted(factors - reachable))
        warnings.warn(
            f"--attention_resolutions {bad} is not a feature-map size of this UNet (image_size={image_size}, "
            f"channel_mult={mult}; sizes: {sizes}); no attention block is built for it",
            stacklevel=2,
        )
    return build(
        **own_options,
        image_size=image_size,
        in_channels=in_channels,
        model_channels=num_channels,
        out_channels=in_channels * (2 if learn_sigma else 1),
        num_res_blocks=num_res_blocks,
        attention_resolutions=factors,
        dropout=dropout,
        channel_mult=mult,
        num_classes=classes,
        use_checkpoint=use_checkpoint,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
    )


def create_gaussian_diffusion(
    steps: int | DiffusionConfig = 1000,
    learn_sigma: bool = False,
    noise_schedule: str = "linear",
    use_kl: bool = False,
    predict_xstart: bool = False,
    rescale_timesteps: bool = False,
    rescale_learned_sigmas: bool = False,
    timestep_respacing: str | list[int] = "",
) -> Any:
    """Build the (possibly respaced) Gaussian diffusion from the diffusion flags (or a DiffusionConfig)."""
    if isinstance(steps, DiffusionConfig):
        flags = steps.to_dict()
        return create_gaussian_diffusion(steps=flags.pop("diffusion_steps"), **flags)

    betas = gd.get_named_beta_schedule(noise_schedule, steps)
    if use_kl:
        loss_type = gd.LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = gd.LossType.RESCALED_MSE
    else:
        loss_type = gd.LossType.MSE
    return SpacedDiffusion(
        use_timesteps=space_timesteps(steps, timestep_respacing or [steps]),
        betas=betas,
        model_mean_type=gd.ModelMeanType.START_X if predict_xstart else gd.ModelMeanType.EPSILON,
        model_var_type=gd.ModelVarType.LEARNED_RANGE if learn_sigma else gd.ModelVarType.FIXED_LARGE,
        loss_type=loss_type,
        rescale_timesteps=rescale_timesteps,
    )


_DIFFUSION_ARG_MAP = dict(diffusion_steps="steps")


def create_model_and_diffusion(**kwargs: Any) -> tuple[nn.Module, Any]:
    """Build (model, diffusion) from ``model_and_diffusion_defaults()`` keys (missing keys use defaults)."""
    defaults = model_and_diffusion_defaults()
    unknown = sorted(set(kwargs) - set(defaults))
    if unknown:
        raise ValueError(f"unknown model/diffusion flags {unknown}; valid flags: {sorted(defaults)}")
    flags = {**defaults, **kwargs}
    diff_keys = set(diffusion_defaults()) - {"learn_sigma"}
    model = create_model(**{k: v for k, v in flags.items() if k not in diff_keys})
    diffusion = create_gaussian_diffusion(
        learn_sigma=flags["learn_sigma"],
        **{_DIFFUSION_ARG_MAP.get(k, k): flags[k] for k in diff_keys},
    )
    return model, diffusion


def create_from_configs(model: ModelConfig, diffusion: DiffusionConfig) -> tuple[nn.Module, Any]:
    """Build (model, diffusion) from the typed configs."""
    return create_model(model, learn_sigma=diffusion.learn_sigma), create_gaussian_diffusion(diffusion)


# flags that define every network's architecture (and so which checkpoints fit it); a variant's own
# options (registry.variant_options) follow them in its resolved config
_ARCH_FLAGS = (
    "unet_ver", "image_size", "in_channels", "num_channels", "num_res_blocks", "channel_mult",
    "attention_resolutions", "num_heads", "num_head_channels", "num_heads_upsample",
    "use_scale_shift_norm", "learn_sigma", "class_cond", "num_classes",
)


def model_config(
    args_or_dict: Mapping[str, Any] | ModelConfig,
    diffusion: DiffusionConfig | None = None,
) -> dict[str, Any]:
    """The resolved architecture-defining flags (JSON-friendly), for checking a checkpoint fits the flags.

    Equivalent spellings compare equal: channel_mult "" and its image-size default, attention
    resolutions as sorted downsample factors, num_classes None when unconditional, num_heads_upsample
    -1 resolved to num_heads. Missing flags take their defaults. The options of the selected variant
    (and only those) follow the shared flags, e.g. ``use_hae``, ``bottleneck_ratio`` for hae_v2.
    """
    if isinstance(args_or_dict, ModelConfig):
        given = {**args_or_dict.to_dict(), **(diffusion or DiffusionConfig()).to_dict()}
    else:
        given = dict(args_or_dict)
    flags = {**model_and_diffusion_defaults(), **given}
    cfg = {k: flags[k] for k in _ARCH_FLAGS}
    cfg["channel_mult"] = list(parse_channel_mult(cfg["image_size"], cfg["channel_mult"]))
    cfg["attention_resolutions"] = sorted(
        attention_downsample_factors(cfg["image_size"], cfg["attention_resolutions"])
    )
    cfg["num_classes"] = _resolve_num_classes(cfg.pop("class_cond"), cfg["num_classes"])
    if cfg["num_heads_upsample"] == -1:
        cfg["num_heads_upsample"] = cfg["num_heads"]
    for option, default in variant_options(cfg["unet_ver"]).items():
        value = flags.get(option)
        cfg[option] = default if value is None else value
    return cfg
