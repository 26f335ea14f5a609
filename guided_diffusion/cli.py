"""How every entry point ends: expected errors as one line on stderr and exit status 2.

``run_cli(main)`` calls ``main()`` and turns the errors a user can cause (bad flags, missing or corrupt
files, values out of range, a full disk, a busy log dir) into ``error: <message>`` and exit 2, with no
traceback. The traceback is shown when ``--debug`` is on the command line or ``HAE_FPDM_DEBUG=1`` is set
(``TRAIN_DEBUG=1`` is accepted as the older name).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

DEBUG_ENV = ("HAE_FPDM_DEBUG", "TRAIN_DEBUG")

# errors that bad input or a bad environment cause; anything else is a bug and keeps its traceback
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
    FileExistsError,
    KeyError,
    OSError,
)


class UsageError(ValueError):
    """A command-line flag the parser rejected (unknown flag, bad value, missing argument)."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse parser whose errors are one line: ``error()`` raises ``UsageError`` (which ``run_cli``
    prints as ``error: <prog>: <message>``, exit 2) instead of printing the whole usage block."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message} ({self.prog} --help lists the flags)")


def debug_enabled(argv: list[str] | None = None) -> bool:
    """True when tracebacks were asked for (``--debug`` in argv or one of DEBUG_ENV set to non-empty)."""
    argv = sys.argv[1:] if argv is None else argv
    return "--debug" in argv or any(os.environ.get(k) for k in DEBUG_ENV)


def strip_debug_flag(argv: list[str] | None = None) -> list[str]:
    """``argv`` (default ``sys.argv[1:]``) without ``--debug``, for parsers that do not define it."""
    argv = sys.argv[1:] if argv is None else argv
    return [a for a in argv if a != "--debug"]


def error_line(err: BaseException) -> str:
    """The one line printed for ``err``: its message with its lines joined by "; "; for an error raised in
    a DataLoader worker (whose message holds the worker's traceback) only the original message."""
    if isinstance(err, KeyError) and err.args:
        text = str(err.args[0])
    else:
        text = str(err) or type(err).__name__
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if "Original Traceback (most recent call last):" in lines:  # raised in a DataLoader worker
        last = lines[-1]
        kind, _, message = last.partition(": ")
        lines = [message if message and kind.isidentifier() else last]
    text = "; ".join(lines) if lines else type(err).__name__
    return f"error: {text}"


def run_cli(main: Callable[[list[str]], Any], argv: list[str] | None = None) -> int:
    """Run ``main(argv without --debug)``; return its int status (0 for None) or 2 for an expected error.

    Args:
        main: the entry point's function taking the argument list.
        argv: the arguments (default ``sys.argv[1:]``).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = debug_enabled(argv)
    try:
        status = main(strip_debug_flag(argv))
    except EXPECTED_ERRORS as err:
        if debug:
            raise
        print(error_line(err) + "  (--debug or HAE_FPDM_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 2
    return int(status) if isinstance(status, int) else 0


def add_dict_to_argparser(parser: argparse.ArgumentParser, default_dict: Mapping[str, Any]) -> None:
    """Add ``--key`` for every entry (bool -> str2bool, None -> str, tuple/list -> nargs='*')."""
    for k, v in default_dict.items():
        if isinstance(v, bool):
            parser.add_argument(f"--{k}", default=v, type=str2bool)
        elif v is None:
            parser.add_argument(f"--{k}", default=v, type=str)
        elif isinstance(v, (tuple, list)):
            item_type = type(v[0]) if v else str
            parser.add_argument(f"--{k}", default=v, type=item_type, nargs="*")
        else:
            parser.add_argument(f"--{k}", default=v, type=type(v))


def args_to_dict(args: argparse.Namespace, keys: Iterable[str]) -> dict[str, Any]:
    """Pick ``keys`` from parsed arguments into a dict."""
    keys = list(keys)
    missing = [k for k in keys if not hasattr(args, k)]
    if missing:
        raise ValueError(f"parsed arguments lack flags {missing}; add them with add_dict_to_argparser")
    return {k: getattr(args, k) for k in keys}


def str2bool(v: str | bool) -> bool:
    """Parse a command-line boolean: yes/true/t/y/1 or no/false/f/n/0 (case-insensitive)."""
    if isinstance(v, bool):
        return v
    text = str(v).strip().lower()
    if text in ("yes", "true", "t", "y", "1"):
        return True
    if text in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"boolean value expected (true/false, yes/no, 1/0); got {v!r}")
