"""One run per output folder: an exclusive lock on a log dir for the lifetime of a run.

``with run_lock(log_dir, "--log_dir"):`` takes an exclusive ``fcntl.flock`` on ``<dir>/.run.lock`` and
writes the holder (pid, host, start time) into it. A second run on the same folder stops at once with a
``RunLockError`` naming the holder. The kernel drops the lock when its process dies, so the lock file of
a killed run is simply taken over. Call it on one process per run (rank 0).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import re
import socket
from collections.abc import Iterator

LOCK_NAME = ".run.lock"


class RunLockError(OSError):
    """The folder is locked by another live run."""


def _holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 4096).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "an unknown process"
    return f"pid {info.get('pid')} on host {info.get('host')} (since {info.get('started')})"


# what the files in a log dir show it holds (file names, or a regular expression for numbered files)
RUN_KINDS: dict[str, tuple[str, ...]] = {
    "training run": ("run_config.json", r"(model|state|opt)\d{6}\.pt", r"ema_.+_\d{6}\.pt"),
    "evaluation": ("metrics.json", "results", "slices.csv"),
    "guidance selection": ("guidance_selection.json",),
    "model export": ("model.safetensors",),
}


def outputs_of_other_runs(directory: str, kind: str) -> dict[str, list[str]]:
    """{run kind: names in ``directory`` that show it}, for the kinds of RUN_KINDS other than ``kind``."""
    names = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
    found: dict[str, list[str]] = {}
    for other, patterns in RUN_KINDS.items():
        hits = [n for n in names if other != kind and any(re.fullmatch(p, n) for p in patterns)]
        if hits:
            found[other] = hits
    return found


def refuse_other_runs(directory: str, kind: str, flag: str = "--log_dir") -> None:
    """FileExistsError naming ``flag`` when ``directory`` holds the outputs of another kind of run (a run of
    ``kind`` would write its own config.json, log.txt, calibration.json over theirs); a folder that is a
    file is a NotADirectoryError. A missing folder, or one of the same kind (a resume), passes."""
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise NotADirectoryError(f"{flag} {directory} is a file; expected a folder")
    found = outputs_of_other_runs(directory, kind)
    if found:
        what = "; ".join(f"{_a(k)} {k} ({', '.join(v[:3])}{', ...' if len(v) > 3 else ''})"
                         for k, v in found.items())
        raise FileExistsError(f"{flag} {directory} holds {what}; {_a(kind)} {kind} there would write over "
                              f"its files: pass a new {flag}")


def _a(noun: str) -> str:
    return "an" if noun[:1] in "aeiou" else "a"


def _open_lock_file(directory: str, flag: str) -> int:
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise NotADirectoryError(f"{flag} {directory} is a file; expected a folder")
    try:
        os.makedirs(directory, exist_ok=True)
        return os.open(os.path.join(directory, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise PermissionError(f"{flag} {directory} is not writable ({err.strerror}); "
                                  "pass a folder you can write to") from None
        raise OSError(f"{flag} {directory}: cannot create the run lock ({err.strerror})") from None


@contextlib.contextmanager
def run_lock(directory: str, flag: str = "--log_dir") -> Iterator[str]:
    """Hold the exclusive lock on ``directory`` (created if needed) while the block runs; yields the lock
    file path. Raises RunLockError naming the holder when another run has it, and PermissionError naming
    ``flag`` when the folder is not writable."""
    directory = os.path.abspath(directory)
    fd = _open_lock_file(directory, flag)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunLockError(f"{flag} {directory} is in use by another run: {_holder(fd)}; wait for it "
                               f"to finish or use another {flag}") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.datetime.now().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        yield os.path.join(directory, LOCK_NAME)
    finally:
        os.close(fd)  # releases the flock
