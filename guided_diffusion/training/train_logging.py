"""What a training step logs: loss terms per timestep quartile, counters, throughput and peak memory.

The step's device values (gradient norm, timesteps, per-sample losses) reach the host in one copy, after
the backward passes, so a training step synchronises with the device once (issue 11).
"""

from __future__ import annotations

import resource
from collections.abc import Mapping, Sequence

import torch

from guided_diffusion.utils import logger


def fetch_step_values(norm: torch.Tensor, records: Sequence[tuple[torch.Tensor, Mapping[str, torch.Tensor]]],
                      ) -> tuple[float, list[tuple[list[int], dict[str, list[float]]]]]:
    """Bring a step's logged values to the host in ONE device-to-host copy (the step's only
    synchronisation, issue 11).

    Args:
        norm: the gradient norm (0-d tensor).
        records: per micro-batch, (t [B] timesteps, {loss name: per-sample values [B]}).
    Returns:
        (norm as a float, per micro-batch (t as ints, {name: values as floats})); exact (float64 on the way).
    """
    device = records[0][0].device if records else norm.device
    parts = [norm.detach().reshape(1)]
    for t, losses in records:
        parts.append(t.detach().reshape(-1))
        parts.extend(v.detach().reshape(-1) for v in losses.values())
    flat = torch.cat([p.to(device=device, dtype=torch.float64) for p in parts]).cpu().tolist()
    out, pos = [], 1
    for t, losses in records:
        n = t.numel()
        ts = [int(v) for v in flat[pos:pos + n]]
        pos += n
        values = {}
        for key in losses:
            values[key] = flat[pos:pos + n]
            pos += n
        out.append((ts, values))
    return flat[0], out


def log_losses(t: Sequence[int], losses: Mapping[str, Sequence[float]], num_timesteps: int) -> None:
    """Log the mean of each loss term, overall and per timestep quartile (``loss_q0`` ... ``loss_q3``).

    t: a micro-batch's timesteps; losses: {name: per-sample values}, host values from fetch_step_values.
    """
    quart = [min(max(4 * int(v) // num_timesteps, 0), 3) for v in t]
    for key, vals in losses.items():
        logger.logkv_mean(key, sum(vals) / len(vals))
        for q, v in zip(quart, vals):
            logger.logkv_mean(f"{key}_q{q}", v)


def log_step(step: int, samples: int, epoch: int, n_global: int, seconds: float,
             device: torch.device) -> None:
    """Log the step counters, its time and throughput, and the peak memory so far."""
    logger.logkv("step", step)
    logger.logkv("samples", samples)
    logger.logkv("epoch", epoch)
    logger.logkv_mean("step_time", seconds)
    logger.logkv_mean("samples_per_s", n_global / max(seconds, 1e-9))
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    logger.logkv("peak_mem_mb", round(peak, 1))
