"""Training loop: AdamW, EMA, mixed precision, DDP, exact resume, optional DDIM previews.

Randomness per step: timesteps, noise and label-dropout draws come from a ``torch.Generator`` seeded
from (seed, rank, step); only dropout layers use the global torch RNG, whose per-rank state is saved
in every checkpoint. Together with the saved data position (epoch, batch index) a resumed run
therefore sees exactly the batches and random draws of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import blobfile as bf
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import BatchSampler, DataLoader, Sampler
from tqdm import tqdm

from guided_diffusion.configs.train_config import parse_ema_rates
from guided_diffusion.reporting.previews import ema_copy, write_previews
from guided_diffusion.resample import UniformSampler
from guided_diffusion.training import checkpoint, train_resume
from guided_diffusion.training.rng import get_rng_state, seed_everything, seed_for, set_rng_state
from guided_diffusion.training.train_logging import fetch_step_values, log_losses, log_step
from guided_diffusion.utils import dist_util, logger
from guided_diffusion.utils import precision as precision_util
from guided_diffusion.utils.io_util import atomic_write_json
from guided_diffusion.utils.precision import PRECISIONS, autocast

__all__ = ["TrainLoop", "loader_from_batch"]


class _OffsetSampler(Sampler):
    """Yields the wrapped sampler's indices from position ``offset`` on (skip without loading data)."""

    def __init__(self, sampler: Sampler, offset: int):
        self.sampler, self.offset = sampler, offset

    def __iter__(self) -> Iterator[Any]:
        it = iter(self.sampler)
        for _ in range(self.offset):
            next(it, None)
        return it

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.offset)


def loader_from_batch(loader: DataLoader, start_batch: int) -> Iterable[Any]:
    """``loader``'s batches from index ``start_batch`` on, for the epoch already set on its sampler.

    A standard ``DataLoader(sampler=..., batch_size=...)`` is rebuilt over an offset sampler, so skipped
    samples are never loaded; other loaders fall back to iterating and discarding batches.
    """
    if start_batch <= 0:
        return loader
    if isinstance(loader, DataLoader) and type(loader.batch_sampler) is BatchSampler and loader.batch_size:
        return DataLoader(
            loader.dataset,
            batch_size=loader.batch_size,
            sampler=_OffsetSampler(loader.sampler, start_batch * loader.batch_size),
            num_workers=loader.num_workers,
            collate_fn=loader.collate_fn,
            pin_memory=loader.pin_memory,
            drop_last=loader.drop_last,
            timeout=loader.timeout,
            worker_init_fn=loader.worker_init_fn,
            generator=loader.generator,
            prefetch_factor=loader.prefetch_factor if loader.num_workers > 0 else None,
        )
    it = iter(loader)
    for _ in range(start_batch):
        next(it, None)
    return it


def check_loop_settings(*, precision: str, resume: str, max_steps: int, total_epochs: int,
                        lr_anneal_steps: int, log_interval: int, save_interval: int, batch_size: int,
                        preview_shape: Sequence[int] | None) -> None:
    """ValueError naming the flag for settings TrainLoop cannot run with."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if max_steps <= 0 and total_epochs <= 0 and lr_anneal_steps <= 0:
        raise ValueError("set --max_steps or --total_epochs (> 0) so that training ends")
    if resume not in ("auto", "never"):
        raise ValueError(f"--resume {resume!r}: expected 'auto' or 'never'")
    if log_interval <= 0 or save_interval <= 0:
        raise ValueError("--log_interval and --save_interval must be positive")
    world = dist_util.get_world_size()
    if batch_size % world:
        raise ValueError(f"--batch_size {batch_size} (global) must be divisible by the world size {world}")
    if preview_shape and len(preview_shape) != 4:
        raise ValueError(f"--sample_shape {list(preview_shape)}: expected 4 integers N C H W "
                         "(e.g. 12 4 128 128) or nothing for no previews")


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` in DistributedDataParallel, without buffer sync in forward."""
    ids = [device.index] if device.type == "cuda" else None
    # newer torch renamed broadcast_buffers to forward_sync_buffers
    no_buffer_sync = ({"forward_sync_buffers": False}
                      if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
                      else {"broadcast_buffers": False})
    return DDP(model, device_ids=ids, output_device=ids[0] if ids else None,
               find_unused_parameters=False, bucket_cap_mb=128, **no_buffer_sync)


def total_steps(max_steps: int, lr_anneal_steps: int, total_epochs: int,
                batches_per_epoch: int) -> int | None:
    """The step count at which training ends (None when it is not known in advance)."""
    limits = [s for s in (max_steps, lr_anneal_steps) if s > 0]
    if total_epochs > 0 and batches_per_epoch:
        limits.append(total_epochs * batches_per_epoch)
    return min(limits) if limits else None


def loader_len(loader: Any) -> int:
    """``len(loader)``, 0 for a loader without a length."""
    try:
        return len(loader)
    except TypeError:
        return 0


def progress_bar(loop: Any) -> Any:
    """A tqdm bar over the loop's steps on rank 0 at a terminal, else None."""
    if not (dist_util.is_main_process() and sys.stdout.isatty()):
        return None

    total = total_steps(loop.max_steps, loop.lr_anneal_steps, loop.total_epochs, loop.batches_per_epoch())
    return tqdm(total=total, initial=loop.step, desc="train", dynamic_ncols=True)


def wrap_network(model: torch.nn.Module, device: torch.device, world_size: int, compile: bool = False,
                 channels_last: bool = False) -> torch.nn.Module:
    """The callable the loop trains through: ``model`` converted in place to channels_last (optional),
    in DDP when ``world_size > 1``, then torch.compile'd (optional, eager fallback). ``model`` itself
    stays the module whose state_dict is saved, so the checkpoint keys never carry ``_orig_mod.``."""

    if channels_last:
        precision_util.to_channels_last(model)
    net = wrap_ddp(model, device) if world_size > 1 else model
    return precision_util.maybe_compile(net, compile, log=logger.log)  # looked up per call (tests patch it)


def update_ema(ema_by_rate: Mapping[str, dict[str, torch.Tensor]], names: Sequence[str],
               params: Sequence[torch.Tensor]) -> None:
    """ema <- rate * ema + (1 - rate) * param, for every rate (two fused multi-tensor kernels per rate,
    the same arithmetic element by element as one multiply and one add per tensor)."""
    with torch.no_grad():
        sources = [p.detach() for p in params]
        for rate_str, ema in ema_by_rate.items():
            rate = float(rate_str)
            targets = [ema[n] for n in names]
            torch._foreach_mul_(targets, rate)
            torch._foreach_add_(targets, sources, alpha=1.0 - rate)


class TrainLoop:
    """Diffusion training with exact resume (see train_resume), EMA and previews (see previews).

    ``model`` (on ``dist_util.dev()``) is called as ``model(x_t, t, y=..., threshold=label_dropout,
    generator=g)``; ``data`` is ``(loader, sampler)`` or a DataLoader of ``(x [B,C,H,W], cond dict)``.
    ``batch_size`` is global (all ranks); ``microbatch`` splits a rank's batch (-1: off). ``ema_rate``:
    rates in [0, 1) as "0.999,0.9999" or numbers. ``resume``: "auto" (newest complete checkpoint in
    ``log_dir``) or "never" (refused where checkpoints exist unless ``clear_checkpoints``);
    ``resume_checkpoint`` (a ``model*.pt`` path, upstream names too) takes precedence. ``precision``:
    fp32, bf16 (autocast) or fp16 (autocast + GradScaler). Training stops at ``max_steps`` /
    ``total_epochs``, whichever comes first. ``config`` ({"model", "diffusion", "train"} flags) is saved
    with every checkpoint; a resume with other architecture or run-changing flags raises ValueError.
    Previews: ``preview_shape`` (N, C, H, W; None: none) sampled per ``preview_w`` (negative: plain
    conditional) with ``preview_diffusion`` (DDIM, or DDPM with ``ddpm_preview``).
    """

    def __init__(
        self,
        *,
        model: torch.nn.Module,
        diffusion: Any,
        data: Any,
        batch_size: int,
        microbatch: int = -1,
        lr: float = 1e-4,
        ema_rate: float | str | Sequence[float] = "0.9999",
        log_interval: int = 100,
        save_interval: int = 5000,
        resume_checkpoint: str = "",
        resume: str = "auto",
        clear_checkpoints: bool = False,
        weight_decay: float = 0.0,
        lr_anneal_steps: int = 0,
        schedule_sampler: Any = None,
        label_dropout: float = -1.0,
        grad_clip: float = 0.0,
        precision: str = "fp32",
        max_steps: int = 0,
        total_epochs: int = 0,
        seed: int = 0,
        config: Mapping[str, Any] | None = None,
        log_dir: str | None = None,
        image_dir: str | None = None,
        preview_shape: Sequence[int] | None = None,
        preview_w: Sequence[float | None] = (),
        preview_diffusion: Any = None,
        ddpm_preview: bool = False,
        num_classes: int | None = None,
        compile: bool = False,
        channels_last: bool = False,
    ):
        check_loop_settings(precision=precision, resume=resume, max_steps=max_steps,
                            total_epochs=total_epochs, lr_anneal_steps=lr_anneal_steps,
                            log_interval=log_interval, save_interval=save_interval, batch_size=batch_size,
                            preview_shape=preview_shape)
        self.model, self.diffusion = model, diffusion
        data = data if isinstance(data, tuple) else (data, getattr(data, "sampler", None))
        self.loader, self.sampler = data
        self.world_size, self.rank = dist_util.get_world_size(), dist_util.get_rank()
        self.device = dist_util.dev()
        self.global_batch, self.microbatch, self.lr = batch_size, microbatch, lr
        self.ema_rates = parse_ema_rates(ema_rate)
        self.log_interval, self.save_interval = log_interval, save_interval
        self.lr_anneal_steps, self.label_dropout, self.grad_clip = lr_anneal_steps, label_dropout, grad_clip
        self.schedule_sampler = UniformSampler(diffusion) if schedule_sampler is None else schedule_sampler
        self.precision = precision
        self.max_steps, self.total_epochs, self.seed = max_steps, total_epochs, seed
        self.config = dict(config) if config else {}
        self.log_dir = log_dir or logger.get_dir()
        self.image_dir = image_dir or bf.join(self.log_dir, "images")
        self.preview_shape = tuple(int(s) for s in preview_shape) if preview_shape else None
        self.preview_w = [None if (w is None or w < 0) else float(w) for w in preview_w] or [None]
        self.preview_diffusion, self.ddpm_preview = preview_diffusion or diffusion, ddpm_preview
        self.num_classes = num_classes if num_classes is not None else getattr(model, "num_classes", None)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.param_names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay)
        self.scaler = torch.amp.GradScaler(self.device.type) if precision == "fp16" else None
        self.step, self.epoch, self.batch_index, self.last_saved_step = 0, 0, 0, -1
        self.pending_rng: dict[str, Any] | None = None
        seed_everything(seed_for(seed, self.rank))  # per-rank stream for dropout layers
        dist_util.sync_params(self.model.parameters())
        self.ema = {r: {n: p.detach().clone() for n, p in zip(self.param_names, self.params)}
                    for r in self.ema_rates}
        if resume == "never" and not resume_checkpoint and dist_util.is_main_process():
            train_resume.clear_or_refuse(self.log_dir, clear_checkpoints)
        ck = train_resume.find_resume_checkpoint(self.log_dir, resume, resume_checkpoint, self.ema_rates)
        if ck is not None:
            train_resume.check_config(ck, self.config, self.log_dir)
            train_resume.apply_checkpoint(self, ck)
        dist_util.sync_params(self.model.parameters())
        if dist_util.is_main_process() and self.config:
            atomic_write_json(self.config, bf.join(self.log_dir, "config.json"))
        self.ddp_model = wrap_network(model, self.device, self.world_size, compile, channels_last)
        self.memory_format = torch.channels_last if channels_last else torch.preserve_format

    def batches_per_epoch(self) -> int:
        return loader_len(self.loader)

    def _done(self) -> bool:
        if self.max_steps > 0 and self.step >= self.max_steps:
            return True
        if self.lr_anneal_steps > 0 and self.step >= self.lr_anneal_steps:
            return True
        return self.total_epochs > 0 and self.epoch >= self.total_epochs

    def _restore_pending_rng(self) -> None:
        if self.pending_rng is not None:
            set_rng_state(self.pending_rng)
            self.pending_rng = None

    def run_loop(self) -> None:
        """Train until max_steps / total_epochs; saves every save_interval steps and once at the end."""
        bar = progress_bar(self)
        n_batches = self.batches_per_epoch()
        if n_batches == 0:
            raise ValueError("the training loader yields no batches (dataset smaller than one global batch? "
                             "lower --batch_size or add data)")
        while not self._done():
            if hasattr(self.sampler, "set_epoch"):
                self.sampler.set_epoch(self.epoch)
            # creating a DataLoader iterator draws from the torch RNG: restore the saved state before it
            # when resuming at an epoch start, after it when resuming mid-epoch (as in the original run)
            if self.batch_index == 0:
                self._restore_pending_rng()
            batches = iter(loader_from_batch(self.loader, self.batch_index))
            self._restore_pending_rng()
            for batch in batches:
                self.run_step(batch)
                self.batch_index += 1
                if self.batch_index >= n_batches:
                    self.epoch, self.batch_index = self.epoch + 1, 0
                if bar is not None:
                    bar.update(1)
                if self.step % self.log_interval == 0:
                    logger.dumpkvs()
                if self.step % self.save_interval == 0:
                    self.save()
                if self._done() or self.batch_index == 0:
                    break
            else:  # loader ended early (e.g. an iterable without len): next epoch
                self.epoch, self.batch_index = self.epoch + 1, 0
        if self.step != self.last_saved_step:
            if self.step % self.log_interval:
                logger.dumpkvs()
            self.save()
        if bar is not None:
            bar.close()

    def run_step(self, batch: Any) -> None:
        """One optimiser step on one batch (split into micro-batches); updates EMA and logs."""
        t0 = time.perf_counter()
        x, cond = batch if isinstance(batch, list | tuple) else (batch, {})
        cond = dict(cond or {})
        n = x.shape[0]
        micro = self.microbatch if 0 < self.microbatch < n else n
        gen = torch.Generator(device=self.device)
        gen.manual_seed(seed_for(self.seed, self.rank, self.step))
        self.opt.zero_grad(set_to_none=True)
        records: list[tuple[torch.Tensor, dict[str, torch.Tensor]]] = []  # logged after the backward passes
        for i in range(0, n, micro):
            xb = x[i:i + micro].to(self.device, non_blocking=True, memory_format=self.memory_format)
            kwargs = {k: v[i:i + micro].to(self.device, non_blocking=True) for k, v in cond.items()}
            if "y" in kwargs:
                kwargs["threshold"] = self.label_dropout
                kwargs["generator"] = gen
            last = i + micro >= n
            t, weights = self.schedule_sampler.sample(xb.shape[0], self.device, generator=gen)
            sync = self.ddp_model.no_sync() if self.world_size > 1 and not last else contextlib.nullcontext()
            with sync:
                with autocast(self.device, self.precision):
                    losses = self.diffusion.training_losses(self.ddp_model, xb, t, model_kwargs=kwargs,
                                                            generator=gen)
                if hasattr(self.schedule_sampler, "update_with_local_losses"):
                    self.schedule_sampler.update_with_local_losses(t, losses["loss"].detach())
                loss = (losses["loss"].float() * weights).mean() * (xb.shape[0] / n)
                records.append((t, {k: v.detach() * weights for k, v in losses.items()}))
                if self.scaler is not None:
                    self.scaler.scale(loss).backward()
                else:
                    loss.backward()
        self._optimize(records)
        self.step += 1
        log_step(self.step, self.step * self.global_batch, self.epoch, n * self.world_size,
                 time.perf_counter() - t0, self.device)

    def _optimize(self, records: Sequence[tuple[torch.Tensor, Mapping[str, torch.Tensor]]]) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(self.opt)
        grads = [p.grad for p in self.params if p.grad is not None]
        if self.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        norm_value, logged = fetch_step_values(norm, records)
        for ts, values in logged:
            log_losses(ts, values, self.diffusion.num_timesteps)
        logger.logkv_mean("grad_norm", norm_value)
        anneal = self.lr_anneal_steps
        lr = self.lr * max(0.0, 1.0 - self.step / anneal) if anneal > 0 else self.lr
        for group in self.opt.param_groups:
            group["lr"] = lr
        logger.logkv("lr", lr)
        if self.scaler is not None:
            scale = self.scaler.get_scale()
            self.scaler.step(self.opt)  # skips the step itself on inf/nan gradients
            self.scaler.update()
            logger.logkv("lg_loss_scale", math.log2(max(self.scaler.get_scale(), 1e-30)))
            if self.scaler.get_scale() < scale:  # step skipped: leave the EMA alone too
                return
        elif math.isfinite(norm_value):
            self.opt.step()
        else:
            logger.warn(f"non-finite gradient norm at step {self.step + 1}; optimiser step skipped")
            return
        update_ema(self.ema, self.param_names, self.params)

    # ------------------------------------------------------------------ saving
    def _data_position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch_index": self.batch_index, "global_batch": self.global_batch,
                "batches_per_epoch": self.batches_per_epoch()}

    def save(self) -> None:
        """Write a complete checkpoint for the current step (rank 0), then previews; all ranks call it."""
        rng = dist_util.all_gather_object(get_rng_state())
        if dist_util.is_main_process():
            extra = {"config": self.config, "rng": rng, "data": self._data_position(), "seed": self.seed,
                     "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                     "precision": self.precision, "world_size": self.world_size}
            checkpoint.save_checkpoint(self.log_dir, self.step, self.model, self.ema, self.opt, extra)
            logger.log(f"saved checkpoint for step {self.step} in {self.log_dir}")
            if self.preview_shape is not None:
                self.preview()
        dist_util.barrier()
        self.last_saved_step = self.step

    def ema_model(self, rate: str | None = None) -> torch.nn.Module:
        """A copy of the model holding the EMA weights of ``rate`` (default: the first rate), in eval mode."""
        return ema_copy(self.model, self.ema[rate or self.ema_rates[0]])

    def preview(self) -> list[str]:
        """DDIM (or DDPM) samples from the EMA weights, one PNG grid per guidance strength (rank 0)."""
        return write_previews(self.ema_model(), self.preview_diffusion, self.preview_shape, self.preview_w,
                              step=self.step, image_dir=self.image_dir, noise_seed=seed_for(self.seed, 7919),
                              device=self.device, num_classes=self.num_classes, ddpm=self.ddpm_preview,
                              autocast=autocast(self.device, self.precision))
