"""Numeric precision and compilation of the network, shared by training and inference.

``autocast(device, precision)`` runs the network in fp32, bf16 or fp16 (torch.autocast; fp32 is a no-op);
the callers keep their statistics, accumulators and the DDIM inversion in fp32. ``maybe_compile`` wraps a
module with ``torch.compile`` when asked and falls back to eager with one logged line where compilation
is unsupported. ``to_channels_last`` converts a module's 4-D parameters and buffers to channels_last.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable

import torch
from torch import nn

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str, flag: str = "--precision") -> str:
    """``precision`` if it is one of PRECISIONS, else ValueError naming ``flag``."""
    if precision not in PRECISIONS:
        raise ValueError(f"{flag} must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def autocast(device: torch.device | str, precision: str = "fp32") -> contextlib.AbstractContextManager:
    """Context running the network in ``precision`` on ``device`` (fp32: no autocast at all).

    Args:
        device: the device the network runs on (its type selects the autocast backend).
        precision: "fp32", "bf16" or "fp16".
    """
    check_precision(precision)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=_DTYPES[precision])


def maybe_compile(
    model: nn.Module | Callable, enabled: bool, *, mode: str | None = None, log: Callable[[str], None] = print
) -> nn.Module | Callable:
    """``torch.compile(model, mode=mode)`` when ``enabled`` (else ``model`` unchanged).

    Compilation is lazy in torch; an error raised while wrapping (no compiler backend, unsupported
    platform) falls back to the eager model and logs one line saying so. ``mode="reduce-overhead"``
    asks for CUDA graphs, which fit the static shapes of the forward process.
    """
    if not enabled:
        return model
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.compile(model, mode=mode)
    except Exception as err:  # noqa: BLE001 - any backend failure means: run eagerly
        log(f"--compile: torch.compile is unavailable here ({type(err).__name__}: {err}); running eagerly")
        return model


def compile_mode(device: torch.device | str) -> str | None:
    """The torch.compile mode for the network on ``device``: "reduce-overhead" (CUDA graphs, which fit the
    forward process's one static shape per batch) on CUDA, the default elsewhere."""
    return "reduce-overhead" if torch.device(device).type == "cuda" else None


def to_channels_last(model: nn.Module) -> nn.Module:
    """Convert ``model`` (in place) to the channels_last memory format; returns it."""
    return model.to(memory_format=torch.channels_last)
