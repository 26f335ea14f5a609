"""Command-line side of the typed configs (a CLI module: the only place, with ``cli.py`` and the
``*_flags.py`` modules, where ``argparse`` objects are handled).

- ``add_flags(parser, Config)`` adds ``--<field>`` for every field; ``from_args`` builds a config from the
  parsed flags. Flags default to "not given", so ``--config FILE`` values can be overridden one by one.
- ``add_compat_flags`` / ``resolve_compat`` accept the upstream names of a ``CompatFlag`` table
  (``configs.COMPAT`` by default): mapped onto their field, or accepted with one warning, or refused.
- ``add_config_flag`` / ``parse_configs``: ``--config FILE`` (a saved run record) under the flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

from guided_diffusion.cli import str2bool
from guided_diffusion.configs.base import (
    COMPAT,
    CompatFlag,
    Config,
    check_keys,
    field_kind,
    field_names,
    load_run_config,
    type_hints,
)
from guided_diffusion.registry import drop_foreign_options

C = TypeVar("C", bound=Config)
COMPAT_PREFIX = "compat__"
_WARNED: set[str] = set()


def add_flags(parser: argparse.ArgumentParser, cls: type[Config], skip: Iterable[str] = ()) -> None:
    """Add ``--<field>`` for every flag field of ``cls`` (bool: str2bool; tuple: nargs). Flags default to
    "not given" (argparse.SUPPRESS); the help shows the field default."""
    skip = set(skip)
    hints = type_hints(cls)
    group = parser.add_argument_group(cls.SECTION or cls.__name__)
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in skip or not f.metadata.get("flag", True):
            continue
        item, seq, _optional = field_kind(hints[f.name])
        kwargs: dict[str, Any] = dict(default=argparse.SUPPRESS, dest=f.name)
        kwargs["type"] = str2bool if item is bool else item
        if seq:
            kwargs["nargs"] = "+"
        for key in ("choices", "metavar"):
            if f.metadata.get(key) is not None:
                kwargs[key] = f.metadata[key]
        shown = " ".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
        kwargs["help"] = f"{f.metadata.get('help', '')} (default: {shown!s})".strip()
        group.add_argument(f"--{f.name}", **kwargs)


def from_args(cls: type[C], ns: argparse.Namespace | Mapping[str, Any],
              base: Mapping[str, Any] | None = None) -> C:
    """Build ``cls`` from parsed flags over ``base`` (e.g. a run file's section), over the field defaults."""
    given = vars(ns) if isinstance(ns, argparse.Namespace) else dict(ns)
    names = set(field_names(cls))
    values = dict(base or {})
    values.update({k: v for k, v in given.items() if k in names})
    return cls.from_dict(values)


def add_compat_flags(parser: argparse.ArgumentParser, names: Iterable[str] | None = None,
                     table: Mapping[str, CompatFlag] = COMPAT, prefix: str = COMPAT_PREFIX) -> None:
    """Accept the upstream names of ``table`` (hidden from --help) that ``parser`` does not define itself;
    their values land under ``prefix + name`` for ``resolve_compat``."""
    have = {a.dest for a in parser._actions}
    for name in sorted(table if names is None else names):
        if name in have:
            continue
        parser.add_argument(f"--{name}", dest=prefix + name, type=table[name].type, default=argparse.SUPPRESS,
                            nargs="?", const="True", help=argparse.SUPPRESS)


def _accepted(c: CompatFlag, raw: Any) -> bool:
    if "*" in c.accepted:
        return True
    try:
        return (str2bool(raw) if isinstance(c.accepted[0], bool) else raw) in c.accepted
    except (argparse.ArgumentTypeError, IndexError):
        return False


def resolve_compat(ns: argparse.Namespace, table: Mapping[str, CompatFlag] = COMPAT,
                   prefix: str = COMPAT_PREFIX) -> argparse.Namespace:
    """A copy of ``ns`` with the upstream names of ``table`` applied: mapped onto their field (a value given
    under the field's own name must agree), or accepted with one warning, or refused naming the flag."""
    out = argparse.Namespace(**vars(ns))
    for key in [k for k in vars(ns) if k.startswith(prefix)]:
        c = table[key[len(prefix):]]
        raw = getattr(out, key)
        delattr(out, key)
        if c.field is None:
            if not _accepted(c, raw):
                raise ValueError(f"--{c.name} {raw} is not supported: {c.note}")
            if c.name not in _WARNED:
                _WARNED.add(c.name)
                warnings.warn(f"--{c.name} is accepted for compatibility and ignored: {c.note}", stacklevel=2)
            continue
        value = c.convert(raw) if c.convert else raw
        if hasattr(out, c.field) and getattr(out, c.field) != value:
            raise ValueError(f"--{c.name} {raw} contradicts --{c.field} {getattr(out, c.field)}; "
                             "pass only one")
        setattr(out, c.field, value)
    return out


def add_config_flag(parser: argparse.ArgumentParser) -> None:
    """``--config FILE``: run again from a saved run config (flags given on the command line override)."""
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="a run config JSON written by an earlier run (config.json in its log dir); "
                             "flags given here override single values")


def recorded_section(cls: type[Config], section: Mapping[str, Any], ns: argparse.Namespace) -> dict[str, Any]:
    """A run file's section as the base of ``cls``: for a config with ``unet_ver`` (ModelConfig), without the
    options of variants other than the one selected (the flag given, else the file's), which the recorded
    network never used; flags given on the command line are not touched (the factory judges them)."""
    if "unet_ver" not in field_names(cls):
        return dict(section)

    return drop_foreign_options(section, getattr(ns, "unet_ver", None) or section.get("unet_ver"))


def configs_from_namespace(ns: argparse.Namespace, classes: Sequence[type[Config]],
                           base: Mapping[str, Mapping[str, Any]] | None = None, base_source: str = ""
                           ) -> list[Config]:
    """One config per class from resolved flags: field default < ``--config`` file (else ``base``, e.g. an
    export's settings, named ``base_source``) < flag given. A run file section of another kind is ignored;
    an unknown key inside a known section is refused naming the file."""
    if getattr(ns, "config", None):
        run, source = load_run_config(ns.config), ns.config
    else:
        run, source = dict(base or {}), base_source
    out = []
    for cls in classes:
        section = run.get(cls.SECTION, {})
        check_keys(cls, section, source=f"{source} section {cls.SECTION!r}" if run else "")
        out.append(from_args(cls, ns, base=recorded_section(cls, section, ns)))
    return out


def parse_configs(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
                  classes: Sequence[type[Config]],
                  base_of: Callable[[argparse.Namespace], tuple[dict, str]] | None = None
                  ) -> tuple[argparse.Namespace, list[Config]]:
    """Parse ``argv`` (upstream names resolved) and build one config per class (``configs_from_namespace``;
    ``base_of(ns)`` gives the (sections, source) under the flags when there is no ``--config``); returns the
    namespace and the configs in ``classes`` order."""
    ns = resolve_compat(parser.parse_args(argv))
    base, source = base_of(ns) if base_of is not None and not getattr(ns, "config", None) else ({}, "")
    return ns, configs_from_namespace(ns, classes, base, source)
