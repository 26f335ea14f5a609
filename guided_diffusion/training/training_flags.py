"""Command line of training (a CLI module): the flags generated from ModelConfig, DiffusionConfig and
TrainConfig, ``--config FILE``, and the upstream names (``TRAIN_COMPAT`` + the shared ``configs.COMPAT``).
``parse_configs_for_training(argv)`` returns the three configs ``training.train`` takes.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from typing import Any

from guided_diffusion.cli import ArgumentParser, str2bool
from guided_diffusion.configs.base import CompatFlag, DiffusionConfig, ModelConfig, load_run_config
from guided_diffusion.configs.config_flags import (
    add_compat_flags,
    add_config_flag,
    add_flags,
    from_args,
    recorded_section,
    resolve_compat,
)
from guided_diffusion.configs.train_config import TrainConfig

DESCRIPTION = """Train a (classifier-free guided) diffusion model on preprocessed BraTS/ATLAS slices.

Runs as a single process (CPU or one GPU), under ``torchrun --nproc-per-node N`` or ``mpiexec -n N``.
Logs and checkpoints go to ``--log_dir`` / ``$OPENAI_LOGDIR``; ``--resume auto`` (default) continues
from the newest complete checkpoint found there. A model is class-conditional when --num_classes > 0.
"""


# upstream names with a training-specific meaning (inference ignores some of them, so they are kept out of
# the shared configs.COMPAT table): mapped onto a field, or accepted for one value with a warning
TRAIN_COMPAT: dict[str, CompatFlag] = {c.name: c for c in (
    CompatFlag("use_fp16", field="precision", convert=lambda v: "fp16" if str2bool(v) else "fp32"),
    CompatFlag("class_cond", accepted=(True,), note="a model is class-conditional when --num_classes > 0; "
               "pass --num_classes 0 for an unconditional model"),
    CompatFlag("clf_free", accepted=(True,), note="the UNet only has classifier-free label layers"),
)}
SHARED_COMPAT = ("resblock_updown", "use_new_attention_order")  # configs.COMPAT entries
MODEL_SKIP = ("class_cond", "clf_free")  # derived from --num_classes / always True in training
_PREFIX = "train_compat__"




def build_arg_parser() -> argparse.ArgumentParser:
    """The training flags, generated from ModelConfig, DiffusionConfig and TrainConfig (+ --config)."""
    parser = ArgumentParser(description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(parser, ModelConfig, skip=MODEL_SKIP)
    add_flags(parser, DiffusionConfig)
    add_flags(parser, TrainConfig)
    for action in parser._actions:
        if action.dest in ("sample_shape", "w"):
            action.nargs = "*"  # given without values: no previews (overrides a run file)
        elif action.dest == "num_classes":
            action.help = "classes of the label conditioning (0: an unconditional model) (default: 2)"
    add_config_flag(parser)
    add_compat_flags(parser, SHARED_COMPAT)
    add_compat_flags(parser, table=TRAIN_COMPAT, prefix=_PREFIX)
    return parser


def parse_configs_for_training(
    argv: Sequence[str] | None = None, forced: Mapping[str, Any] | None = None
) -> tuple[ModelConfig, DiffusionConfig, TrainConfig]:
    """Flags (over ``--config FILE``, over the defaults) -> the three configs. ``forced`` (model field ->
    value, e.g. {"unet_ver": "hae_v2"} for a wrapper script) fixes fields: another given value is refused."""
    ns = build_arg_parser().parse_args(None if argv is None else argv)
    ns = resolve_compat(resolve_compat(ns, TRAIN_COMPAT, _PREFIX))
    file = load_run_config(ns.config) if getattr(ns, "config", None) else {}
    configs = []
    for cls in (ModelConfig, DiffusionConfig, TrainConfig):
        section = file.get(cls.SECTION, {})
        cls.from_dict(section, source=f"{ns.config} section {cls.SECTION!r}" if file else "")  # unknown keys
        configs.append(from_args(cls, ns, base=recorded_section(cls, section, ns)))
    m, d, t = configs
    run = file.get("model", {})
    for key, value in (forced or {}).items():
        given = getattr(ns, key, run.get(key, value))
        if given != value:
            raise ValueError(f"--{key} {given} contradicts this script, which always trains --{key} {value}; "
                             f"drop --{key} or use scripts/train.py")
        m = m.replace(**{key: value})
    conditional = m.num_classes > 0
    m = m.replace(class_cond=conditional, num_classes=m.num_classes if conditional else 0, clf_free=True)
    return m, d, t
