"""Atomic file output: write to a temporary file beside the target, then rename.

A reader (or a run killed mid-write) therefore sees either the previous complete file or the
new complete file, never a truncated one. Works for local paths and any blobfile path.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import uuid
from collections.abc import Mapping
from typing import Any

import blobfile as bf
import numpy as np
import torch


def _tmp_path(path: str) -> str:
    directory, name = os.path.split(path)
    return bf.join(directory or ".", f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def atomic_write_bytes(data: bytes, path: str) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, then rename)."""
    path = os.fspath(path)
    directory = os.path.dirname(path)
    if directory:
        bf.makedirs(directory)
    tmp = _tmp_path(path)
    try:
        with bf.BlobFile(tmp, "wb") as f:
            f.write(data)
            f.flush()
            if hasattr(f, "fileno"):
                try:
                    os.fsync(f.fileno())
                except (OSError, io.UnsupportedOperation):
                    pass
        if _is_local(path):
            os.replace(tmp, path)
        else:
            bf.copy(tmp, path, overwrite=True)
            bf.remove(tmp)
    except BaseException:
        if bf.exists(tmp):
            bf.remove(tmp)
        raise


def atomic_write_text(text: str, path: str) -> None:
    """Write a UTF-8 text file atomically."""
    atomic_write_bytes(text.encode("utf-8"), path)


def atomic_write_json(obj: Any, path: str) -> None:
    """Write ``obj`` as indented JSON atomically."""
    atomic_write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n", path)


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(buffer.getvalue(), path)


def _is_local(path: str) -> bool:
    return "://" not in path


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def file_sha256(path: str, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file (streamed)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _as_numpy(x: Any) -> np.ndarray:
    """A tensor (any device, bf16 as float32) or array-like as a numpy array."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        x = x.numpy()
    return np.asarray(x)


def strict_json(obj: Any) -> Any:
    """``obj`` converted recursively to strict-JSON types: mappings, sequences, tensors and numpy values
    become dicts, lists and numbers; NaN and inf become None; anything else is a ValueError."""
    if isinstance(obj, Mapping):
        return {str(k): strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    if hasattr(obj, "detach") or isinstance(obj, np.ndarray):
        return strict_json(_as_numpy(obj).tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise ValueError(f"cannot write a value of type {type(obj).__name__} to the metrics JSON; "
                     "convert it to a number, string, list or dict first")
