"""Small key/value and text logger (OpenAI-style API).

Rank 0 writes to stdout, ``log.txt`` and ``progress.csv`` in the log directory (and TensorBoard
events under ``tb/`` when ``tensorboard`` is listed in ``OPENAI_LOG_FORMAT`` and importable).
Other ranks write only ``log-rank{global rank:03d}.txt``.
"""

from __future__ import annotations

import csv
import datetime
import io
import os
import sys
import tempfile
from collections import defaultdict
from typing import Any, TextIO

from guided_diffusion.utils import dist_util
from guided_diffusion.utils.io_util import atomic_write_text

DEFAULT_FORMATS = "stdout,log,csv"


class _TextOutput:
    """Human-readable lines (stdout or a file); key/values as an aligned table."""

    def __init__(self, target: str | TextIO):
        if isinstance(target, str):
            self.file: TextIO = open(target, "a", encoding="utf-8")
            self.own = True
        else:
            self.file, self.own = target, False

    def writekvs(self, kvs: dict[str, Any]) -> None:
        if not kvs:
            return
        rows = [(k, _fmt(v)) for k, v in sorted(kvs.items())]
        kw = max(len(k) for k, _ in rows)
        vw = max(len(v) for _, v in rows)
        bar = "-" * (kw + vw + 7)
        lines = [bar] + [f"| {k:<{kw}} | {v:<{vw}} |" for k, v in rows] + [bar]
        self.writeseq("\n".join(lines))

    def writeseq(self, text: str) -> None:
        self.file.write(text + "\n")
        self.file.flush()

    def close(self) -> None:
        if self.own:
            self.file.close()


class _CSVOutput:
    """``progress.csv``; a key seen for the first time rewrites the header (old rows get empty cells)."""

    def __init__(self, path: str):
        self.path = path
        self.keys: list[str] = []
        if os.path.exists(path) and os.path.getsize(path) > 0:  # resumed run: keep appending
            with open(path, encoding="utf-8", newline="") as f:
                header = next(csv.reader(f), [])
            self.keys = list(header)
        self.file = open(path, "a", encoding="utf-8", newline="")

    def writekvs(self, kvs: dict[str, Any]) -> None:
        if not kvs:
            return
        new = sorted(k for k in kvs if k not in self.keys)
        if new:
            self._extend_header(new)
        writer = csv.writer(self.file)
        writer.writerow(["" if kvs.get(k) is None else kvs[k] for k in self.keys])
        self.file.flush()

    def _extend_header(self, new: list[str]) -> None:
        self.file.close()
        with open(self.path, encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f))[1:]
        self.keys = self.keys + new
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(self.keys)
        for row in rows:
            writer.writerow(row + [""] * (len(self.keys) - len(row)))
        atomic_write_text(buf.getvalue(), self.path)
        self.file = open(self.path, "a", encoding="utf-8", newline="")

    def writeseq(self, text: str) -> None:
        pass

    def close(self) -> None:
        self.file.close()


class _TensorBoardOutput:
    """Scalars to TensorBoard (``_`` in keys becomes ``/`` for grouping); step from the ``step`` key."""

    def __init__(self, directory: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(directory)
        self.count = 0

    def writekvs(self, kvs: dict[str, Any]) -> None:
        step = int(kvs.get("step", self.count))
        for k, v in kvs.items():
            if isinstance(v, int | float):
                self.writer.add_scalar(k.replace("_", "/"), v, step)
        self.writer.flush()
        self.count += 1

    def writeseq(self, text: str) -> None:
        pass

    def close(self) -> None:
        self.writer.close()


class Logger:
    """Holds the outputs and the pending key/values of one process."""

    def __init__(self, directory: str, outputs: list[Any]):
        self.dir = directory
        self.outputs = outputs
        self.kvs: dict[str, Any] = {}
        self.counts: dict[str, int] = defaultdict(int)

    def logkv(self, key: str, value: Any) -> None:
        self.kvs[key] = value

    def logkv_mean(self, key: str, value: Any) -> None:
        value = float(value)
        n = self.counts[key]
        old = self.kvs.get(key, 0.0)
        self.kvs[key] = old * n / (n + 1) + value / (n + 1)
        self.counts[key] = n + 1

    def dumpkvs(self) -> dict[str, Any]:
        out = dict(self.kvs)
        for o in self.outputs:
            o.writekvs(out)
        self.kvs.clear()
        self.counts.clear()
        return out

    def log(self, *args: Any) -> None:
        text = " ".join(str(a) for a in args)
        for o in self.outputs:
            o.writeseq(text)

    def close(self) -> None:
        for o in self.outputs:
            o.close()


_current: Logger | None = None


def configure(dir: str | None = None, format_strs: list[str] | str | None = None) -> Logger:
    """(Re)configure the process logger.

    Args:
        dir: log directory; default ``$OPENAI_LOGDIR``, else a timestamped folder in the temp dir.
        format_strs: e.g. ["stdout", "log", "csv", "tensorboard"]; default ``$OPENAI_LOG_FORMAT``
            (comma-separated), else stdout,log,csv. Ranks other than 0 always write only their own
            ``log-rankNNN.txt``.
    """
    global _current
    if dir is None:
        dir = os.environ.get("OPENAI_LOGDIR") or os.path.join(
            tempfile.gettempdir(), datetime.datetime.now().strftime("openai-%Y-%m-%d-%H-%M-%S-%f")
        )
    dir = os.path.abspath(os.path.expanduser(dir))
    os.makedirs(dir, exist_ok=True)
    if format_strs is None:
        format_strs = os.environ.get("OPENAI_LOG_FORMAT", DEFAULT_FORMATS)
    if isinstance(format_strs, str):
        format_strs = [f.strip() for f in format_strs.split(",") if f.strip()]

    rank = dist_util.get_rank()
    outputs: list[Any] = []
    if rank == 0:
        for fmt in format_strs:
            if fmt == "stdout":
                outputs.append(_TextOutput(sys.stdout))
            elif fmt == "log":
                outputs.append(_TextOutput(os.path.join(dir, "log.txt")))
            elif fmt == "csv":
                outputs.append(_CSVOutput(os.path.join(dir, "progress.csv")))
            elif fmt == "tensorboard":
                try:
                    outputs.append(_TensorBoardOutput(os.path.join(dir, "tb")))
                except ImportError:
                    print("logger: tensorboard requested but not installed; skipping it", file=sys.stderr)
            else:
                raise ValueError(
                    f"logger format {fmt!r} is unknown (OPENAI_LOG_FORMAT / format_strs); "
                    "use any of stdout, log, csv, tensorboard"
                )
    else:
        outputs.append(_TextOutput(os.path.join(dir, f"log-rank{rank:03d}.txt")))
    if _current is not None:
        _current.close()
    _current = Logger(dir, outputs)
    _current.log(f"Logging to {dir}")
    return _current


def _get() -> Logger:
    global _current
    if _current is None:
        _current = Logger(os.getcwd(), [_TextOutput(sys.stdout)])
    return _current


def log(*args: Any) -> None:
    """Write one line (space-joined ``args``) to the text outputs."""
    _get().log(*args)


def warn(*args: Any) -> None:
    """``log`` with a ``WARNING:`` prefix."""
    _get().log("WARNING:", *args)


def logkv(key: str, value: Any) -> None:
    """Set ``key`` for the next ``dumpkvs`` (last value wins)."""
    _get().logkv(key, value)


def logkv_mean(key: str, value: Any) -> None:
    """Accumulate ``value`` into the running mean of ``key`` until the next ``dumpkvs``."""
    _get().logkv_mean(key, value)


def dumpkvs() -> dict[str, Any]:
    """Write the pending key/values to every output, clear them and return them."""
    return _get().dumpkvs()


def getkvs() -> dict[str, Any]:
    """The pending (not yet dumped) key/values."""
    return _get().kvs


def get_dir() -> str:
    """The log directory of the current configuration."""
    return _get().dir


def close() -> None:
    """Close the outputs' files (logging afterwards goes to stdout only)."""
    global _current
    if _current is not None:
        _current.close()
        _current = None


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        s = f"{v:<8.3g}"
    else:
        s = str(v)
    return s if len(s) <= 30 else s[:27] + "..."
