"""Timestep respacing: run a diffusion trained on T steps with a subset of its timesteps."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch

from guided_diffusion.gaussian_diffusion import GaussianDiffusion


def space_timesteps(num_timesteps: int, section_counts: str | Sequence[int]) -> set[int]:
    """Original timesteps to keep.

    Args:
        num_timesteps: T of the original process.
        section_counts: ``"ddimN"`` (N evenly strided steps as in the DDIM paper), a comma-separated
            string or sequence of counts, one per equal section of [0, T) (e.g. ``"10,15,20"``), or ``""``
            (keep all).
    Returns:
        set of kept original indices.
    """
    if isinstance(section_counts, str):
        if section_counts == "":
            return set(range(num_timesteps))
        if section_counts.startswith("ddim"):
            try:
                desired = int(section_counts[len("ddim"):])
            except ValueError:
                raise ValueError(f"timestep_respacing {section_counts!r}: expected 'ddimN' with an "
                                 "integer N") from None
            for stride in range(1, num_timesteps + 1):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(f"timestep_respacing {section_counts!r}: {num_timesteps} steps cannot be "
                             f"split into exactly {desired} equally strided steps; choose another N or use a "
                             "plain count")
        try:
            section_counts = [int(c) for c in section_counts.split(",")]
        except ValueError:
            raise ValueError(f"timestep_respacing {section_counts!r}: expected 'ddimN', '' or "
                             "comma-separated integers such as '250' or '10,15,20'") from None
    counts = list(section_counts)
    if not counts or any(c < 0 for c in counts) or sum(counts) == 0:
        raise ValueError(f"timestep_respacing counts {counts} must be non-negative with a positive total")
    size_per, extra = divmod(num_timesteps, len(counts))
    kept: set[int] = set()
    start = 0
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if count > size:
            raise ValueError(f"timestep_respacing: cannot keep {count} steps from a section of {size} "
                             f"(T={num_timesteps}, {len(counts)} sections)")
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        kept.update(start + round(stride * j) for j in range(count))
        start += size
    return kept


class SpacedDiffusion(GaussianDiffusion):
    """A GaussianDiffusion over the kept timesteps ``use_timesteps`` of an original schedule.

    The kept steps have the original ``alphas_cumprod``; new betas are ``1 - abar_k / abar_{k-1}``.
    Models passed to any method are wrapped so the network sees original indices ``timestep_map[t]``
    (times 1000 / T_orig as floats when ``rescale_timesteps``).

    Args:
        use_timesteps: original indices to keep.
        betas: the ORIGINAL schedule [T_orig]; other keyword args as for GaussianDiffusion.
    """

    def __init__(self, use_timesteps: Iterable[int], *, betas: np.ndarray, **kwargs):
        original_betas = np.asarray(betas, dtype=np.float64)
        original_steps = len(original_betas)
        keep = sorted(set(int(t) for t in use_timesteps))
        if not keep or keep[0] < 0 or keep[-1] >= original_steps:
            raise ValueError(f"use_timesteps must be a non-empty subset of [0, {original_steps - 1}], got "
                             f"{keep[:3]}...{keep[-3:]} ({len(keep)} values)")
        alphas_cumprod = np.cumprod(1.0 - original_betas)
        kept_abar = alphas_cumprod[keep]
        new_betas = 1.0 - kept_abar / np.append(1.0, kept_abar[:-1])
        super().__init__(betas=new_betas, **kwargs)
        self.use_timesteps = set(keep)
        self.timestep_map = torch.tensor(keep, dtype=torch.long)
        self.original_num_steps = original_steps
