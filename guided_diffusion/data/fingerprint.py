"""Content fingerprint of a preprocessed dataset: what stored results and trained models are keyed by.

A split's digest is the sha256 over (relative path, sha256 of the bytes) of every file the loaders read
for it: every file under ``ROOT/npy_<split>/`` (slices and meta.json) and its split list
``ROOT/data_splits/<split>/scans.csv``. A fingerprint of several splits is the sha256 over their names and
digests, so a regenerated or re-preprocessed dataset at the same path gets a new fingerprint even when every
file keeps its name and size.

The per-file hashes are cached beside the data in ``ROOT/.data_fingerprint.json`` with each file's size and
mtime (ns): a later call hashes again only the files whose size or mtime changed (or that are new). The
cache is written atomically; when it cannot be written (read-only data) everything still works, every call
just hashes every file. The cache also keeps the last few earlier states, so that ``explain`` can name what
changed since a stored fingerprint ("ROOT/npy_test: 3 slice files changed since ...").
See docs/edges.md.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from guided_diffusion.utils.io_util import atomic_write_text, file_sha256

CACHE_NAME = ".data_fingerprint.json"
CACHE_VERSION = 1
HISTORY = 3  # earlier states kept in the cache for ``explain``
ALL_SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class DataFingerprint:
    """The fingerprint of ``splits`` of the data root ``data_dir``.

    ``digest``: sha256 hex over the split digests; ``split_digests``: {split: sha256 hex};
    ``files``: {path relative to the root: sha256 hex} of every file that entered it."""

    data_dir: str
    splits: tuple[str, ...]
    digest: str
    split_digests: Mapping[str, str]
    files: Mapping[str, str]

    @property
    def short(self) -> str:
        return self.digest[:12]


def _split_files(root: str, split: str) -> list[str]:
    """Relative paths of the files that make up ``split`` (sorted); FileNotFoundError when it is absent."""
    folder = os.path.join(root, f"npy_{split}")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"data root {root} has no npy_{split}/ folder: not a preprocessed data root "
                                "(see scripts/preprocess.py or scripts/make_synthetic_brats.py)")
    rels = []
    for dirpath, dirnames, names in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rels += [os.path.relpath(os.path.join(dirpath, n), root) for n in names if not n.startswith(".")]
    scans = os.path.join("data_splits", split, "scans.csv")
    if os.path.isfile(os.path.join(root, scans)):
        rels.append(scans)
    return sorted(r.replace(os.sep, "/") for r in rels)


def split_digest(files: Mapping[str, str], rels: Iterable[str]) -> str:
    """sha256 over the lines ``path NUL sha256`` of ``rels`` (in the given order)."""
    h = hashlib.sha256()
    for rel in rels:
        h.update(f"{rel}\0{files[rel]}\n".encode())
    return h.hexdigest()


def combine(split_digests: Mapping[str, str], splits: Sequence[str]) -> str:
    """The fingerprint of ``splits`` from their digests (order-independent)."""
    h = hashlib.sha256()
    for split in sorted(splits):
        h.update(f"{split}:{split_digests[split]}\n".encode())
    return h.hexdigest()


def _read_cache(root: str) -> dict[str, Any]:
    try:
        with open(os.path.join(root, CACHE_NAME), encoding="utf-8") as f:
            cache = json.load(f)
    except (OSError, ValueError):
        return {}
    if not isinstance(cache, dict) or cache.get("version") != CACHE_VERSION:
        return {}
    if not isinstance(cache.get("files"), dict) or not isinstance(cache.get("splits"), dict):
        return {}
    return cache


def _write_cache(root: str, cache: Mapping[str, Any]) -> bool:
    """Write the cache atomically; False (nothing written) when the data root is not writable."""

    try:
        atomic_write_text(json.dumps(cache, sort_keys=True, separators=(",", ":")) + "\n",
                          os.path.join(root, CACHE_NAME))
    except OSError:
        return False
    return True


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def data_fingerprint(data_dir: str, splits: Sequence[str] = ALL_SPLITS) -> DataFingerprint:
    """The content fingerprint of ``splits`` of ``data_dir`` (see module doc); updates the cache.

    Args:
        data_dir: preprocessed data root (``npy_<split>/``, ``data_splits/``).
        splits: the splits the caller reads (e.g. ("train",) for training, ("val",) for calibration).
    """
    root = os.path.abspath(data_dir)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data root {data_dir} does not exist")
    splits = tuple(dict.fromkeys(splits))
    bad = [s for s in splits if s not in ALL_SPLITS]
    if bad or not splits:
        raise ValueError(f"splits must be a non-empty subset of {ALL_SPLITS}, got {list(splits)}")
    cache = _read_cache(root)
    known: dict[str, dict[str, Any]] = dict(cache.get("files", {}))
    changed = False
    files: dict[str, str] = {}
    split_rels: dict[str, list[str]] = {}
    for split in splits:
        split_rels[split] = _split_files(root, split)
        for rel in split_rels[split]:
            st = os.stat(os.path.join(root, rel))
            entry = known.get(rel)
            if (not isinstance(entry, dict) or entry.get("size") != st.st_size
                    or entry.get("mtime_ns") != st.st_mtime_ns or not isinstance(entry.get("sha256"), str)):
                entry = {"size": st.st_size, "mtime_ns": st.st_mtime_ns,
                         "sha256": file_sha256(os.path.join(root, rel))}
                known[rel] = entry
                changed = True
            files[rel] = entry["sha256"]
    digests = {s: split_digest(files, split_rels[s]) for s in splits}
    old_splits: dict[str, Any] = dict(cache.get("splits", {}))
    prefixes = tuple(f"npy_{s}/" for s in splits) + tuple(f"data_splits/{s}/" for s in splits)
    gone = [r for r in known if r.startswith(prefixes) and r not in files]
    for rel in gone:
        del known[rel]
    changed = changed or bool(gone)
    history = list(cache.get("history", []))
    moved = {s: old_splits[s] for s in splits
             if isinstance(old_splits.get(s), dict) and old_splits[s].get("digest") != digests[s]}
    if moved:  # keep the earlier state of the changed splits for ``explain``
        old_files = {r: e["sha256"] for r, e in cache.get("files", {}).items()
                     if isinstance(e, dict) and r.startswith(tuple(f"npy_{s}/" for s in moved)
                                                             + tuple(f"data_splits/{s}/" for s in moved))}
        history.insert(0, {"splits": moved, "files": old_files})
        history = history[:HISTORY]
    stamp = _now()
    new_splits = dict(old_splits)
    for s in splits:
        prev = old_splits.get(s)
        same = isinstance(prev, dict) and prev.get("digest") == digests[s]
        new_splits[s] = prev if same else {"digest": digests[s], "computed_at": stamp}
    if changed or moved or new_splits != old_splits:
        _write_cache(root, {"version": CACHE_VERSION, "files": known, "splits": new_splits,
                            "history": history})
    return DataFingerprint(data_dir=root, splits=splits, digest=combine(digests, splits),
                           split_digests=digests, files=files)


def _count(old: Mapping[str, str], new: Mapping[str, str], prefix: str) -> tuple[int, int, int]:
    a = {r: h for r, h in old.items() if r.startswith(prefix)}
    b = {r: h for r, h in new.items() if r.startswith(prefix)}
    changed = sum(1 for r in a.keys() & b.keys() if a[r] != b[r])
    return changed, len(b.keys() - a.keys()), len(a.keys() - b.keys())


def explain(data_dir: str, old_digest: str, new: DataFingerprint) -> str:
    """One line naming what changed in ``data_dir`` between a stored fingerprint ``old_digest`` and ``new``
    (from the cache's earlier states; a general line when the earlier state is not known)."""
    root = os.path.abspath(data_dir)
    arrow = f"(fingerprint {str(old_digest)[:8]} -> {new.digest[:8]})"
    cache = _read_cache(root)
    for state in cache.get("history", []):
        old_splits = {s: v.get("digest") for s, v in state.get("splits", {}).items() if isinstance(v, dict)}
        candidate = {s: old_splits.get(s, new.split_digests[s]) for s in new.splits}
        if not old_splits or combine(candidate, new.splits) != old_digest:
            continue
        parts = []
        for s in new.splits:
            if s not in old_splits:
                continue
            changed, added, removed = _count(state.get("files", {}), new.files, f"npy_{s}/")
            what = [f"{n} {word}" for n, word in ((changed, "slice files changed"), (added, "added"),
                                                   (removed, "removed")) if n]
            lists = _count(state.get("files", {}), new.files, f"data_splits/{s}/")
            if any(lists):
                what.append("split list changed")
            since = state["splits"][s].get("computed_at", "an earlier run")
            parts.append(f"{os.path.join(root, 'npy_' + s)}: {', '.join(what) or 'files changed'} "
                         f"since {since}")
        return "; ".join(parts) + f" {arrow}"
    return f"{root}: the slice files or split lists changed since the stored result was made {arrow}"
