"""BraTS21 / ATLAS NIfTI volumes -> the 2-D slice layout of docs/method.md, 'Preprocessing'.

Output layout (``R`` = output root)::
    R/data_splits/{train,val,test}/scans.csv          subject folder names, one per line, no header
    R/npy_{split}/patient_{id}/slice_{k}.npz          x [1, C, S, S] float32, y [1, 1, S, S] float32
    R/npy_{split}/patient_{id}/meta.json              affine, raw shape, kept slice range, modalities
    R/preprocess_record.json                          source folder, its subjects and the options used

A rerun into an existing root whose source subjects or options differ from the record refuses in one line
(``overwrite=True`` rebuilds it, with a new split, in a temporary folder swapped in by renames). Every scan
is checked as it is read: finite voxels, the modalities of one subject on one grid, BraTS labels in
{0, 1, 2, 4}, no all-zero modality (see docs/edges.md).

Differences from upstream (all documented, none changes the network input):

* ``x`` is computed and stored as float32 (upstream float64;
  docs/method.md, 'Stored images and subject folders'). The loader rescales every slice.
* The mask is resized with area weighting by default (soft coverage fraction in [0, 1]);
  ``mask_resize="bilinear"`` reproduces upstream (docs/method.md, 'Lesion masks at low resolution').
* Only directories of ``source`` are subjects; stray files are ignored
  (docs/method.md, 'Stored images and subject folders').
* The split keeps the upstream rule (``random.seed(10)`` shuffle, 75 / 5 / 20) but guarantees at least one
  subject in val and test (identical to upstream for N >= 20, e.g. BraTS21 1251 -> 938 / 62 / 251).
* Slice numbers ``k`` are indices into the original volume's last axis (also with ``first``/``last``).
* The 99th-percentile normalisation is kept for fidelity; it is cancelled by the loader's per-slice
  min-max rescale (docs/method.md, 'Intensity normalisation') and only affects the brain-slice criterion.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from guided_diffusion.utils.io_util import atomic_write_bytes, atomic_write_text

BRATS_MODALITIES = ("flair", "t1", "t1ce", "t2")
MOD_CHOICES = ("all", "flair", "t1", "t1ce", "t2")
NAME_CHOICES = ("brats", "atlas")
MASK_RESIZE_CHOICES = ("area", "bilinear")
SPLITS = ("train", "val", "test")
BRAIN_SLICE_THRESHOLD = 0.5
RECORD = "preprocess_record.json"
BRATS_LABELS = (0, 1, 2, 4)
AFFINE_ATOL = 1e-3  # mm: modalities of one subject must share the voxel grid
# files of an output root besides data_splits/ and npy_*/ (replaced with it; the fingerprint cache of
# guided_diffusion/data/fingerprint.py is kept so that a later run can name what changed)
_ROOT_FILES = (RECORD, ".data_fingerprint.json")


def modality_list(name: str, mod: str) -> list[str]:
    """Modalities (channel order) for ``--name``/``--mod``; BraTS ``all`` = FLAIR, T1, T1ce, T2."""
    if name not in NAME_CHOICES:
        raise ValueError(f"--name {name!r} is not supported; choose one of {NAME_CHOICES}")
    if mod not in MOD_CHOICES:
        raise ValueError(f"--mod {mod!r} is not valid; choose one of {MOD_CHOICES}")
    if name == "atlas":
        if mod != "t1":
            raise ValueError(f"--name atlas has only a T1w image; use --mod t1 (got --mod {mod})")
        return ["t1"]
    return list(BRATS_MODALITIES) if mod == "all" else [mod]


def subject_files(subject_dir: Path, name: str, mods: Sequence[str]) -> tuple[list[Path], Path]:
    """Expected image files (channel order) and label file of one subject folder."""
    sid = subject_dir.name
    if name == "atlas":
        return [subject_dir / f"{sid}_T1w.nii.gz"], subject_dir / f"{sid}_mask.nii.gz"
    return [subject_dir / f"{sid}_{m}.nii.gz" for m in mods], subject_dir / f"{sid}_seg.nii.gz"


def check_subject_files(subject_dir: Path, name: str, mods: Sequence[str]) -> None:
    """Raise FileNotFoundError naming the subject and the first missing file."""
    images, label = subject_files(subject_dir, name, mods)
    for f in [*images, label]:
        if not f.is_file():
            raise FileNotFoundError(
                f"subject {subject_dir.name!r} lacks file {f.name} (expected {f}); "
                f"every subject folder needs {', '.join(p.name for p in [*images, label])}. "
                "Add the file or remove the subject folder."
            )


def list_subjects(source: str | Path) -> list[str]:
    """Sorted names of the sub-directories of ``source`` (files are ignored;
    docs/method.md, 'Stored images and subject folders')."""
    source = Path(source)
    if not source.is_dir():
        raise FileNotFoundError(
            f"--source {source} is not a directory; pass the folder with one sub-folder per subject"
        )
    subjects = sorted(p.name for p in source.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subjects:
        raise FileNotFoundError(f"--source {source} contains no subject folders")
    return subjects


def split_counts(n: int) -> tuple[int, int, int]:
    """(n_train, n_val, n_test): int(0.75 n), int(0.05 n), rest; at least one subject in val and test."""
    if n < 3:
        raise ValueError(f"need at least 3 subjects to make a train/val/test split, got {n}")
    n_train = int(0.75 * n)
    n_val = max(1, int(0.05 * n))
    n_test = n - n_train - n_val
    if n_test < 1:
        n_train -= 1 - n_test
        n_test = 1
    return n_train, n_val, n_test


def split_subjects(subjects: Sequence[str], seed: int = 10) -> dict[str, list[str]]:
    """Reproducible split (docs/method.md, 'Preprocessing'): indices 0..N-1 shuffled as
    ``random.seed(seed); random.shuffle``."""
    idx = list(range(len(subjects)))
    random.Random(seed).shuffle(idx)
    n_train, n_val, _ = split_counts(len(subjects))
    order = [subjects[i] for i in idx]
    return {
        "train": order[:n_train],
        "val": order[n_train : n_train + n_val],
        "test": order[n_train + n_val :],
    }


def write_splits(root: Path, splits: dict[str, list[str]]) -> None:
    """Write ``root/data_splits/{split}/scans.csv`` (one subject name per line, no header)."""
    for split in SPLITS:
        text = "".join(f"{s}\n" for s in splits[split])
        atomic_write_text(text, str(root / "data_splits" / split / "scans.csv"))


def read_splits(root: Path) -> dict[str, list[str]]:
    """Read existing split files; FileNotFoundError naming the missing file."""
    out = {}
    for split in SPLITS:
        f = root / "data_splits" / split / "scans.csv"
        if not f.is_file():
            raise FileNotFoundError(
                f"split file {f} is missing; delete {root / 'data_splits'} to re-create the split"
            )
        out[split] = [line.strip() for line in f.read_text().splitlines() if line.strip()]
    return out


def normalise_percentile(vol: np.ndarray, q: float = 99.0) -> np.ndarray:
    """Divide each channel of ``vol`` [C, ...] by the ``q``-th percentile of its non-zero voxels.

    Linear interpolation (same as ``torch.quantile``); float32 result. An all-zero channel stays zero.
    """
    out = np.empty(vol.shape, dtype=np.float32)
    for c in range(vol.shape[0]):
        chan = np.asarray(vol[c], dtype=np.float32)
        nz = chan[chan != 0]
        scale = np.float32(np.percentile(nz, q)) if nz.size else np.float32(0.0)
        np.divide(chan, scale if scale > 0 else np.float32(1.0), out=out[c])
    return out


def brain_slice_range(vol: np.ndarray, first: int = 0, last: int = 0) -> tuple[int, int]:
    """Inclusive range [lo, hi] of axial slices (last axis) from the first to the last slice with brain.

    ``vol`` [C, H, W, D] (normalised). A slice has brain if the sum over H, W of the channel mean > 0.5.
    ``first``/``last`` > 0 drop that many slices at the start / end before the test.
    """
    depth = vol.shape[-1]
    score = vol.mean(axis=0).sum(axis=(0, 1))
    has_brain = score > BRAIN_SLICE_THRESHOLD
    has_brain[: max(first, 0)] = False
    if last > 0:
        has_brain[depth - last :] = False
    hits = np.flatnonzero(has_brain)
    if hits.size == 0:
        raise ValueError("no axial slice has brain (channel-mean sum > 0.5); is the volume empty?")
    return int(hits[0]), int(hits[-1])


def resize_slices(
    x: np.ndarray | torch.Tensor, mask: np.ndarray | torch.Tensor, shape: int, mask_resize: str = "area"
) -> tuple[np.ndarray, np.ndarray]:
    """Resize image slices bilinearly (no antialias, align_corners False) and masks by ``mask_resize``.

    Args:
        x: [S, C, H, W] images (array or tensor); mask: [S, 1, H, W] binary mask.
        shape: output size (square); mask_resize: "area" (coverage fraction) or "bilinear" (upstream).
    Returns:
        x [S, C, shape, shape] float32, y [S, 1, shape, shape] float32 in [0, 1].
    """
    if mask_resize not in MASK_RESIZE_CHOICES:
        raise ValueError(f"--mask_resize {mask_resize!r} is not valid; choose one of {MASK_RESIZE_CHOICES}")
    xt = torch.as_tensor(x, dtype=torch.float32)
    mt = torch.as_tensor(mask, dtype=torch.float32)
    xr = F.interpolate(xt, size=(shape, shape), mode="bilinear", align_corners=False)
    if mask_resize == "area":
        yr = F.interpolate(mt, size=(shape, shape), mode="area")
    else:
        yr = F.interpolate(mt, size=(shape, shape), mode="bilinear", align_corners=False)
    return xr.contiguous().numpy(), yr.clamp(0, 1).contiguous().numpy()


def process_volumes(
    image: np.ndarray,
    seg: np.ndarray,
    shape: int = 128,
    first: int = 0,
    last: int = 0,
    mask_resize: str = "area",
) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Steps 2-5 of docs/method.md, 'Preprocessing' for one subject.

    Args:
        image: [C, H, W, D] volumes in channel order (computed in float32: exact for BraTS int16 and float32
            data); seg: [H, W, D] labels (any > 0.5 is lesion).
    Returns:
        x [S, C, shape, shape] float32, y [S, 1, shape, shape] float32, (lo, hi) inclusive slice range.
    """
    mask = (seg > 0.5).astype(np.float32)
    vol = normalise_percentile(image)
    lo, hi = brain_slice_range(vol, first, last)
    xs = torch.from_numpy(vol[..., lo : hi + 1]).permute(3, 0, 1, 2)  # [S, C, H, W]
    ms = torch.from_numpy(mask[None, ..., lo : hi + 1]).permute(3, 0, 1, 2)  # [S, 1, H, W]
    x, y = resize_slices(xs, ms, shape, mask_resize)
    return x, y, (lo, hi)


def npz_bytes(x: np.ndarray, y: np.ndarray) -> bytes:
    """Compressed npz with keys x, y rendered in memory."""
    buf = io.BytesIO()
    np.savez_compressed(buf, x=x, y=y)
    return buf.getvalue()


def write_patient(
    root: Path,
    split: str,
    patient: str,
    x: np.ndarray,
    y: np.ndarray,
    slice_range: tuple[int, int],
    affine: np.ndarray,
    raw_shape: Sequence[int],
    modalities: Sequence[str],
    slice_step: int = 1,
) -> Path:
    """Write ``slice_{k}.npz`` for k = lo, lo + slice_step, ... <= hi (x [S, C, H, W], y [S, 1, H, W] hold
    exactly those slices) and meta.json (last).

    Stale ``slice_*.npz`` from an earlier run that are not part of the new range are removed.
    """
    pdir = root / f"npy_{split}" / f"patient_{patient}"
    lo, hi = slice_range
    numbers = range(lo, hi + 1, slice_step)
    if len(numbers) != x.shape[0]:
        raise ValueError(f"{patient}: {x.shape[0]} slices given for slice numbers {list(numbers)}")
    names = set()
    for i, k in enumerate(numbers):
        name = f"slice_{k}.npz"
        names.add(name)
        atomic_write_bytes(npz_bytes(x[i : i + 1], y[i : i + 1]), str(pdir / name))
    for stale in pdir.glob("slice_*.npz"):
        if stale.name not in names:
            stale.unlink()
    meta = {
        "affine": np.asarray(affine, dtype=float).tolist(),
        "shape": [int(s) for s in raw_shape],
        "slices": [int(lo), int(hi)],
        "slice_step": int(slice_step),
        "modalities": list(modalities),
    }
    atomic_write_text(json.dumps(meta, indent=2) + "\n", str(pdir / "meta.json"))
    return pdir


def load_subject(
    subject_dir: Path, name: str, mods: Sequence[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Load one subject with nibabel: image [C, H, W, D] float32, seg [H, W, D] float32, affine [4, 4].

    float32 instead of upstream float64: exact for BraTS (int16) and ATLAS data, half the memory.
    """
    import nibabel as nib

    check_subject_files(subject_dir, name, mods)
    images, label = subject_files(subject_dir, name, mods)
    vols, affine = [], None
    for f in [*images, label]:
        try:
            img = nib.load(str(f))
            data = np.asarray(img.get_fdata(dtype=np.float32))
        except Exception as err:  # nibabel raises several types for broken files
            raise ValueError(f"subject {subject_dir.name!r}: cannot read {f} ({err})") from err
        if data.ndim != 3:
            raise ValueError(
                f"subject {subject_dir.name!r}: {f.name} has shape {data.shape}, expected a 3-D volume"
            )
        if vols and data.shape != vols[0].shape:
            raise ValueError(
                f"subject {subject_dir.name!r}: {f.name} has shape {data.shape}, but "
                f"{images[0].name} has {vols[0].shape}; all volumes must match"
            )
        if affine is not None and not np.allclose(img.affine, affine, rtol=0, atol=AFFINE_ATOL):
            raise ValueError(
                f"subject {subject_dir.name!r}: {f.name} is on another voxel grid than {images[0].name} "
                f"(affines differ by up to {np.abs(img.affine - affine).max():.4g} mm); co-register the "
                "modalities of the subject"
            )
        check_volume(subject_dir.name, f, data, is_label=f == label, name=name)
        if affine is None:
            affine = img.affine
        vols.append(data)
    return np.stack(vols[:-1]), vols[-1], affine


def check_volume(subject: str, path: Path, data: np.ndarray, is_label: bool, name: str = "brats") -> None:
    """ValueError naming the subject, the file and what is wrong with one volume as it is read.

    Args:
        data: [H, W, D] voxels; is_label: the segmentation (BraTS labels must be in {0, 1, 2, 4});
        otherwise an image modality (finite, not all zero)."""
    bad = int(data.size - np.count_nonzero(np.isfinite(data)))
    if bad:
        raise ValueError(f"subject {subject!r}: {path.name} has {bad} non-finite voxel(s) (NaN or inf); "
                         "fix or remove the scan")
    if is_label:
        if name != "brats":
            return
        values = np.unique(data)
        extra = [v for v in values.tolist() if v not in BRATS_LABELS]
        if extra:
            shown = ", ".join(f"{v:g}" for v in extra[:5])
            raise ValueError(f"subject {subject!r}: {path.name} has label values {shown}, expected only "
                             f"{set(BRATS_LABELS)} (BraTS: 1 necrosis, 2 oedema, 4 enhancing)")
    elif not np.any(data):
        raise ValueError(f"subject {subject!r}: {path.name} is all zero (an empty modality); fix or remove "
                         "the scan")


def default_out(source: str | Path, mod: str, first: int, last: int, shape: int) -> Path:
    """Spec 1.1 output root: ``source.parent / preprocessed_data_{mod}_{first}{last}_{shape}``."""
    source = Path(source).resolve()
    return source.parent / f"preprocessed_data_{mod}_{first}{last}_{shape}"


def _check_output_root(root: Path) -> None:
    """An existing output root may only hold a preprocessed dataset (it is replaced as a whole)."""
    if not root.exists():
        return
    if not root.is_dir():
        raise NotADirectoryError(f"--out {root} exists and is not a directory")
    foreign = [p.name for p in root.iterdir()
               if p.name not in ("data_splits", *_ROOT_FILES) and not p.name.startswith("npy_")]
    if foreign:
        names = ", ".join(sorted(foreign)[:5])
        raise FileExistsError(
            f"--out {root} holds files that are not a preprocessed dataset ({names}); "
            "it would be replaced as a whole: choose a new or empty folder"
        )


def _swap_into_place(tmp: Path, root: Path) -> None:
    """Replace ``root`` by the finished ``tmp`` tree with renames (the old tree is removed afterwards)."""
    if root.exists():
        old = root.parent / f".{root.name}.old-{os.getpid()}"
        os.replace(root, old)
        os.replace(tmp, root)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, root)


def read_record(root: Path) -> dict | None:
    """The output root's preprocess_record.json, or None when absent (an output of an older version);
    ValueError naming the file when it is unreadable."""
    path = root / RECORD
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); rerun with --overwrite to rebuild "
                         f"{root}") from None
    if not isinstance(rec, dict) or not isinstance(rec.get("subjects"), list):
        raise ValueError(f"{path} lacks the list 'subjects'; rerun with --overwrite to rebuild {root}")
    return rec


def _names(items: Sequence[str]) -> str:
    return ", ".join(items[:5]) + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")


def input_differences(root: Path, subjects: Sequence[str], options: dict) -> list[str]:
    """What differs between an existing output root (its record, else its split lists) and this run's
    source ``subjects`` and ``options``; empty when the run would rebuild the same dataset."""
    rec = read_record(root)
    before = rec["subjects"] if rec is not None else [s for sp in read_splits(root).values() for s in sp]
    diffs = []
    added = sorted(set(subjects) - set(before))
    removed = sorted(set(before) - set(subjects))
    if added:
        diffs.append(f"the source has {len(added)} new subject(s) {_names(added)}")
    if removed:
        diffs.append(f"the source lacks {len(removed)} subject(s) of the output {_names(removed)}")
    for key, value in (rec or {}).get("options", {}).items():
        if key in options and options[key] != value:
            diffs.append(f"--{key} {value} -> {options[key]}")
    return diffs


def preprocess(
    source: str | Path,
    name: str = "brats",
    mod: str = "all",
    first: int = 0,
    last: int = 0,
    shape: int = 128,
    out: str | Path | None = None,
    mask_resize: str = "area",
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Preprocess every subject folder of ``source`` into the slice layout; returns the output root.

    All subjects are checked for missing files before anything is written. An existing output root is
    rebuilt with its split only when its record (source subjects and options) matches this run; otherwise
    the run refuses naming what differs, or with ``overwrite`` rebuilds it with a new split of every subject.
    The tree is written to a temporary sibling ``.{root}.partial-{pid}`` and renamed to the output root only
    when every subject succeeded, so a bad scan found mid-run leaves no partial output (an existing output
    root stays as it was; after success it is replaced as a whole).
    """

    mods = modality_list(name, mod)
    if shape <= 0:
        raise ValueError(f"--shape must be positive, got {shape}")
    if mask_resize not in MASK_RESIZE_CHOICES:
        raise ValueError(f"--mask_resize {mask_resize!r} is not valid; choose one of {MASK_RESIZE_CHOICES}")
    if first < 0 or last < 0:
        raise ValueError(f"--first and --last must be >= 0, got {first} and {last}")
    source = Path(source)
    subjects = list_subjects(source)
    root = Path(out) if out is not None else default_out(source, mod, first, last, shape)
    options = {"name": name, "mod": mod, "first": first, "last": last, "shape": shape,
               "mask_resize": mask_resize}
    _check_output_root(root)
    if (root / "data_splits").is_dir() and not overwrite:
        diffs = input_differences(root, subjects, options)
        if diffs:
            raise ValueError(
                f"--out {root} was preprocessed from other input ({'; '.join(diffs)}); rerun with "
                "--overwrite to rebuild it (a new split of every subject), or choose another --out"
            )
        splits = read_splits(root)
    else:
        splits = split_subjects(subjects)
    todo = [(sp, s) for sp in SPLITS for s in splits[sp]]
    for _, s in todo:
        check_subject_files(source / s, name, mods)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_splits(tmp, splits)
        bar = tqdm(todo, desc="preprocess", unit="subject", disable=not progress)
        for split, sid in bar:
            image, seg, affine = load_subject(source / sid, name, mods)
            try:
                x, y, rng = process_volumes(image, seg, shape, first, last, mask_resize)
            except ValueError as err:
                raise ValueError(f"subject {sid!r}: {err}") from err
            bar.set_postfix_str(f"{sid} slices {rng[0]}-{rng[1]}")
            write_patient(tmp, split, sid, x, y, rng, affine, image.shape[1:], mods)
        record = {"version": 1, "source": str(source.resolve()), "subjects": sorted(subjects),
                  "options": options}
        atomic_write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", str(tmp / RECORD))
        cache = root / ".data_fingerprint.json"
        if cache.is_file():  # keeps the earlier state, so that stale results can name what changed
            shutil.copy2(cache, tmp / cache.name)
        _swap_into_place(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
