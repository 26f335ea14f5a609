"""Typed run configurations: each setting defined once, as a field of a frozen dataclass.

A field carries its command-line help (and choices, and which outputs it changes) in its metadata, so the
flags, the validation, the saved run record and the resume/calibration match keys all come from the same
definition. Entry points parse flags into configs (``parse_configs``); library code takes configs.

- ``setting(default, help, ...)`` declares a field; ``Config`` is the base class (``to_dict``,
  ``from_dict`` refusing unknown keys, ``replace``, ``validate`` run by ``__post_init__``).
- ``COMPAT`` maps upstream flag names onto fields, or accepts them with one warning (``CompatFlag``).
- The command-line side (flags generated from the fields, ``--config FILE``) is ``config_flags.py``.
- ``ModelConfig`` / ``DiffusionConfig``: the network and diffusion flags (the names of script_util's
  ``model_and_diffusion_defaults``, which checkpoints' saved configs use).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar, TypeVar

from guided_diffusion.cli import str2bool
from guided_diffusion.utils.io_util import atomic_write_json

C = TypeVar("C", bound="Config")

# outputs a setting can change (field metadata "changes"): the calibration statistics, the per-slice results
STATS = "stats"
RESULT = "result"


def setting(
    default: Any,
    help: str,
    *,
    choices: Sequence[Any] | None = None,
    changes: Iterable[str] = (RESULT,),
    flag: bool = True,
    metavar: str | None = None,
) -> Any:
    """A config field: ``default``, its flag ``help``, allowed ``choices``, the outputs it ``changes``
    (``STATS``/``RESULT``; empty for e.g. batch size or progress bars), and whether it is a flag."""
    meta = dict(help=help, choices=tuple(choices) if choices else None, changes=frozenset(changes),
                flag=flag, metavar=metavar)
    if isinstance(default, (list, dict, set)):
        raise TypeError("setting defaults must be immutable (use a tuple)")
    return dataclasses.field(default=default, metadata=meta)


def field_kind(tp: Any) -> tuple[type, bool, bool]:
    """(item type, is_sequence, optional) of a field annotation such as ``int``, ``tuple[int, ...]``,
    ``float | None``."""
    optional = False
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        if len(args) != 1:
            raise TypeError(f"unsupported config field type {tp!r}")
        tp = args[0]
        origin = typing.get_origin(tp)
    if origin in (tuple, list):
        item = typing.get_args(tp)[0]
        return item, True, optional
    return tp, False, optional


class Config:
    """Base of the frozen config dataclasses. Subclasses set ``SECTION`` (their key in a run file) and
    override ``validate`` (raise ValueError naming the flag)."""

    SECTION: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            item, seq, optional = field_kind(type_hints(type(self))[f.name])
            if value is None and optional:
                continue
            object.__setattr__(self, f.name, _coerce(value, item, seq, f.name))
            choices = f.metadata.get("choices")
            values = getattr(self, f.name) if seq else (getattr(self, f.name),)
            if choices is not None and any(v not in choices for v in values):
                raise ValueError(f"--{f.name} must be one of {', '.join(map(str, choices))}; got {value!r}")
        self.validate()

    def validate(self) -> None:
        """Check values across fields; raise ValueError naming the flag. Default: nothing to check."""

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-friendly dict (tuples as lists)."""
        return {f.name: _tuple_as_list(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any], source: str = "") -> C:
        """Build from a dict; missing keys take their defaults, an unknown key is a ValueError naming it."""
        check_keys(cls, data, source)
        return cls(**dict(data))  # type: ignore[call-arg]

    def replace(self: C, **changes: Any) -> C:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    def settings(self, changes: str) -> dict[str, Any]:
        """The fields that change ``changes`` (STATS or RESULT), as a JSON-friendly dict."""
        return {f.name: _tuple_as_list(getattr(self, f.name)) for f in dataclasses.fields(self)  # type: ignore[arg-type]
                if changes in f.metadata.get("changes", ())}


def type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def check_keys(cls: type[Config], data: Mapping[str, Any], source: str = "") -> None:
    """ValueError naming every key of ``data`` that is not a field of ``cls``."""
    names = field_names(cls)
    unknown = sorted(set(data) - set(names))
    if unknown:
        where = f" in {source}" if source else ""
        raise ValueError(f"unknown {cls.SECTION or cls.__name__} setting(s) {unknown}{where}; "
                         f"valid: {', '.join(names)}")


def field_names(cls: type[Config]) -> list[str]:
    """The field names of a config class, in definition order."""
    return [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]


def _coerce(value: Any, item: type, seq: bool, name: str) -> Any:
    if seq:
        if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
            value = (value,)
        return tuple(_coerce(v, item, False, name) for v in value)
    if item is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return str2bool(value)
            except argparse.ArgumentTypeError:
                pass
        raise ValueError(f"--{name} must be true or false; got {value!r}")
    if item is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"--{name} must be a number; got {value!r}")
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"--{name} must be a number; got {value!r}") from None
    if item is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"--{name} must be an integer; got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ValueError(f"--{name} must be an integer; got {value!r}") from None
    if item is str:
        if not isinstance(value, str):
            raise ValueError(f"--{name} must be a string; got {value!r}")
        return value
    return value


def _tuple_as_list(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def require(ok: bool, message: str) -> None:
    """Raise ``ValueError(message)`` unless ``ok`` (messages name the flag, e.g. "--w must be >= 0")."""
    if not ok:
        raise ValueError(message)


def require_finite(
    name: str, value: float | None, low: float | None = None, high: float | None = None
) -> None:
    """ValueError naming ``--name`` unless ``value`` is None or finite and within [low, high]."""
    if value is None:
        return
    require(math.isfinite(value), f"--{name} must be a finite number; got {value!r}")
    require(low is None or value >= low, f"--{name} must be >= {low}; got {value!r}")
    require(high is None or value <= high, f"--{name} must be <= {high}; got {value!r}")


# ---------------------------------------------------------------------------------- upstream names


@dataclasses.dataclass(frozen=True)
class CompatFlag:
    """An upstream flag name: mapped onto ``field`` (through ``convert``), or ``ignored`` with one warning
    when its value is in ``accepted`` (anything else is refused with ``note``)."""

    name: str
    field: str | None = None
    convert: Callable[[Any], Any] | None = None
    type: Callable[[str], Any] = str
    accepted: tuple[Any, ...] = ()
    note: str = ""


COMPAT: dict[str, CompatFlag] = {}


def register_compat(*flags: CompatFlag) -> None:
    """Add upstream flag names to ``COMPAT`` (a name may be registered once)."""
    for c in flags:
        old = COMPAT.get(c.name)
        if old is not None and old != c:
            raise ValueError(f"compat flag --{c.name} is already registered differently")
        COMPAT[c.name] = c


# --------------------------------------------------------------------------------------- run files


def load_run_config(path: str) -> dict[str, dict[str, Any]]:
    """Read a run file written by ``save_run_config``: {section: {field: value}}. Errors name the file."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"--config {path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"--config {path} is not a JSON run config ({err})") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ValueError(f"--config {path} must hold a JSON object of sections ({{'model': {{...}}, ...}})")
    return data


def save_run_config(path: str, sections: Mapping[str, Any]) -> None:
    """Write the resolved configs ({section: Config or dict}) as JSON, atomically."""
    data = {k: (v.to_dict() if isinstance(v, Config) else dict(v)) for k, v in sections.items()}
    atomic_write_json(data, path)


def run_record(*configs: Config) -> dict[str, dict[str, Any]]:
    """{section: fields} of ``configs``, the form ``save_run_config`` writes and ``parse_configs`` reads."""
    return {c.SECTION: c.to_dict() for c in configs}


# -------------------------------------------------------------------------------- model, diffusion

_SHAPE = frozenset({STATS, RESULT})


@dataclasses.dataclass(frozen=True)
class ModelConfig(Config):
    """The network flags (names as in script_util.model_and_diffusion_defaults)."""

    SECTION: ClassVar[str] = "model"

    image_size: int = setting(64, "image side in pixels", changes=_SHAPE)
    num_channels: int = setting(128, "base channel count of the UNet")
    num_res_blocks: int = setting(2, "residual blocks per resolution")
    num_heads: int = setting(4, "attention heads")
    num_heads_upsample: int = setting(-1, "attention heads in the decoder (-1: --num_heads)")
    num_head_channels: int = setting(-1, "channels per attention head (-1: use --num_heads)")
    attention_resolutions: str = setting("16,8", "feature-map sizes with attention, e.g. '32,16,8'")
    channel_mult: str = setting("", "channel multipliers per resolution, e.g. '1,2,4' (empty: by image size)")
    dropout: float = setting(0.0, "dropout probability")
    class_cond: bool = setting(False, "class-conditional model (with --num_classes > 0)")
    use_checkpoint: bool = setting(False, "gradient checkpointing (saves memory, same result)", changes=())
    use_scale_shift_norm: bool = setting(True, "FiLM-style scale/shift of the timestep embedding")
    in_channels: int = setting(3, "image channels (MRI modalities)", changes=_SHAPE)
    num_classes: int = setting(2, "classes for conditioning (used with --class_cond)")
    unet_ver: str = setting("v2", "network variant (v2: the AnoFPDM UNet; hae, hae_lite, hae_v2)")
    clf_free: bool = setting(True, "classifier-free label layers (the only kind supported)")
    # options of some variants (each declared by its builder, see guided_diffusion/registry.py): the factory
    # hands them to their variant only, and refuses a non-default value given for another variant
    bottleneck_ratio: float = setting(0.25, "bottleneck token-MLP width / C (an option of hae_v2)")
    use_hae: bool = setting(True, "hybrid decoder blocks on (an option of hae, hae_lite, hae_v2)")

    def validate(self) -> None:
        require(self.image_size >= 1, f"--image_size must be >= 1, got {self.image_size}")
        require(self.num_channels >= 1, f"--num_channels must be >= 1, got {self.num_channels}")
        require(self.num_res_blocks >= 1, f"--num_res_blocks must be >= 1, got {self.num_res_blocks}")
        require(self.in_channels >= 1, f"--in_channels must be >= 1, got {self.in_channels}")
        require(self.num_heads >= 1, f"--num_heads must be >= 1, got {self.num_heads}")
        require(self.num_classes >= 0, f"--num_classes must be >= 0 (0: an unconditional model), got "
                f"{self.num_classes}")
        require_finite("dropout", self.dropout, 0.0, 1.0)
        require(self.dropout < 1.0, f"--dropout must be < 1, got {self.dropout}")
        require_finite("bottleneck_ratio", self.bottleneck_ratio, 0.0)
        require(self.bottleneck_ratio > 0, f"--bottleneck_ratio must be > 0, got {self.bottleneck_ratio}")


@dataclasses.dataclass(frozen=True)
class DiffusionConfig(Config):
    """The Gaussian-diffusion flags (names as in script_util.diffusion_defaults)."""

    SECTION: ClassVar[str] = "diffusion"

    learn_sigma: bool = setting(False, "the model also predicts the variance", changes=_SHAPE)
    diffusion_steps: int = setting(1000, "training diffusion steps T", changes=_SHAPE)
    noise_schedule: str = setting("linear", "beta schedule (linear, cosine)", changes=_SHAPE)
    timestep_respacing: str = setting("", "respaced steps, e.g. '50' or 'ddim20' (empty: all steps)",
                                      changes=_SHAPE)
    use_kl: bool = setting(False, "train with the variational bound (KL) loss")
    predict_xstart: bool = setting(False, "the model predicts x_0 instead of the noise", changes=_SHAPE)
    rescale_timesteps: bool = setting(False, "feed t scaled to [0, 1000) to the model", changes=_SHAPE)
    rescale_learned_sigmas: bool = setting(False, "rescaled MSE loss with learned sigmas")

    def validate(self) -> None:
        require(self.diffusion_steps >= 1, f"--diffusion_steps must be >= 1, got {self.diffusion_steps}")


def _refuse_true(name: str, why: str) -> CompatFlag:
    return CompatFlag(name, accepted=(False,), note=why)


register_compat(
    _refuse_true("resblock_updown", "plain conv up/down-sampling only; use --resblock_updown False"),
    _refuse_true("use_new_attention_order", "the FPDM UNet uses the legacy head order; "
                 "use --use_new_attention_order False"),
)
