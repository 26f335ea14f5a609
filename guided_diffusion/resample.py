"""Timestep samplers for training: uniform, or importance sampling by the loss second moment."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch
import torch.distributed as dist

from guided_diffusion.gaussian_diffusion import GaussianDiffusion


def create_named_schedule_sampler(name: str, diffusion: GaussianDiffusion) -> ScheduleSampler:
    """``"uniform"`` -> UniformSampler, ``"loss-second-moment"`` -> LossSecondMomentResampler."""
    if name == "uniform":
        return UniformSampler(diffusion)
    if name == "loss-second-moment":
        return LossSecondMomentResampler(diffusion)
    raise ValueError(f"unknown schedule_sampler {name!r}: expected 'uniform' or 'loss-second-moment'")


class ScheduleSampler(ABC):
    """Distribution over timesteps; losses are reweighted so the objective stays unbiased."""

    @abstractmethod
    def weights(self) -> np.ndarray:
        """Non-negative (unnormalised) sampling weights [T], float64."""

    def sample(self, batch_size: int, device: torch.device | str,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw timesteps for a batch.

        Returns:
            t: LongTensor [batch_size] on ``device``; weights: float32 [batch_size] = 1 / (T * p(t)).
        """
        gen_device = generator.device if generator is not None else torch.device("cpu")
        probs = self.probs_on(gen_device)
        indices = torch.multinomial(probs, batch_size, replacement=True, generator=generator)
        weights = 1.0 / (len(probs) * probs[indices])
        return indices.to(device=device, dtype=torch.long), weights.to(device=device, dtype=torch.float32)

    def probs_on(self, device: torch.device) -> torch.Tensor:
        """The normalised weights [T] (float64) on ``device``, computed afresh (the weights may change)."""
        w = self.weights()
        return torch.from_numpy(w / np.sum(w)).to(device)


class UniformSampler(ScheduleSampler):
    """Uniform over the diffusion's timesteps (all weights 1)."""

    def __init__(self, diffusion: GaussianDiffusion):
        self._weights = np.ones(diffusion.num_timesteps, dtype=np.float64)
        self._probs: dict[torch.device, torch.Tensor] = {}

    def weights(self) -> np.ndarray:
        return self._weights

    def probs_on(self, device: torch.device) -> torch.Tensor:
        """Cached per device: the weights never change, so a training step uploads nothing (issue 11)."""
        device = torch.device(device)
        if device not in self._probs:
            self._probs[device] = super().probs_on(device)
        return self._probs[device]


class LossSecondMomentResampler(ScheduleSampler):
    """p(t) ∝ sqrt(E[loss_t^2]) over the last ``history_per_term`` losses, mixed with ``uniform_prob``.

    Uniform until every timestep has a full history.
    """

    def __init__(self, diffusion: GaussianDiffusion, history_per_term: int = 10, uniform_prob: float = 0.001):
        self.diffusion = diffusion
        self.history_per_term = history_per_term
        self.uniform_prob = uniform_prob
        self._loss_history = np.zeros((diffusion.num_timesteps, history_per_term), dtype=np.float64)
        self._loss_counts = np.zeros(diffusion.num_timesteps, dtype=np.int64)

    def weights(self) -> np.ndarray:
        if not self._warmed_up():
            return np.ones(self.diffusion.num_timesteps, dtype=np.float64)
        w = np.sqrt(np.mean(self._loss_history ** 2, axis=-1))
        w = w / np.sum(w)
        return w * (1.0 - self.uniform_prob) + self.uniform_prob / len(w)

    def _warmed_up(self) -> bool:
        return bool((self._loss_counts == self.history_per_term).all())

    def update_with_local_losses(self, local_ts: torch.Tensor, local_losses: torch.Tensor) -> None:
        """Record this rank's (t, loss) pairs; gathered from all ranks when a process group is running.

        local_ts: [B] timesteps; local_losses: [B] per-sample losses. Every rank must call this.
        """
        ts = local_ts.detach().cpu().tolist()
        losses = local_losses.detach().float().cpu().tolist()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, (ts, losses))
            ts = [t for rank_ts, _ in gathered for t in rank_ts]
            losses = [loss for _, rank_losses in gathered for loss in rank_losses]
        self.update_with_all_losses(ts, losses)

    def update_with_all_losses(self, ts: list[int], losses: list[float]) -> None:
        """Push each loss into its timestep's FIFO history."""
        for t, loss in zip(ts, losses):
            if self._loss_counts[t] == self.history_per_term:
                self._loss_history[t, :-1] = self._loss_history[t, 1:]
                self._loss_history[t, -1] = loss
            else:
                self._loss_history[t, self._loss_counts[t]] = loss
                self._loss_counts[t] += 1
