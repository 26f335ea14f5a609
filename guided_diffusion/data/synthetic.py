"""Synthetic BraTS-like dataset built offline from the MNI152 2009 template shipped with nilearn.

Two styles (``style=`` / ``--style``):

* ``brats_like`` (default): the anatomy below plus healthy hyperintensities and lesions whose intensities
  overlap them (:mod:`guided_diffusion.data.synthetic_brats_like`), so thresholding FLAIR is imperfect
  as on BraTS (best-threshold Dice about 0.7 on the main job's data instead of 0.96);
* ``classic``: the original easy contrasts described here, bit-identical to earlier builds per seed.

Every build writes ``dataset_summary.json`` (settings, per-split counts and the FLAIR-threshold baseline
of :func:`guided_diffusion.data.flair_baseline.flair_threshold_baseline`).

Classic: each subject is a smooth random deformation of the MNI152 (2 mm) tissue probability maps (GM, WM and
CSF = brain mask - GM - WM) with modality contrasts per tissue class, per-subject intensity scaling,
a smooth multiplicative bias field and Rician noise. Unhealthy subjects get 1-2 tumours made of a
necrotic core (BraTS label 1), an enhancing rim (label 4) and oedema (label 2):

=============  =====  =====  =====  =====
tissue         FLAIR  T1     T1ce   T2
=============  =====  =====  =====  =====
CSF            dark   dark   dark   bright
grey matter    mid    mid    mid    mid
white matter   low    bright bright low
oedema         BRIGHT low    low    bright
enhancing rim  bright low    BRIGHT bright
necrosis       bright dark   dark   BRIGHT
=============  =====  =====  =====  =====

The raw volume lives on a 128 x 128 x 96 grid (2 mm, axial = last axis, background exactly 0 as in
skull-stripped BraTS) and goes through the same per-subject pipeline as real data
(:func:`guided_diffusion.data.preprocess.process_volumes`); the saved mask is binary
(area coverage > 0.5 after resizing). Everything is deterministic for a given seed: subject ``i`` draws
from ``numpy.random.default_rng(SeedSequence([seed, i]))``.

Split: the preprocessing rule (random.seed(10), 75 / 5 / 20) with at least one subject in val and test. In
each split ``min(n - 1, round(healthy_fraction * n))`` subjects are healthy (no tumour), so every split has
unhealthy subjects.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from guided_diffusion.data.flair_baseline import flair_threshold_baseline
from guided_diffusion.data.preprocess import (
    BRATS_MODALITIES,
    SPLITS,
    process_volumes,
    split_subjects,
    write_patient,
    write_splits,
)
from guided_diffusion.data.synthetic_anatomy import (
    CANVAS,
    GAIN,
    _rotation,
    _sample,
    assemble,
    load_atlas,
    warped_brain,
)
from guided_diffusion.data.synthetic_brats_like import generate_brats_like
from guided_diffusion.utils.io_util import atomic_write_bytes, atomic_write_text

CONTRAST = np.array(
    [
        [0.10, 0.15, 0.15, 1.00],
        [0.62, 0.55, 0.55, 0.60],
        [0.45, 0.85, 0.80, 0.38],
        [1.00, 0.40, 0.40, 0.92],
        [0.82, 0.45, 1.10, 0.75],
        [0.90, 0.15, 0.12, 1.08],
    ],
    dtype=np.float32,
)
STYLES = ("brats_like", "classic")
SUMMARY = "dataset_summary.json"  # build settings, per-split counts and FLAIR-threshold baselines


def _tumour_fractions(
    rng: np.random.Generator,
    pos: torch.Tensor,
    depth: torch.Tensor,
    r_range: tuple[float, float],
    n_tumours: int,
) -> torch.Tensor:
    """Soft indicators [3, N] (whole tumour, core, necrosis) at brain points ``pos`` [N, 3] (voxels)."""
    comps = torch.zeros(3, pos.shape[0])
    for _ in range(n_tumours):
        r = rng.uniform(*r_range)
        r_core = r * rng.uniform(0.42, 0.62)
        r_nec = r_core * rng.uniform(0.35, 0.65)
        cand = (depth >= max(3.0, 0.6 * r)).nonzero()[:, 0]
        if cand.numel() == 0:
            cand = torch.arange(pos.shape[0])
        centre = pos[cand[int(rng.integers(cand.numel()))]]
        rel = pos - centre
        near = (rel.abs() <= 1.6 * r + 2).all(1).nonzero()[:, 0]
        rot = torch.from_numpy(_rotation(rng, (30.0, 30.0, 180.0)).astype(np.float32))
        axes = torch.from_numpy(rng.uniform(0.8, 1.25, size=3).astype(np.float32))
        d = (rel[near] @ rot) / axes
        dist = d.norm(dim=1)
        coarse = torch.from_numpy(rng.standard_normal((1, 4, 4, 4)).astype(np.float32))
        wobble = _sample(coarse, (rel[near] / (1.6 * r + 2)).clamp(-1, 1), padding="border")[0]
        dist = dist / (1.0 + 0.15 * wobble)
        for c, rad in enumerate((r, r_core, r_nec)):
            ind = (0.5 + (rad - dist) / 1.5).clamp(0.0, 1.0)
            comps[c, near] = torch.maximum(comps[c, near], ind)
    return comps


def generate_subject(
    seed: int,
    index: int,
    healthy: bool,
    r_range: tuple[float, float] = (8.0, 20.0),
    noise: float = 0.025,
    style: str = "brats_like",
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic subject.

    Args:
        seed: dataset seed; index: subject number; healthy: no tumour if True.
        r_range: oedema radius range in 2 mm voxels; noise: Rician sigma relative to the tissue scale
            (both ``classic`` only); style: "brats_like" (default, see
            :mod:`guided_diffusion.data.synthetic_brats_like`) or "classic" (the original contrasts).
    Returns:
        image [4, 128, 128, 96] float32 (FLAIR, T1, T1ce, T2; 0 outside the brain),
        seg [128, 128, 96] uint8 BraTS labels (0, 1 necrosis, 2 oedema, 4 enhancing).
    """
    if style not in STYLES:
        raise ValueError(f"--style {style!r} is not valid; choose one of {STYLES}")
    if style == "brats_like":
        return generate_brats_like(seed, index, healthy)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(index)]))
    brain, inside, pts, gm, wm, depth = warped_brain(rng)
    csf = (1.0 - gm - wm).clamp(min=0)  # brain voxels not GM/WM are CSF
    tissue = torch.stack([csf, gm, wm])
    tissue = tissue / tissue.sum(0, keepdim=True).clamp(min=1e-6)
    pos = torch.from_numpy(np.stack(np.unravel_index(inside.numpy(), CANVAS), 1).astype(np.float32))
    if healthy:
        comps = torch.zeros(3, inside.numel())
    else:
        n_tumours = 1 if rng.random() < 0.5 else 2
        comps = _tumour_fractions(rng, pos, depth, r_range, n_tumours)
    whole, core, nec = comps[0], torch.minimum(comps[1], comps[0]), torch.minimum(comps[2], comps[1])
    fractions = torch.cat([tissue * (1.0 - whole), (whole - core)[None], (core - nec)[None], nec[None]])
    contrast = torch.from_numpy(CONTRAST * rng.uniform(0.95, 1.05, size=CONTRAST.shape).astype(np.float32))
    vals = contrast.T @ fractions  # [4, N]
    bias_coarse = torch.from_numpy(rng.standard_normal((4, 3, 3, 3)).astype(np.float32))
    centred = pos / torch.tensor([(s - 1) / 2 for s in CANVAS]) - 1.0
    vals = vals * torch.exp(0.12 * _sample(bias_coarse, centred, padding="border"))
    gain = torch.from_numpy(GAIN * rng.uniform(0.85, 1.15, size=4).astype(np.float32))
    n1 = torch.from_numpy(rng.standard_normal(tuple(vals.shape), dtype=np.float32)) * noise
    n2 = torch.from_numpy(rng.standard_normal(tuple(vals.shape), dtype=np.float32)) * noise
    vals = torch.sqrt((vals + n1) ** 2 + n2**2) * gain[:, None]
    return assemble(brain, inside, vals, whole, core, nec)


def _nifti_gz(vol: np.ndarray, affine: np.ndarray) -> bytes:
    import nibabel as nib

    img = nib.Nifti1Image(vol, affine)
    img.set_data_dtype(vol.dtype)
    return gzip.compress(img.to_bytes(), compresslevel=1, mtime=0)


def write_raw_subject(
    raw_dir: Path, sid: str, image: np.ndarray, seg: np.ndarray, affine: np.ndarray
) -> None:
    """Write BraTS-style NIfTI files ``{sid}/{sid}_{flair,t1,t1ce,t2,seg}.nii.gz``."""
    for c, mod in enumerate(BRATS_MODALITIES):
        atomic_write_bytes(
            _nifti_gz(np.ascontiguousarray(image[c]), affine), str(raw_dir / sid / f"{sid}_{mod}.nii.gz")
        )
    atomic_write_bytes(_nifti_gz(seg.astype(np.uint8), affine), str(raw_dir / sid / f"{sid}_seg.nii.gz"))


def healthy_subjects(splits: dict[str, list[str]], seed: int, healthy_fraction: float) -> set[str]:
    """Per split ``min(n - 1, round(healthy_fraction * n))`` healthy subjects (``random.Random(seed)``)."""
    rnd = random.Random(seed)
    out: set[str] = set()
    for split in SPLITS:
        names = splits[split]
        k = min(len(names) - 1, int(round(healthy_fraction * len(names))))
        out.update(rnd.sample(names, max(k, 0)))
    return out


def check_build_options(subjects: int, image_size: int, slice_step: int, seed: int = 0,
                        style: str = "brats_like", healthy_fraction: float = 0.2) -> None:
    """ValueError naming the flag of scripts/make_synthetic_brats.py for a value it cannot build with."""
    if subjects < 3:
        raise ValueError(f"--subjects must be >= 3 (one each for train, val, test), got {subjects}")
    if image_size < 8:
        raise ValueError(f"--image_size must be >= 8, got {image_size}")
    if slice_step < 1:
        raise ValueError(f"--slice_step must be >= 1, got {slice_step}")
    if seed < 0:
        raise ValueError(f"--seed must be >= 0, got {seed}")
    if style not in STYLES:
        raise ValueError(f"--style {style!r} is not valid; choose one of {STYLES}")
    if not 0.0 <= healthy_fraction < 1.0:
        raise ValueError(f"healthy_fraction must be in [0, 1), got {healthy_fraction}")


def build_synthetic_dataset(
    out: str | Path,
    subjects: int = 20,
    seed: int = 0,
    image_size: int = 64,
    raw_nifti: str | Path | None = None,
    healthy_fraction: float = 0.2,
    overwrite: bool = False,
    progress: bool = False,
    slice_step: int = 1,
    style: str = "brats_like",
    baseline: bool = True,
) -> dict:
    """Write a synthetic dataset in the layout of docs/method.md, 'Preprocessing' (see module docstring).

    Args:
        out: output root; subjects: number of subjects (>= 3); seed: content seed;
        image_size: slice size (e.g. 64 or 128); raw_nifti: optional folder for BraTS-style NIfTI subjects;
        healthy_fraction: share of healthy subjects per split; overwrite: replace an existing build;
        slice_step: keep every slice_step-th axial slice of the brain range (2 = 4 mm spacing, half the
            slices; for quick CPU runs); style: "brats_like" (default) or "classic" (the original, easy
            contrasts; bit-identical to earlier builds); baseline: compute the FLAIR-threshold baseline.
    Returns:
        stats: per split {"subjects", "slices", "unhealthy_slices", "flair_baseline"}; "style";
            "healthy_subjects"; "seconds_per_subject". Also written to ``out/dataset_summary.json``.
    """
    check_build_options(subjects, image_size, slice_step, seed, style, healthy_fraction)
    final = Path(out)
    for flag, folder in (("--out", final), ("--raw_nifti", raw_nifti)):
        if folder is not None and Path(folder).exists() and not Path(folder).is_dir():
            raise NotADirectoryError(f"{flag} {folder} is a file; expected a folder")
    held = sorted(p.name for p in Path(raw_nifti).glob("SYN_*")) if raw_nifti is not None else []
    if held and not overwrite:
        raise FileExistsError(f"--raw_nifti {raw_nifti} already holds NIfTI subjects ({', '.join(held[:3])}"
                              f"{', ...' if len(held) > 3 else ''}); pass --overwrite or pick another folder")
    if (final / "data_splits").exists() and not overwrite:
        raise FileExistsError(
            f"{final} already holds a dataset (data_splits/); pass --overwrite or pick another --out"
        )
    # built beside the output and moved in when complete: a killed (over)write leaves no mix of two builds
    final.parent.mkdir(parents=True, exist_ok=True)
    root = final.parent / f".{final.name}.partial-{os.getpid()}"
    shutil.rmtree(root, ignore_errors=True)
    try:
        stats = _build_into(root, subjects, seed, image_size, raw_nifti, healthy_fraction, progress,
                            slice_step, style, baseline)
        _move_in(root, final)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return stats


def _move_in(built: Path, final: Path) -> None:
    """Replace the dataset entries of ``final`` (data_splits/, npy_*/, the summary) by those of ``built``
    with renames; other files of ``final`` (e.g. a runner's marker, the fingerprint cache) are kept."""
    final.mkdir(parents=True, exist_ok=True)
    names = ["data_splits", SUMMARY, *(f"npy_{s}" for s in SPLITS)]
    trash = final.parent / f".{final.name}.old-{os.getpid()}"
    shutil.rmtree(trash, ignore_errors=True)
    trash.mkdir()
    try:
        for name in names:
            if (final / name).exists():
                os.replace(final / name, trash / name)
        for name in names:
            if (built / name).exists():
                os.replace(built / name, final / name)
    finally:
        shutil.rmtree(trash, ignore_errors=True)


def _build_into(root: Path, subjects: int, seed: int, image_size: int, raw_nifti: str | Path | None,
                healthy_fraction: float, progress: bool, slice_step: int, style: str, baseline: bool) -> dict:
    """The body of ``build_synthetic_dataset`` writing into ``root`` (a fresh folder)."""
    ids = [f"SYN_{i:05d}" for i in range(subjects)]
    splits = split_subjects(ids)
    healthy = healthy_subjects(splits, seed, healthy_fraction)
    affine = load_atlas()["affine"]
    stats: dict = {s: {"subjects": len(splits[s]), "slices": 0, "unhealthy_slices": 0} for s in SPLITS}
    write_splits(root, splits)
    t0 = time.perf_counter()
    order = [(sp, sid) for sp in SPLITS for sid in splits[sp]]
    if progress:
        order = tqdm(order, desc="synthetic", unit="subject")
    for split, sid in order:
        image, seg = generate_subject(seed, ids.index(sid), sid in healthy, style=style)
        x, y_soft, rng = process_volumes(image, seg, image_size, mask_resize="area")
        x, y = x[::slice_step], (y_soft[::slice_step] > 0.5).astype(np.float32)
        write_patient(root, split, sid, x, y, rng, affine, CANVAS, BRATS_MODALITIES, slice_step)
        if raw_nifti is not None:
            write_raw_subject(Path(raw_nifti), sid, image, seg, affine)
        stats[split]["slices"] += x.shape[0]
        stats[split]["unhealthy_slices"] += int((y.reshape(y.shape[0], -1).max(1) > 0.5).sum())
    stats["seconds_per_subject"] = round((time.perf_counter() - t0) / subjects, 3)
    if baseline:
        for split in SPLITS:
            has = stats[split]["unhealthy_slices"] > 0
            stats[split]["flair_baseline"] = flair_threshold_baseline(root, split) if has else None
    stats["style"] = style
    stats["seed"], stats["image_size"], stats["slice_step"] = seed, image_size, slice_step
    stats["healthy_subjects"] = sorted(healthy)
    atomic_write_text(json.dumps(stats, indent=1) + "\n", str(root / SUMMARY))
    return stats
