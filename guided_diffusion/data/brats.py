"""Slice dataset and loaders for the preprocessed layout of docs/method.md, 'Preprocessing' (BraTS, ATLAS
or synthetic).

``ROOT/npy_{split}/patient_{id}/slice_{k}.npz`` with ``x`` [1, C, H, W] and ``y`` [1, 1, H, W].
Per slice (docs/method.md, 'Loading and labels'): ``gt = (y > 0.5)``, ``lab = any(gt)``, every channel
of ``x`` min-max rescaled to [-1, 1] on its own. Subjects are sorted, then shuffled with
``random.Random(seed)``; slices of a subject are sorted by their number.
"""

from __future__ import annotations

import multiprocessing as mp
import random
import re
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from guided_diffusion.utils import dist_util

SYNTHETIC_HINT = (
    "create one with `python scripts/make_synthetic_brats.py --out DIR --subjects 20 --seed 0 "
    "--image_size 64` or preprocess BraTS with `python scripts/preprocess.py -s SOURCE`"
)
_SLICE_RE = re.compile(r"^slice_(-?\d+)\.npz$")


def process_slice(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Spec 1.2 per-slice processing.

    Args:
        x: [1, C, H, W] or [C, H, W] image; y: [1, 1, H, W] or [1, H, W] mask (soft or binary).
    Returns:
        x float32 [C, H, W] in [-1, 1] (per-channel min-max, eps 1e-5), gt float32 [1, H, W] in {0, 1},
        lab int (1 if gt has a positive pixel).
    """
    xt = torch.as_tensor(np.asarray(x), dtype=torch.float32)
    yt = torch.as_tensor(np.asarray(y))
    if xt.dim() == 4:
        xt = xt[0]
    if yt.dim() == 4:
        yt = yt[0]
    gt = (yt > 0.5).to(torch.float32)
    lab = int(gt.any())
    lo = xt.amin(dim=(1, 2), keepdim=True)
    hi = xt.amax(dim=(1, 2), keepdim=True)
    xt = (xt - lo) / (hi - lo + 1e-5)
    return 2.0 * xt - 1.0, gt, lab


def _slice_number(path: Path) -> int:
    return int(_SLICE_RE.match(path.name).group(1))


def _read_npz(path: Path, keys: tuple[str, ...] = ("x", "y")) -> dict[str, np.ndarray]:
    """Read ``keys`` from one slice file; ValueError naming the file if it is unreadable or lacks a key."""
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in keys if k not in z.files]
            if missing:
                raise ValueError(
                    f"slice file {path} lacks key(s) {missing} (has {z.files}); expected keys "
                    f"'x' [1, C, H, W] and 'y' [1, 1, H, W]; re-run the preprocessing"
                )
            return {k: z[k] for k in keys}
    except ValueError as err:
        if str(path) in str(err):
            raise
        raise ValueError(
            f"slice file {path} is unreadable or truncated ({err}); re-run the preprocessing"
        ) from err
    except (OSError, EOFError, zipfile.BadZipFile, KeyError) as err:
        raise ValueError(
            f"slice file {path} is unreadable or truncated ({type(err).__name__}: {err}); "
            f"re-run the preprocessing"
        ) from err


def _check_mask(path: Path, y: np.ndarray) -> None:
    """A mask must be real and finite (a NaN compares False with 0.5 and would read as healthy)."""
    if np.iscomplexobj(y):
        raise ValueError(f"slice file {path}: y has complex dtype {y.dtype}, expected a real mask")
    if not np.isfinite(y).all():
        raise ValueError(
            f"slice file {path}: y (mask) contains NaN or inf values; it would read as healthy. "
            "Fix or re-create this file"
        )


def _check_slice(
    path: Path,
    x: np.ndarray,
    y: np.ndarray,
    in_channels: int | None,
    image_size: tuple[int, ...] | None = None,
    size_from: Path | None = None,
) -> None:
    """Validate one slice's arrays; ValueError naming the file, what was found and what was expected.

    image_size: the dataset's H x W (taken from ``size_from``, its first slice); every slice must match it.
    """
    if np.iscomplexobj(x):
        raise ValueError(f"slice file {path}: x has complex dtype {x.dtype}, expected a real image")
    if x.ndim != 4 or x.shape[0] != 1:
        raise ValueError(f"slice file {path}: x has shape {tuple(x.shape)}, expected [1, C, H, W]")
    if y.ndim != 4 or y.shape[:2] != (1, 1):
        raise ValueError(f"slice file {path}: y has shape {tuple(y.shape)}, expected [1, 1, H, W]")
    if y.shape[2:] != x.shape[2:]:
        raise ValueError(
            f"slice file {path}: mask size {tuple(y.shape[2:])} differs from image size "
            f"{tuple(x.shape[2:])} (y {tuple(y.shape)}, x {tuple(x.shape)}); re-run the preprocessing"
        )
    if image_size is not None and tuple(x.shape[2:]) != tuple(image_size):
        raise ValueError(
            f"slice file {path}: image size {tuple(int(v) for v in x.shape[2:])} differs from the dataset's "
            f"{tuple(image_size)} (of {size_from}); every slice of a dataset must have one H x W, "
            "re-run the preprocessing"
        )
    if in_channels is not None and x.shape[1] != in_channels:
        raise ValueError(
            f"slice file {path} has {x.shape[1]} channels but --in_channels is {in_channels}; "
            f"set --in_channels {x.shape[1]} or use data with {in_channels} channels"
        )
    if not np.isfinite(x).all():
        raise ValueError(f"slice file {path}: x contains NaN or inf values; fix or re-create this file")
    _check_mask(path, y)


class BrainDataset(Dataset):
    """All (or selected) slices of one split.

    Args:
        data_dir: preprocessed root; split: "train", "val" or "test".
        mixed: True = every slice of the first ``num_mix`` subjects (default all); False = healthy-only
            selection of docs/method.md, 'Loading and labels' (needs ``n_unhealthy_patients`` or
            ``n_healthy_patients`` != -1).
        ret_lab: train split only: return ``(x, {"y": lab})`` instead of ``(x, {})``.
        n_unhealthy_patients / n_healthy_patients: subject counts for mixed=False (-1 = all / all remaining).
        num_mix: number of subjects for mixed=True (None = all); seed: subject shuffle seed.
        in_channels: expected channel count (checked on every read; None = not checked).
        image_size: the network's ``--image_size``; the split's slices must be image_size x image_size
            (ValueError naming the flag, the folder and its slice size; None = not checked).
        skip_healthy_s_in_unhealthy / skip_unhealthy_s_in_healthy: the mixed=False filters (same section).
    Items: train ``(x, {"y": lab})`` / ``(x, {})``; val, test ``(x, gt, lab)`` with x float32 [C, H, W] in
    [-1, 1], gt float32 [1, H, W], lab int.
    """

    def __init__(
        self,
        data_dir: str | Path,
        split: str,
        mixed: bool = True,
        ret_lab: bool = True,
        n_unhealthy_patients: int = -1,
        n_healthy_patients: int = -1,
        num_mix: int | None = None,
        seed: int = 0,
        in_channels: int | None = None,
        skip_healthy_s_in_unhealthy: bool = False,
        skip_unhealthy_s_in_healthy: bool = True,
        image_size: int | None = None,
    ):
        if split not in ("train", "val", "test"):
            raise ValueError(f"split {split!r} is not valid; choose 'train', 'val' or 'test'")
        root = Path(data_dir)
        if not root.is_dir():
            raise FileNotFoundError(f"data directory {root} does not exist; {SYNTHETIC_HINT}")
        split_dir = root / f"npy_{split}"
        if not split_dir.is_dir():
            raise FileNotFoundError(
                f"split folder {split_dir} is missing (expected the layout of "
                f"docs/method.md, 'Preprocessing', under {root}); {SYNTHETIC_HINT}"
            )
        patients = sorted(p for p in split_dir.iterdir() if p.is_dir() and p.name.startswith("patient_"))
        if not patients:
            raise FileNotFoundError(f"split folder {split_dir} holds no patient_* folders; {SYNTHETIC_HINT}")
        random.Random(seed).shuffle(patients)
        self.root, self.split, self.ret_lab, self.in_channels = root, split, ret_lab, in_channels
        self.mixed, self.seed = mixed, seed

        def slices_of(p: Path) -> list[Path]:
            files = [f for f in p.iterdir() if _SLICE_RE.match(f.name)]
            return sorted(files, key=_slice_number)

        self.empty_patients = sorted(p.name for p in patients if not slices_of(p))
        self.zero_slices: set[str] = set()  # all-zero x among the slices read so far (see data_summary)
        self._zero_warned = False
        self._shared_zero = None  # (warned flag, read count) shared with DataLoader workers, if any
        if self.empty_patients:
            warnings.warn(
                f"{split_dir}: {len(self.empty_patients)} of {len(patients)} patient folders hold no "
                f"slice_*.npz files and are skipped ({', '.join(self.empty_patients[:5])}"
                f"{', ...' if len(self.empty_patients) > 5 else ''})",
                stacklevel=2,
            )

        items: list[tuple[str, int, Path]] = []
        if mixed:
            chosen = patients if num_mix is None else patients[:num_mix]
            for p in chosen:
                items += [(p.name[len("patient_") :], _slice_number(f), f) for f in slices_of(p)]
        else:
            if n_unhealthy_patients == -1 and n_healthy_patients == -1:
                raise ValueError(
                    "mixed=False needs n_unhealthy_patients or n_healthy_patients != -1 "
                    "(e.g. n_unhealthy_patients=0 for the healthy slices of every subject)"
                )
            n_unh = len(patients) if n_unhealthy_patients == -1 else n_unhealthy_patients
            unh = patients[:n_unh]
            rest = patients[n_unh:]
            hea = rest if n_healthy_patients == -1 else rest[:n_healthy_patients]
            for group, keep in (
                (unh, "unhealthy" if skip_healthy_s_in_unhealthy else None),
                (hea, "healthy" if skip_unhealthy_s_in_healthy else None),
            ):
                for p in group:
                    for f in slices_of(p):
                        if keep is not None:
                            y = _read_npz(f, ("y",))["y"]
                            _check_mask(f, y)
                            positive = bool((y > 0.5).any())
                            if positive != (keep == "unhealthy"):
                                continue
                        items.append((p.name[len("patient_") :], _slice_number(f), f))
        if not items:
            raise FileNotFoundError(
                f"no slices selected from {split_dir} (mixed={mixed}, num_mix={num_mix}, "
                f"n_unhealthy_patients={n_unhealthy_patients}, "
                f"n_healthy_patients={n_healthy_patients}); check the data and the flags"
            )
        self.items = items
        self.patients = list(dict.fromkeys(pid for pid, _, _ in items))
        first = _read_npz(items[0][2])
        _check_slice(items[0][2], first["x"], first["y"], in_channels)
        self.num_channels = int(first["x"].shape[1])
        self.image_size = tuple(int(s) for s in first["x"].shape[2:])
        self._size_from = items[0][2]
        if image_size is not None:
            check_image_size(self, image_size)

    def __len__(self) -> int:
        return len(self.items)

    def slice_info(self, index: int) -> tuple[str, int]:
        """(patient_id, slice_number) of item ``index``."""
        pid, k, _ = self.items[index]
        return pid, k

    def slice_path(self, index: int) -> Path:
        """Path of the npz file of item ``index``."""
        return self.items[index][2]

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(x [C, H, W], gt [1, H, W], lab) of item ``index`` regardless of the split."""
        path = self.items[index][2]
        arrays = _read_npz(path)
        _check_slice(path, arrays["x"], arrays["y"], self.in_channels, self.image_size, self._size_from)
        if not arrays["x"].any():
            self._count_zero_slice(path)
        return process_slice(arrays["x"], arrays["y"])

    def share_counters(self) -> None:
        """Share the all-zero warning and its count between this process and its DataLoader workers (each
        worker reads into its own copy of the dataset): one warning per run, and ``data_summary`` in the
        main process counts the reads of every worker."""

        self._shared_zero = (mp.Value("b", 0), mp.Value("q", 0))

    def _count_zero_slice(self, path: Path) -> None:
        self.zero_slices.add(str(path))
        if self._shared_zero is None:
            first, self._zero_warned = not self._zero_warned, True
        else:
            flag, count = self._shared_zero
            with count.get_lock():
                count.value += 1
            with flag.get_lock():
                first, flag.value = not flag.value, 1
        if first:
            warnings.warn(
                f"slice file {path} is all zero (a blank image after rescaling); further all-zero "
                "slices are counted in the data summary",
                stacklevel=3,
            )

    def data_summary(self) -> str:
        """One line: slices, patients, empty patient folders skipped, all-zero slices among those read."""
        text = f"{self.split} split of {self.root}: {len(self.items)} slices, {len(self.patients)} patients"
        if self.empty_patients:
            text += f"; {len(self.empty_patients)} empty patient folders skipped"
        if self._shared_zero is not None:
            reads = self._shared_zero[1].value
            if reads:
                text += f"; warning: {reads} reads of all-zero slices so far (blank images)"
        elif self.zero_slices:
            text += f"; warning: {len(self.zero_slices)} all-zero slices read (blank images)"
        return text

    def read_label(self, index: int) -> int:
        """Slice label from the mask only (reads just ``y``)."""
        path = self.items[index][2]
        y = _read_npz(path, ("y",))["y"]
        _check_mask(path, y)
        return int((y > 0.5).any())

    def __getitem__(self, index: int):
        x, gt, lab = self.load(index)
        if self.split == "train":
            return (x, {"y": lab}) if self.ret_lab else (x, {})
        return x, gt, lab


def check_image_size(dataset: BrainDataset, image_size: int) -> None:
    """ValueError (one line) unless the slices of ``dataset`` are ``image_size`` x ``image_size`` (the
    network's ``--image_size``): naming the flag value, the split folder and its slice size."""
    h, w = dataset.image_size
    if (h, w) != (int(image_size), int(image_size)):
        fix = f"pass --image_size {h}" if h == w else "preprocess the data to square slices"
        raise ValueError(
            f"--image_size {image_size} does not match the data: the {dataset.split} split of {dataset.root} "
            f"has {h} x {w} slices (e.g. {dataset._size_from}); {fix}, or use data preprocessed to "
            f"{image_size} px"
        )


def world_info() -> tuple[int, int]:
    """(world_size, rank) from dist_util if present, else torch.distributed if initialised, else (1, 0)."""
    try:
        return int(dist_util.get_world_size()), int(dist_util.get_rank())
    except (ImportError, AttributeError):
        pass
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def get_train_loader(
    data_dir: str | Path,
    global_batch_size: int,
    seed: int = 0,
    in_channels: int | None = None,
    mixed: bool = True,
    ret_lab: bool = True,
    num_workers: int = 0,
    n_unhealthy_patients: int = -1,
    n_healthy_patients: int = -1,
    num_mix: int | None = None,
    pin_memory: bool = False,
    world_size: int | None = None,
    rank: int | None = None,
    image_size: int | None = None,
) -> tuple[DataLoader, DistributedSampler]:
    """Training loader over the train split: DistributedSampler(shuffle=True, seed, drop_last=True).

    Per-rank batch = ``global_batch_size // world_size``; call ``sampler.set_epoch(epoch)`` every epoch.
    Works without a process group (world size and rank from dist_util / torch.distributed / (1, 0), or given).
    Batches: ``(x [B, C, H, W], {"y": LongTensor [B]})`` (or ``(x, {})`` without ret_lab).
    ``image_size``: the network's size the slices must have (see ``check_image_size``; None: any).
    """
    if world_size is None or rank is None:
        ws, rk = world_info()
        world_size = ws if world_size is None else world_size
        rank = rk if rank is None else rank
    if global_batch_size <= 0 or global_batch_size % world_size:
        raise ValueError(
            f"--batch_size {global_batch_size} (global) must be a positive multiple of the world "
            f"size {world_size}; use e.g. --batch_size {max(1, global_batch_size // world_size) * world_size}"
        )
    per_rank = global_batch_size // world_size
    dataset = BrainDataset(
        data_dir,
        "train",
        mixed=mixed,
        ret_lab=ret_lab,
        n_unhealthy_patients=n_unhealthy_patients,
        n_healthy_patients=n_healthy_patients,
        num_mix=num_mix,
        seed=seed,
        in_channels=in_channels,
        image_size=image_size,
    )
    if num_workers > 0:
        dataset.share_counters()
    sampler = DistributedSampler(
        dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True
    )
    if len(sampler) < per_rank:
        raise ValueError(
            f"the train split of {data_dir} has {len(dataset)} slices ({len(sampler)} per rank), fewer "
            f"than the per-rank batch {per_rank}; lower --batch_size or use more data"
        )
    generator = torch.Generator().manual_seed(int(seed))
    loader = DataLoader(
        dataset,
        batch_size=per_rank,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=True,
        generator=generator,
        persistent_workers=num_workers > 0,
    )
    return loader, sampler


class _EvalItems(Dataset):
    """(x, gt, lab, idx) view of a BrainDataset (any split)."""

    def __init__(self, base: BrainDataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        x, gt, lab = self.base.load(index)
        return x, gt, lab, index


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + W, rank + 2W, ...`` of ``range(n)`` (deterministic, no padding)."""

    def __init__(self, n: int, world_size: int = 1, rank: int = 0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.indices = list(range(rank, n, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def get_eval_loader(
    data_dir: str | Path,
    split: str,
    batch_size: int,
    num_slices: int | None = None,
    in_channels: int | None = None,
    num_workers: int = 0,
    seed: int = 0,
    world_size: int | None = None,
    rank: int | None = None,
    image_size: int | None = None,
) -> tuple[DataLoader, BrainDataset]:
    """Deterministic evaluation loader: every slice once (or the first ``num_slices`` of the fixed order).

    Rank r of W takes dataset indices r, r+W, ... Batches: ``(x [B, C, H, W], gt [B, 1, H, W],
    lab LongTensor [B], idx LongTensor [B])``; ``idx`` indexes the returned dataset (``slice_info``).
    ``image_size``: the network's size the slices must have (see ``check_image_size``; None: any).
    """
    if batch_size <= 0:
        raise ValueError(f"--batch_size must be positive, got {batch_size}")
    if world_size is None or rank is None:
        ws, rk = world_info()
        world_size = ws if world_size is None else world_size
        rank = rk if rank is None else rank
    dataset = BrainDataset(data_dir, split, mixed=True, seed=seed, in_channels=in_channels,
                           image_size=image_size)
    n = len(dataset) if num_slices is None else min(int(num_slices), len(dataset))
    if n <= 0:
        raise ValueError(f"num_slices must be positive, got {num_slices}")
    sampler = ShardSampler(n, world_size, rank)
    loader = DataLoader(
        _EvalItems(dataset),
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        shuffle=False,
        drop_last=False,
    )
    return loader, dataset
