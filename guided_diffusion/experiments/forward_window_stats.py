"""The numbers of the forward-window study (``guided_diffusion.experiments.forward_window``, whose docstring
defines them) from the forward statistics: first argmax within a window, inside shares, peak-position
distributions, mean normalised curves, stratified validation subsets and the summary over draws."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from guided_diffusion.experiments.forward_window_report import CAL_METRICS, HIST_BINS, WINDOW_SHARES

__all__ = ["chain_positions", "draw_subset", "first_argmax", "inside_share", "summarise_draws",
           "window_steps", "window_summary"]


def first_argmax(div: torch.Tensor, steps: int) -> torch.Tensor:
    """t_e over the first ``steps`` steps: the first argmax of div [..., S, M] along S -> [..., M] (as
    run_forward_process's end_step, which moves only on a strictly larger M_t)."""
    d = div[..., :steps, :].double()
    best = d.max(dim=-2, keepdim=True).values
    hit = (d == best).double()
    return hit.argmax(dim=-2)  # torch.argmax returns the first of equal maxima


def inside_share(t_e: torch.Tensor, steps: int) -> float | None:
    """Share of the entries of t_e with 0 < t_e < steps - 1 (None for no entry)."""
    if t_e.numel() == 0:
        return None
    return float(((t_e > 0) & (t_e < steps - 1)).double().mean())


def _stats(pos: np.ndarray, at_last: np.ndarray) -> dict[str, Any]:
    """Distribution of peak positions pos [n] in [0, 1]: quartiles, mean, histogram, share at the end."""
    if pos.size == 0:
        return {"n": 0}
    hist, _ = np.histogram(pos, bins=HIST_BINS, range=(0.0, 1.0))
    return {"n": int(pos.size), "mean": float(pos.mean()), "median": float(np.median(pos)),
            "q25": float(np.quantile(pos, 0.25)), "q75": float(np.quantile(pos, 0.75)),
            "hist": hist.astype(int).tolist(), "share_at_last_step": float(at_last.mean())}


def window_steps(share: float, chain: int) -> int:
    """F for window share s on a chain of R steps: min(round(s R), R - 1), at least 1."""
    return max(1, min(int(round(share * chain)), chain - 1))


def window_summary(div: torch.Tensor, labels: torch.Tensor, positions: np.ndarray, chain: int,
                   ws: Sequence[float], modality: Sequence[int]) -> dict[str, Any]:
    """Part A numbers of one group of slices on one chain.

    Args:
        div: [N, nW, S, M] M_t over the whole chain (S = R - 1); labels: [N] image labels.
        positions: [S] position of each step on the training chain (timestep_map / (T - 1)).
        chain: R; ws: the nW guidance strengths; modality: the M channel indices.
    """
    steps = div.shape[2]
    te = first_argmax(div, steps)  # [N, nW, M]
    rec = te.max(dim=-1).values  # [N, nW]
    norm = div.double() / div.double().amax(dim=2, keepdim=True).clamp(min=1e-30)
    curve = norm.mean(dim=-1)  # [N, nW, S]
    lab = labels.numpy()
    per_w: dict[str, Any] = {}
    for wi, w in enumerate(ws):
        peak: dict[str, Any] = {}
        for name, sel in (("unhealthy", lab == 1), ("healthy", lab == 0)):
            entry = {"recorded": _stats(positions[rec[sel, wi].numpy()], rec[sel, wi].numpy() == steps - 1)}
            for mi, m in enumerate(modality):
                t = te[sel, wi, mi].numpy()
                entry[f"modality_{m}"] = _stats(positions[t], t == steps - 1)
            peak[name] = entry
        windows = []
        for s in WINDOW_SHARES:
            f = window_steps(s, chain)
            rec_f = first_argmax(div[:, wi], f).max(dim=-1).values  # [N]
            whole = rec[:, wi][labels == 1]  # the whole-chain peak, where the window contains it
            windows.append({"share": s, "F": f, "F_over_R": f / chain,
                            "unhealthy": inside_share(rec_f[labels == 1], f),
                            "healthy": inside_share(rec_f[labels == 0], f),
                            "unhealthy_chain_peak_inside": inside_share(whole, f)})
        half = [r["share"] for r in windows if r["unhealthy"] is not None and r["unhealthy"] >= 0.5]
        half_peak = [r["share"] for r in windows if r["unhealthy_chain_peak_inside"] is not None
                     and r["unhealthy_chain_peak_inside"] >= 0.5]
        per_w[f"{w:g}"] = {
            "peak_position": peak,
            "windows": windows,
            "half_inside_share": half[0] if half else None,
            "half_chain_peak_inside_share": half_peak[0] if half_peak else None,
            "mean_curve": {"unhealthy": curve[labels == 1, wi].mean(0).tolist() if (lab == 1).any() else None,
                           "healthy": curve[labels == 0, wi].mean(0).tolist() if (lab == 0).any() else None},
        }
    return {"n_unhealthy": int((lab == 1).sum()), "n_healthy": int((lab == 0).sum()), "per_w": per_w}


def chain_positions(diffusion: Any, steps: int, diffusion_steps: int) -> np.ndarray:
    """[steps] position of code index t on the training chain: timestep_map[t] / (T - 1)."""
    tmap = getattr(diffusion, "timestep_map", None)
    t = np.arange(steps) if tmap is None else np.asarray(tmap[:steps].tolist())
    return t / max(diffusion_steps - 1, 1)



def draw_subset(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted positions of a stratified subset of n of the slices with image labels ``labels`` [N]: round(n
    N_1 / N) unhealthy (at least 1 and at most n - 1 where the labels allow it), the rest healthy."""
    pos1, pos0 = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    if n >= labels.size:
        return np.arange(labels.size)
    n1 = int(round(n * pos1.size / labels.size))
    n1 = min(max(n1, 1 if pos1.size else 0), pos1.size, n - (1 if pos0.size else 0))
    n1 = max(n1, n - pos0.size)
    pick = np.concatenate([rng.choice(pos1, n1, replace=False), rng.choice(pos0, n - n1, replace=False)])
    return np.sort(pick)



def summarise_draws(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in CAL_METRICS:
        vals = np.array([r[k] for r in rows if r.get(k) is not None], dtype=np.float64)
        out[k] = {"mean": float(vals.mean()) if vals.size else None,
                  "std": float(vals.std()) if vals.size else None}
    ws, counts = np.unique([r["chosen_w"] for r in rows], return_counts=True)
    out["chosen_w_counts"] = {f"{w:g}": int(c) for w, c in zip(ws, counts)}
    return out
