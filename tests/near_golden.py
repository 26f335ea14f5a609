"""Golden-value comparisons that hold across CPU types.

Results are bit-identical on one machine, but the last bits of float arithmetic differ between CPU
families (AVX-512 or AVX2 kernels, other BLAS code paths): a pinned value recorded on one machine is
compared here within float-rounding tolerance, while integers, strings and shapes must match exactly.
A behaviour change (another random draw, another formula) moves the values by far more than the
tolerance.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterator
from typing import Any

import torch

REL = 1e-3  # floats, relative (seen between CPU types and thread counts: up to 1e-4 on a map maximum)
ABS = 1e-6
CHECKPOINT_REL = 1e-3  # checkpoints: relative to each file's scale (see checkpoint_mismatches)


def state_leaves(obj: Any, key: str = "") -> Iterator[tuple[str, Any]]:
    """(key path, leaf) for every tensor and plain value of a nested state dict, dict keys sorted."""
    if isinstance(obj, dict):
        for k in sorted(obj, key=str):
            yield from state_leaves(obj[k], f"{key}/{k}")
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            yield from state_leaves(v, f"{key}/{i}")
    else:
        yield key, obj


def tensor_fingerprint(obj: Any) -> dict[str, Any]:
    """{key path: summary} over every tensor and plain value of a nested state dict.

    Float tensors (numel > 1) become {"shape", "rms", "mean", "first", "middle", "last"}; other tensors
    and plain values are kept exactly (as lists or repr).
    """
    out: dict[str, Any] = {}
    for key, o in state_leaves(obj):
        if not isinstance(o, torch.Tensor):
            out[key] = repr(o)
            continue
        t = o.detach().cpu()
        if t.is_floating_point() and t.numel() > 1:
            v = t.double().flatten()
            out[key] = {"shape": list(t.shape), "rms": float(v.square().mean().sqrt()),
                        "mean": float(v.mean()), "first": float(v[0]), "middle": float(v[v.numel() // 2]),
                        "last": float(v[-1])}
        else:
            out[key] = {"shape": list(t.shape), "values": t.double().flatten().tolist()
                        if t.is_floating_point() else t.flatten().tolist()}
    return out


def _floats_close(got: float, want: float, rel: float, scale: float) -> bool:
    if math.isnan(want) or math.isnan(got):
        return math.isnan(want) and math.isnan(got)
    return math.isclose(got, want, rel_tol=rel, abs_tol=max(ABS, rel * scale))


def mismatches(got: Any, want: Any, path: str = "", rel: float = REL, scale: float = 0.0) -> list[str]:
    """Where ``got`` differs from ``want`` (nested dicts/lists of numbers and strings): floats within
    ``rel`` of the value or of ``scale`` (a typical magnitude of the whole record), everything else
    exactly."""
    if isinstance(want, dict) and isinstance(got, dict):
        if set(got) != set(want):
            return [f"{path}: keys {sorted(set(got) ^ set(want))} differ"]
        return [m for k in want for m in mismatches(got[k], want[k], f"{path}/{k}", rel, scale)]
    if isinstance(want, list) and isinstance(got, list):
        if len(got) != len(want):
            return [f"{path}: length {len(got)} != {len(want)}"]
        return [m for i, (g, w) in enumerate(zip(got, want))
                for m in mismatches(g, w, f"{path}[{i}]", rel, scale)]
    if isinstance(want, float) and isinstance(got, int | float) and not isinstance(got, bool):
        return [] if _floats_close(float(got), want, rel, scale) else [f"{path}: {got!r} != {want!r}"]
    return [] if got == want else [f"{path}: {got!r} != {want!r}"]


def checkpoint_mismatches(got: dict[str, Any], want: dict[str, Any]) -> list[str]:
    """``mismatches`` for {file: tensor_fingerprint}: each file's floats within CHECKPOINT_REL of the
    file's largest tensor rms. Adam moves parameters whose gradients are close to zero by amounts that
    rounding decides (seen: up to 19x such a tensor's own rms between CPU kernels, 3e-5 of the file's
    scale), so a per-tensor tolerance would not hold across CPU types; another seed moves values by
    about 3x the file's scale."""
    if set(got) != set(want):
        return [f"files {sorted(set(got) ^ set(want))} differ"]
    out = []
    for name, fp in want.items():
        scale = max((v["rms"] for v in fp.values() if isinstance(v, dict) and "rms" in v), default=0.0)
        out += mismatches(got[name], fp, name, CHECKPOINT_REL, scale)
    return out


def csv_rows(text: str) -> list[dict[str, Any]]:
    """CSV text as rows of {column: int | float | str} (numbers parsed, so they compare by value)."""
    def parse(v: str) -> Any:
        for kind in (int, float):
            try:
                return kind(v)
            except ValueError:
                pass
        return v

    return [{k: parse(v) for k, v in row.items()} for row in csv.DictReader(io.StringIO(text))]


def assert_near(got: Any, want: Any, what: str, checkpoints: bool = False) -> None:
    """Assert ``got`` matches ``want`` (``mismatches``, or ``checkpoint_mismatches`` for
    {file: tensor_fingerprint}), listing the first differences."""
    bad = checkpoint_mismatches(got, want) if checkpoints else mismatches(got, want)
    assert not bad, f"{what}: {len(bad)} differences, first: {bad[:5]}"
