"""Evaluation batch size sized to the device (``--batch_size auto``).

Rule: on CUDA, the largest batch in ``candidates`` (powers of two up to ``max_batch``) for which one
probe call succeeds without running out of memory, halved once more for headroom when it is not the
largest candidate (``headroom=True``); on CPU, where bigger batches do not run faster per slice and memory is
the host's, a fixed ``cpu_batch`` (default 8).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def parse_batch_size(value: str | int, flag: str = "--batch_size") -> int | None:
    """``"auto"`` -> None (decide later), a positive integer -> itself, else ValueError naming ``flag``."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return None
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{flag} must be a positive integer or 'auto', got {value!r}") from None
    if n < 1:
        raise ValueError(f"{flag} must be a positive integer or 'auto', got {value!r}")
    return n


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def auto_batch_size(
    probe: Callable[[int], None],
    device: torch.device | str,
    *,
    max_batch: int = 256,
    cpu_batch: int = 8,
    headroom: bool = True,
) -> int:
    """Largest batch that ``probe(batch)`` runs on ``device`` without OOM (see module docstring).

    Args:
        probe: runs one representative step (e.g. one forward-process network call) at the given batch.
        device: where the probe runs; CPU returns ``cpu_batch`` without probing.
        max_batch: the largest batch tried.
    """
    if torch.device(device).type != "cuda":
        return cpu_batch
    best = 0
    n = 1
    while n <= max_batch:
        try:
            probe(n)
        except (RuntimeError, torch.OutOfMemoryError) as err:
            if not _is_oom(err):
                raise
            torch.cuda.empty_cache()
            break
        best = n
        n *= 2
    if best == 0:
        raise ValueError("--batch_size auto: even one slice does not fit on the device")
    torch.cuda.empty_cache()
    return max(1, best // 2) if headroom and best < max_batch else best
