"""The ``brats_like`` style of the synthetic dataset: what makes FLAIR thresholding imperfect on BraTS.

On top of the ``classic`` anatomy and contrasts (see :mod:`guided_diffusion.data.synthetic`) a subject gets

* healthy hyperintensities: periventricular caps (FLAIR / T2 bright white matter around the lateral
  ventricles, patchy), CSF-flow artefacts (bright FLAIR blobs in the ventricles and basal CSF), a bright
  FLAIR rim at the brain edge (incomplete skull stripping, as in many BraTS scans), and on T1ce enhancing
  vessels (thin tubes, mostly cortical), dural enhancement and the choroid plexus in the ventricles;
* lesions whose FLAIR intensity overlaps those tails: per-lesion brightness, a darker infiltrative
  periphery, internal texture, necrosis that is only mildly FLAIR bright, wide partial-volume edges;
* multi-focal disease: a main tumour (core, enhancing rim, oedema) in most unhealthy subjects plus 0-3
  small oedema-like foci, sometimes only small foci;
* stronger bias field and noise than ``classic``.

Labels keep the BraTS convention (1 necrosis, 2 oedema, 4 enhancing, at indicator > 0.5).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from guided_diffusion.data import synthetic_anatomy as S

# rows: csf, gm, wm, oedema, enhancing, necrosis; columns: flair, t1, t1ce, t2
CONTRAST_BL = np.array(
    [
        [0.10, 0.15, 0.15, 1.00],
        [0.62, 0.55, 0.55, 0.60],
        [0.45, 0.85, 0.80, 0.38],
        [1.00, 0.40, 0.42, 0.92],
        [0.85, 0.45, 1.08, 0.75],
        [0.75, 0.15, 0.13, 1.06],
    ],
    dtype=np.float32,
)


@lru_cache(maxsize=1)
def ventricle_maps() -> torch.Tensor:
    """Template-space maps [2, X, Y, Z]: lateral-ventricle indicator and distance to it (voxels)."""
    from scipy import ndimage

    atlas = S.load_atlas()
    csf, depth = atlas["tissue"][0], atlas["depth"]
    deep = (csf > 0.5) & (depth > 8)
    lab, n = ndimage.label(deep)
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    sizes[0] = 0
    vent = np.isin(lab, np.flatnonzero(sizes > 500))
    vent = ndimage.binary_propagation(vent, mask=ndimage.binary_dilation(vent, iterations=2) & (csf > 0.4))
    dist = ndimage.distance_transform_edt(~vent).astype(np.float32)
    return torch.from_numpy(np.stack([vent.astype(np.float32), dist]))


def _field(rng: np.random.Generator, coarse: tuple[int, int, int], centred: torch.Tensor, ch: int = 1):
    """Smooth N(0, 1)-ish random field [ch, N] at normalised canvas points ``centred`` [N, 3]."""
    g = torch.from_numpy(rng.standard_normal((ch, *coarse)).astype(np.float32))
    return S._sample(g, centred, padding="border")


def healthy_extras(
    rng: np.random.Generator, tissue: torch.Tensor, depth: torch.Tensor, vmaps: torch.Tensor,
    centred: torch.Tensor,
) -> torch.Tensor:
    """Additive healthy hyperintensities [4, N] (FLAIR, T1, T1ce, T2) in relative contrast units."""
    csf, gm, wm = tissue
    vent, dvent = vmaps
    n = csf.numel()
    extra = torch.zeros(4, n)
    # periventricular caps: WM near the lateral ventricles, patchy
    patch = torch.sigmoid(2.5 * _field(rng, (6, 8, 5), centred)[0] + 1.0)
    cap = torch.exp(-dvent / rng.uniform(1.5, 3.0)) * (1.0 - vent) * (wm + 0.5 * gm) * patch
    extra[0] += rng.uniform(0.3, 0.6) * cap
    extra[3] += rng.uniform(0.1, 0.3) * cap
    # CSF-flow artefacts: bright FLAIR blobs in ventricles and deep CSF
    flow = (_field(rng, (10, 10, 8), centred)[0] - rng.uniform(0.6, 1.2)).clamp(0, 1)
    deep_csf = csf * (depth > 4).float()
    extra[0] += rng.uniform(0.5, 0.9) * (flow * 2.0).clamp(0, 1) * deep_csf
    # bright rim at the brain edge (FLAIR), dural enhancement (T1ce)
    edge = torch.exp(-depth / rng.uniform(0.8, 1.6))
    rim_patch = torch.sigmoid(3.0 * _field(rng, (8, 8, 6), centred)[0])
    extra[0] += rng.uniform(0.35, 0.8) * edge * rim_patch
    extra[2] += rng.uniform(0.2, 0.5) * edge * rim_patch.flip(0)
    # enhancing vessels: intersections of two random iso-surfaces = thin tubes, mostly near the surface
    v = _field(rng, (14, 14, 11), centred, ch=2)
    tubes = torch.exp(-(v[0] ** 2 + v[1] ** 2) / (2 * 0.12**2))
    extra[2] += rng.uniform(0.4, 0.8) * tubes * (csf + gm + 0.3 * wm) * torch.exp(-depth / 12.0)
    extra[0] += 0.15 * tubes * csf
    # choroid plexus: bright T1ce (and mildly FLAIR) blobs inside the ventricles
    chor = (_field(rng, (10, 10, 8), centred)[0] - 0.3).clamp(0, 1).pow(0.5) * vent
    extra[2] += rng.uniform(0.6, 1.0) * chor
    extra[0] += rng.uniform(0.2, 0.5) * chor
    return extra


def lesion_fields(
    rng: np.random.Generator, pos: torch.Tensor, depth: torch.Tensor, centred: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-focal lesions at brain points ``pos`` [N, 3] (voxels).

    Returns: comps [3, N] soft indicators (whole tumour, core, necrosis), gain [N] per-point FLAIR / T2
    brightness of the lesion tissue (lesion brightness, infiltrative periphery and texture).
    """
    n = pos.shape[0]
    comps, gain = torch.zeros(3, n), torch.ones(n)
    main = rng.random() < 0.85
    specs = [(rng.uniform(7.0, 18.0), True)] if main else []
    specs += [(rng.uniform(2.5, 6.0), False) for _ in range(int(rng.integers(0 if main else 1, 4)))]
    for r, cored in specs:
        cand = (depth >= max(3.0, 0.6 * r)).nonzero()[:, 0]
        if cand.numel() == 0:
            cand = torch.arange(n)
        centre = pos[cand[int(rng.integers(cand.numel()))]]
        rel = pos - centre
        near = (rel.abs() <= 1.8 * r + 4).all(1).nonzero()[:, 0]
        rot = torch.from_numpy(S._rotation(rng, (30.0, 30.0, 180.0)).astype(np.float32))
        axes = torch.from_numpy(rng.uniform(0.7, 1.3, size=3).astype(np.float32))
        dist = ((rel[near] @ rot) / axes).norm(dim=1)
        coarse = torch.from_numpy(rng.standard_normal((1, 5, 5, 5)).astype(np.float32))
        wobble = S._sample(coarse, (rel[near] / (1.8 * r + 4)).clamp(-1, 1), padding="border")[0]
        dist = dist / (1.0 + 0.22 * wobble)
        ramp = rng.uniform(2.0, 3.5)  # partial-volume / infiltrative edge width (voxels)
        whole = (0.5 + (r - dist) / ramp).clamp(0.0, 1.0)
        if cored:
            r_core = r * rng.uniform(0.35, 0.6)
            r_nec = r_core * rng.uniform(0.3, 0.65)
            core = (0.5 + (r_core - dist) / 1.5).clamp(0.0, 1.0)
            nec = (0.5 + (r_nec - dist) / 1.5).clamp(0.0, 1.0)
        else:
            core = nec = torch.zeros_like(whole)
        inner = ((r - dist) / (0.6 * r)).clamp(0.0, 1.0)  # 0 at the edge, 1 inside
        level = rng.uniform(0.9, 1.2) if cored else rng.uniform(0.85, 1.15)
        g = level * (0.8 + 0.2 * inner)
        take = whole > comps[0, near]
        gain[near[take]] = g[take]
        for c, ind in enumerate((whole, core, nec)):
            comps[c, near] = torch.maximum(comps[c, near], ind)
    texture = 1.0 + 0.1 * _field(rng, (16, 16, 12), centred)[0]
    return comps, gain * texture


def generate_brats_like(seed: int, index: int, healthy: bool, noise: float = 0.035):
    """One ``brats_like`` subject: image [4, 128, 128, 96] float32, seg [128, 128, 96] uint8 BraTS labels.

    Draws from ``default_rng(SeedSequence([seed, index, 1]))`` (a stream apart from ``classic``'s).
    """
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(index), 1]))
    brain, inside, pts, gm, wm, depth = S.warped_brain(rng)
    vmaps = S._sample(ventricle_maps(), pts)
    vmaps[0] = vmaps[0].clamp(0, 1)
    csf = (1.0 - gm - wm).clamp(min=0)
    tissue = torch.stack([csf, gm, wm])
    tissue = tissue / tissue.sum(0, keepdim=True).clamp(min=1e-6)
    pos = torch.from_numpy(np.stack(np.unravel_index(inside.numpy(), S.CANVAS), 1).astype(np.float32))
    centred = pos / torch.tensor([(s - 1) / 2 for s in S.CANVAS]) - 1.0
    if healthy:
        comps, gain = torch.zeros(3, inside.numel()), torch.ones(inside.numel())
    else:
        comps, gain = lesion_fields(rng, pos, depth, centred)
    whole, core, nec = comps[0], torch.minimum(comps[1], comps[0]), torch.minimum(comps[2], comps[1])
    jitter = rng.uniform(0.93, 1.07, size=CONTRAST_BL.shape).astype(np.float32)
    contrast = torch.from_numpy(CONTRAST_BL * jitter)
    healthy_vals = contrast[:3].T @ tissue + healthy_extras(rng, tissue, depth, vmaps[0:2], centred)
    lesion_frac = torch.stack([whole - core, core - nec, nec])
    lesion_vals = contrast[3:].T @ lesion_frac
    lesion_vals[[0, 3]] = lesion_vals[[0, 3]] * gain
    vals = healthy_vals * (1.0 - whole) + lesion_vals
    bias_coarse = torch.from_numpy(rng.standard_normal((4, 3, 3, 3)).astype(np.float32))
    vals = vals * torch.exp(0.18 * S._sample(bias_coarse, centred, padding="border"))
    gain_mod = torch.from_numpy(S.GAIN * rng.uniform(0.85, 1.15, size=4).astype(np.float32))
    n1 = torch.from_numpy(rng.standard_normal(tuple(vals.shape), dtype=np.float32)) * noise
    n2 = torch.from_numpy(rng.standard_normal(tuple(vals.shape), dtype=np.float32)) * noise
    vals = torch.sqrt((vals + n1) ** 2 + n2**2) * gain_mod[:, None]
    return S.assemble(brain, inside, vals, whole, core, nec)
