"""Resumable, never-mixed caches of the evaluation: per-batch files saved atomically under a folder that
also holds ``fingerprint.json``, the checkpoint sha256 and every setting that changes what the files hold.

``open_cache(folder, fingerprint, resume, on_mismatch)`` returns the saved records when they were made under
the same fingerprint; otherwise it stops with one line naming the differing settings ("stop") or empties
the folder and starts again ("recompute"). Files of another fingerprint are never read.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from guided_diffusion.data.fingerprint import data_fingerprint, explain
from guided_diffusion.utils import dist_util
from guided_diffusion.utils.io_util import atomic_torch_save, atomic_write_json

FINGERPRINT = "fingerprint.json"


def _json_roundtrip(value: Any) -> Any:
    """``value`` as it reads back from JSON (sorted keys, tuples as lists, other objects as str)."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def batch_file(folder: str, prefix: str, idx: Sequence[int]) -> str:
    """The file of one batch of dataset indices (its first index and a digest of all of them)."""
    digest = hashlib.sha1(",".join(str(int(i)) for i in idx).encode()).hexdigest()[:10]
    return os.path.join(folder, f"{prefix}_{int(idx[0]):06d}_{digest}.pt")


def differences(stored: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """``key: stored -> now`` for every key whose value differs (or is present in one only)."""
    out = []
    for key in sorted(set(stored) | set(now)):
        a, b = stored.get(key, "<absent>"), now.get(key, "<absent>")
        if a != b:
            out.append(f"{key}: {a!r} -> {b!r}")
    return out


def data_key(data_dir: str, splits: Sequence[str]) -> dict[str, Any]:
    """The fingerprint entries that key a cache on the data it was computed from: ``data_dir`` (absolute),
    ``data_splits`` and ``data_sha256``, the content fingerprint of those splits
    (guided_diffusion/data/fingerprint.py)."""

    return {"data_dir": os.path.abspath(data_dir), "data_splits": list(splits),
            "data_sha256": data_fingerprint(data_dir, splits).digest}


def data_change(stored: Mapping[str, Any], now: Mapping[str, Any]) -> str | None:
    """One line naming what changed in the data when ``stored`` and ``now`` (fingerprints holding
    ``data_key``'s entries) differ in ``data_sha256``; None otherwise."""
    a, b = stored.get("data_sha256"), now.get("data_sha256")
    if a is None or b is None or a == b or not now.get("data_dir"):
        return None

    try:
        fp = data_fingerprint(str(now["data_dir"]), now.get("data_splits") or ("test",))
    except (OSError, ValueError):
        return f"the data in {now['data_dir']} changed (fingerprint {str(a)[:8]} -> {str(b)[:8]})"
    return explain(str(now["data_dir"]), str(a), fp)


def _clear(folder: str, prefix: str) -> None:
    for name in os.listdir(folder):
        if name.startswith(prefix + "_") and name.endswith(".pt"):
            os.remove(os.path.join(folder, name))


def open_cache(folder: str, prefix: str, fingerprint: Mapping[str, Any], *, resume: bool,
               on_mismatch: str, what: str, fresh_hint: str, write: bool = True) -> dict[int, dict]:
    """Records {dataset index: record} saved in ``folder`` under the same ``fingerprint`` (see module doc).

    Without ``resume`` the folder is emptied. ``write``: only one process (rank 0) writes the fingerprint.
    """
    fp = _json_roundtrip(dict(fingerprint))
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, FINGERPRINT)
    has_files = any(n.startswith(prefix + "_") and n.endswith(".pt") for n in os.listdir(folder))
    stored = None
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            try:
                stored = json.load(f)
            except json.JSONDecodeError:
                stored = None
    done: dict[int, dict] = {}
    if resume and has_files:
        if stored != fp:
            diffs = differences(stored or {}, fp) if isinstance(stored, dict) else ["no fingerprint.json"]
            if on_mismatch == "stop":
                change = data_change(stored, fp) if isinstance(stored, dict) else None
                if change is not None:
                    raise ValueError(f"--resume: the {what} in {folder} were computed on other data: "
                                     f"{change}; {fresh_hint}")
                raise ValueError(f"--resume: the {what} in {folder} were computed with other settings "
                                 f"({'; '.join(diffs)}); {fresh_hint}")
        else:
            done = load_records(folder, prefix)
    if not done and write:
        _clear(folder, prefix)
        atomic_write_json(fp, path)
    return done


def load_records(folder: str, prefix: str) -> dict[int, dict]:
    """Per-slice records of every saved batch file -> {dataset index: record}."""
    done: dict[int, dict] = {}
    for name in sorted(os.listdir(folder)):
        if name.startswith(prefix + "_") and name.endswith(".pt"):
            for rec in torch.load(os.path.join(folder, name), weights_only=False):
                done[int(rec["idx"])] = rec
    return done


def save_batch(folder: str, prefix: str, records: list[dict]) -> None:
    """Save one batch's records atomically."""
    atomic_torch_save(records, batch_file(folder, prefix, [r["idx"] for r in records]))


def open_shared(folder: str, prefix: str, fingerprint: Mapping[str, Any], *, resume: bool, **kw: Any
                ) -> dict[int, dict]:
    """``open_cache`` for every rank: all ranks check and read (read-only), then rank 0 alone empties the
    folder and writes the fingerprint when nothing is reused."""
    done = open_cache(folder, prefix, fingerprint, resume=resume, write=False, **kw)
    dist_util.barrier()
    if not done and dist_util.get_rank() == 0:
        open_cache(folder, prefix, fingerprint, resume=False, write=True, **kw)
    dist_util.barrier()
    return done
