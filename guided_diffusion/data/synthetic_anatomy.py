"""The anatomy shared by both synthetic styles: the MNI152 2009 template and tissue maps that ship in the
nilearn wheel, per-subject warps, sampling on the canvas and the assembly of tissue contrasts into the
four modalities (``synthetic`` builds the classic style and the dataset, ``synthetic_brats_like`` the
default tumours)."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

CANVAS = (128, 128, 96)  # raw grid (x, y, z), 2 mm voxels
OFFSET = (14, 5, 6)  # canvas index of template voxel (0, 0, 0)

# rows: csf, gm, wm, oedema, enhancing, necrosis; columns: flair, t1, t1ce, t2 (relative intensities)
GAIN = np.array([600.0, 800.0, 900.0, 1200.0], dtype=np.float32)  # arbitrary scanner units per modality


@lru_cache(maxsize=1)
def load_atlas() -> dict:
    """MNI152 2009 (2 mm) tissue maps from nilearn's bundled files, placed on the canvas.

    Returns dict: tissue [3, X, Y, Z] float32 (csf, gm, wm), mask [X, Y, Z] float32,
    depth [X, Y, Z] float32 (distance to the brain boundary in voxels), affine [4, 4].
    """
    from nilearn import datasets
    from scipy import ndimage

    mask_img = datasets.load_mni152_brain_mask(resolution=2)
    gm = np.asarray(datasets.load_mni152_gm_template(resolution=2).get_fdata(), dtype=np.float32)
    wm = np.asarray(datasets.load_mni152_wm_template(resolution=2).get_fdata(), dtype=np.float32)
    mask = (np.asarray(mask_img.get_fdata()) > 0.5).astype(np.float32)
    gm, wm = np.clip(gm, 0, 1) * mask, np.clip(wm, 0, 1) * mask
    over = np.maximum(gm + wm, 1.0)
    gm, wm = gm / over, wm / over
    csf = np.clip(mask - gm - wm, 0, 1)

    def place(vol: np.ndarray) -> np.ndarray:
        out = np.zeros(CANVAS, dtype=np.float32)
        sx, sy, sz = (min(vol.shape[i], CANVAS[i] - OFFSET[i]) for i in range(3))
        ox, oy, oz = OFFSET
        out[ox : ox + sx, oy : oy + sy, oz : oz + sz] = vol[:sx, :sy, :sz]
        return out

    tissue = np.stack([place(csf), place(gm), place(wm)])
    mask_c = place(mask)
    affine = np.array(mask_img.affine, dtype=float)
    affine[:3, 3] -= affine[:3, :3] @ np.array(OFFSET, dtype=float)
    depth = ndimage.distance_transform_edt(mask_c > 0.5).astype(np.float32)
    return {"tissue": tissue, "mask": mask_c, "depth": depth, "affine": affine}


def _smooth_noise(
    rng: np.random.Generator, coarse: tuple[int, int, int], size: tuple[int, ...], channels: int = 1
) -> torch.Tensor:
    """Smooth random field [channels, *size]: N(0, 1) on a coarse grid, trilinearly upsampled."""
    g = torch.from_numpy(rng.standard_normal((1, channels, *coarse)).astype(np.float32))
    return F.interpolate(g, size=tuple(size), mode="trilinear", align_corners=True)[0]


def _rotation(rng: np.random.Generator, max_deg: tuple[float, float, float]) -> np.ndarray:
    ax, ay, az = (np.deg2rad(rng.uniform(-m, m)) for m in max_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _sample(vol: torch.Tensor, pts: torch.Tensor, padding: str = "zeros") -> torch.Tensor:
    """Trilinear samples [C, N] of ``vol`` [C, X, Y, Z] at normalised points ``pts`` [N, 3] in [-1, 1]."""
    grid = pts.reshape(1, -1, 1, 1, 3)
    out = F.grid_sample(
        vol.permute(0, 3, 2, 1)[None], grid, mode="bilinear", padding_mode=padding, align_corners=True
    )
    return out[0, :, :, 0, 0]


def _source_grid(rng: np.random.Generator) -> torch.Tensor:
    """Normalised template coordinates [X, Y, Z, 3] of every canvas voxel: random affine + elastic warp."""
    size = CANVAS
    rot = _rotation(rng, (4.0, 4.0, 8.0))
    scale = rng.uniform(0.92, 1.04) * rng.uniform(0.97, 1.03, size=3)
    mat = torch.from_numpy((rot @ np.diag(1.0 / scale)).astype(np.float32))
    shift = torch.from_numpy((rng.uniform(-3, 3, size=3) * np.array([1.0, 1.0, 0.6])).astype(np.float32))
    half = torch.tensor([(s - 1) / 2 for s in size], dtype=torch.float32)
    axes = [torch.arange(s, dtype=torch.float32) - half[i] for i, s in enumerate(size)]
    # src = mat @ (p - c) + c + shift + elastic, built by broadcasting the three axis contributions
    src = (
        axes[0][:, None, None, None] * mat[:, 0]
        + axes[1][None, :, None, None] * mat[:, 1]
        + axes[2][None, None, :, None] * mat[:, 2]
    ) + (shift + half)
    elastic = 2.5 * _smooth_noise(rng, (6, 6, 5), size, channels=3)
    src = src + elastic.permute(1, 2, 3, 0)
    return src / half - 1.0


def warped_brain(rng: np.random.Generator):
    """Random warp of the template: brain [X, Y, Z] bool, inside [N] flat indices of brain voxels,
    pts [N, 3] template coordinates, gm, wm, depth [N] sampled template maps."""
    atlas = load_atlas()
    grid = _source_grid(rng)
    mask_w = F.grid_sample(
        torch.from_numpy(atlas["mask"]).permute(2, 1, 0)[None, None],
        grid.permute(2, 1, 0, 3)[None],
        mode="bilinear",
        padding_mode="zeros",
        align_corners=True,
    )[0, 0].permute(2, 1, 0)
    brain = mask_w > 0.5  # [X, Y, Z]
    inside = brain.reshape(-1).nonzero()[:, 0]
    pts = grid.reshape(-1, 3)[inside]
    maps = torch.from_numpy(np.stack([atlas["tissue"][1], atlas["tissue"][2], atlas["depth"]]))
    gm, wm, depth = _sample(maps, pts)
    return brain, inside, pts, gm.clamp(0, 1), wm.clamp(0, 1), depth


def assemble(
    brain: torch.Tensor, inside: torch.Tensor, vals: torch.Tensor, whole: torch.Tensor, core: torch.Tensor,
    nec: torch.Tensor,
) -> tuple[np.ndarray, np.ndarray]:
    """Canvas image [4, X, Y, Z] from brain-point values [4, N] and BraTS labels from the indicators."""
    image = torch.zeros(4, brain.numel())
    image[:, inside] = vals
    labels = torch.zeros(inside.numel(), dtype=torch.uint8)
    labels[whole > 0.5] = 2
    labels[core > 0.5] = 4
    labels[nec > 0.5] = 1
    seg = torch.zeros(brain.numel(), dtype=torch.uint8)
    seg[inside] = labels
    return image.reshape(4, *CANVAS).numpy(), seg.reshape(CANVAS).numpy()
