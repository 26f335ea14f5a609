"""Training loop: AdamW, EMA, mixed precision, DDP, exact resume, optional DDIM previews.

Randomness per step: timesteps, noise and label-dropout draws come from a ``torch.Generator`` seeded
from (seed, rank, step); only dropout layers use the global torch RNG, whose per-rank state is saved
in every checkpoint. Together with the saved data position (epoch, batch index) a resumed run
therefore sees exactly the batches and random draws of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import math
import random
import resource
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import blobfile as bf
import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import BatchSampler, DataLoader, Sampler

from . import checkpoint, dist_util, logger
from .io_util import atomic_write_bytes, atomic_write_json

PRECISIONS = ("fp32", "bf16", "fp16")


def seed_for(*parts: int) -> int:
    """A 63-bit seed derived from integers (e.g. seed, rank, step) via numpy's SeedSequence."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)
    return int(state[0] >> np.uint64(1))


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def get_rng_state() -> dict[str, Any]:
    """Global RNG states of this process (python, numpy, torch CPU and CUDA)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what ``get_rng_state`` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


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


class TrainLoop:
    """Diffusion training with resume, EMA and previews.

    Args:
        model: the network (already on ``dist_util.dev()``); called as
            ``model(x_t, t, y=..., threshold=label_dropout, generator=g)`` for class-conditional batches.
        diffusion: provides ``training_losses(model, x, t, model_kwargs, generator=)`` and ``num_timesteps``.
        data: ``(loader, sampler)`` or a DataLoader; batches are ``(x [B,C,H,W], cond dict)``.
        batch_size: global batch size (all ranks); ``microbatch`` splits each rank's batch (-1 = off).
        ema_rate: float or comma-separated string / sequence of rates.
        resume: "auto" (newest complete checkpoint in ``log_dir``) or "never"; ``resume_checkpoint``
            (a ``model*.pt`` path, also upstream-named) takes precedence.
        label_dropout: probability of replacing the condition with the null condition (≤ 0: off).
        grad_clip: max global grad norm (0 = no clipping; the norm is logged either way).
        precision: "fp32", "bf16" (autocast) or "fp16" (autocast + GradScaler).
        max_steps / total_epochs: stop at whichever comes first (0 = no limit; one must be set).
        config: resolved flags ({"model": ..., "diffusion": ..., "train": ...}) saved with checkpoints;
            on resume, differing "model"/"diffusion" entries raise ValueError.
        preview_shape: (n, C, H, W) of preview samples; None/empty = no previews.
        preview_w: guidance strengths for previews (None or negative = plain conditional sampling).
        preview_diffusion: respaced diffusion for previews (default: ``diffusion``); ddpm_preview uses
            ancestral sampling instead of DDIM.
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
    ):
        if precision not in PRECISIONS:
            raise ValueError(f"--precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
        if max_steps <= 0 and total_epochs <= 0 and lr_anneal_steps <= 0:
            raise ValueError("set --max_steps or --total_epochs (> 0) so that training ends")
        if resume not in ("auto", "never"):
            raise ValueError(f"--resume {resume!r}: expected 'auto' or 'never'")
        if log_interval <= 0 or save_interval <= 0:
            raise ValueError("--log_interval and --save_interval must be positive")
        self.model = model
        self.diffusion = diffusion
        if isinstance(data, tuple):
            self.loader, self.sampler = data
        else:
            self.loader, self.sampler = data, getattr(data, "sampler", None)
        self.world_size = dist_util.get_world_size()
        self.rank = dist_util.get_rank()
        self.device = dist_util.dev()
        if batch_size % self.world_size:
            raise ValueError(f"--batch_size {batch_size} (global) must be divisible by the world size "
                             f"{self.world_size}")
        self.global_batch = batch_size
        self.microbatch = microbatch
        self.lr = lr
        rates = ema_rate.split(",") if isinstance(ema_rate, str) else (
            [ema_rate] if isinstance(ema_rate, int | float) else list(ema_rate))
        self.ema_rates = [str(r).strip() for r in rates if str(r).strip()]
        self.log_interval = log_interval
        self.save_interval = save_interval
        self.resume_checkpoint = resume_checkpoint
        self.resume = resume
        self.lr_anneal_steps = lr_anneal_steps
        if schedule_sampler is None:
            from .resample import UniformSampler

            schedule_sampler = UniformSampler(diffusion)
        self.schedule_sampler = schedule_sampler
        self.label_dropout = label_dropout
        self.grad_clip = grad_clip
        self.precision = precision
        self.max_steps = max_steps
        self.total_epochs = total_epochs
        self.seed = seed
        self.config = dict(config) if config else {}
        self.log_dir = log_dir or logger.get_dir()
        self.image_dir = image_dir or bf.join(self.log_dir, "images")
        self.preview_shape = tuple(int(s) for s in preview_shape) if preview_shape else None
        self.preview_w = [None if (w is None or w < 0) else float(w) for w in preview_w] or [None]
        self.preview_diffusion = preview_diffusion or diffusion
        self.ddpm_preview = ddpm_preview
        self.num_classes = num_classes if num_classes is not None else getattr(model, "num_classes", None)
        if self.preview_shape is not None and len(self.preview_shape) != 4:
            raise ValueError(f"--sample_shape {list(self.preview_shape)}: expected 4 integers N C H W "
                             "(e.g. 12 4 128 128) or nothing for no previews")

        self.params = [p for p in model.parameters() if p.requires_grad]
        self.param_names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay)
        self.scaler = torch.amp.GradScaler(self.device.type) if precision == "fp16" else None
        self.step = 0
        self.epoch = 0
        self.batch_index = 0
        self.last_saved_step = -1
        self._pending_rng: dict[str, Any] | None = None
        seed_everything(seed_for(seed, self.rank))  # per-rank stream for dropout layers
        dist_util.sync_params(self.model.parameters())
        self.ema = {r: {n: p.detach().clone() for n, p in zip(self.param_names, self.params)}
                    for r in self.ema_rates}
        self._load_resume()
        dist_util.sync_params(self.model.parameters())
        if dist_util.is_main_process() and self.config:
            atomic_write_json(self.config, bf.join(self.log_dir, "config.json"))
        if self.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            # no buffer sync in forward (newer torch renamed broadcast_buffers to forward_sync_buffers)
            no_buffer_sync = ({"forward_sync_buffers": False}
                              if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
                              else {"broadcast_buffers": False})
            self.ddp_model: torch.nn.Module = DDP(
                model, device_ids=ids, output_device=ids[0] if ids else None,
                find_unused_parameters=False, bucket_cap_mb=128, **no_buffer_sync,
            )
        else:
            self.ddp_model = model

    # ------------------------------------------------------------------ resume
    def _load_resume(self) -> None:
        ck: checkpoint.TrainingCheckpoint | None = None
        if self.resume_checkpoint:
            ck = self._load_named(self.resume_checkpoint)
        elif self.resume == "auto":
            step, found = None, None
            if dist_util.is_main_process():
                stale = checkpoint.remove_stale_temp_files(self.log_dir)
                if stale:
                    logger.log(f"removed {len(stale)} temporary file(s) of an interrupted save: {stale}")
                found = checkpoint.latest_complete_checkpoint(self.log_dir)
                step = found.step if found else None
            step = dist_util.broadcast_object(step)
            if step is not None:
                ck = found if dist_util.is_main_process() else checkpoint.load_training_checkpoint(
                    self.log_dir, step)
        if ck is None:
            return
        self._check_config(ck)
        self._apply(ck)
        logger.log(f"resumed from step {ck.step} ({ck.paths[0] if ck.paths else self.log_dir}); "
                   f"epoch {self.epoch}, batch {self.batch_index}")

    def _load_named(self, path: str) -> checkpoint.TrainingCheckpoint:
        parsed = checkpoint.parse_checkpoint_name(path)
        if parsed is None or parsed[0] != "model":
            raise ValueError(f"--resume_checkpoint {path}: expected a file named modelNNNNNN.pt")
        step, directory = parsed[2], bf.dirname(path)
        if step in checkpoint.list_checkpoints(directory):
            return checkpoint.load_training_checkpoint(directory, step)
        # upstream-style checkpoint: weights (+ EMA / optimizer files beside it when present)
        model_sd = checkpoint.load_state_dict_file(path)
        ema = {}
        for r in self.ema_rates:
            p = bf.join(directory, f"ema_{r}_{step:06d}.pt")
            if bf.exists(p):
                ema[r] = checkpoint.load_state_dict_file(p)
        opt_path = bf.join(directory, f"opt{step:06d}.pt")
        opt = checkpoint.load_state_dict_file(opt_path) if bf.exists(opt_path) else None
        return checkpoint.TrainingCheckpoint(
            step=step, model=model_sd, ema=ema, opt=opt, state={}, paths=[path]
        )

    def _check_config(self, ck: checkpoint.TrainingCheckpoint) -> None:
        saved = ck.state.get("config") or {}
        diffs = []
        for part in ("model", "diffusion"):
            a, b = saved.get(part), self.config.get(part)
            if a is None or b is None:
                continue
            for k in sorted(set(a) | set(b)):
                if a.get(k) != b.get(k):
                    diffs.append(f"{part}.{k}: checkpoint {a.get(k)!r}, flags {b.get(k)!r}")
        if diffs:
            where = bf.dirname(ck.paths[0]) if ck.paths else self.log_dir
            raise ValueError(
                f"the checkpoint at step {ck.step} in {where} was trained with different flags:\n  "
                + "\n  ".join(diffs)
                + "\nuse the original flags, or a new log dir (OPENAI_LOGDIR) / --resume never to restart"
            )

    def _apply(self, ck: checkpoint.TrainingCheckpoint) -> None:
        path = ck.paths[0] if ck.paths else "checkpoint"
        checkpoint.check_state_dict_fits(self.model, ck.model, path, self.config.get("model"))
        self.model.load_state_dict(ck.model)
        named = dict(self.model.named_parameters())
        for r in self.ema_rates:
            if r in ck.ema:
                for n in self.param_names:
                    self.ema[r][n].copy_(ck.ema[r][n])
            else:
                logger.warn(f"no EMA weights for rate {r} at step {ck.step}; that EMA starts from the model")
                for n in self.param_names:
                    self.ema[r][n].copy_(named[n].detach())
        if ck.opt is not None:
            self.opt.load_state_dict(ck.opt)
        else:
            logger.warn(f"no optimizer state for step {ck.step}; AdamW moments start from zero")
        self.step = ck.step
        self.last_saved_step = ck.step
        state = ck.state
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        data = state.get("data")
        n_batches = self._batches_per_epoch()
        if data:
            epoch, batch = int(data["epoch"]), int(data["batch_index"])
            if int(data.get("global_batch", self.global_batch)) != self.global_batch:
                logger.warn("global batch size changed since the checkpoint; data order will differ from "
                            "an uninterrupted run")
                batch = batch * int(data["global_batch"]) // self.global_batch
        else:  # upstream checkpoint: infer the position from the step (same batch size assumed)
            epoch, batch = divmod(ck.step, n_batches) if n_batches else (0, 0)
        if n_batches and batch >= n_batches:
            epoch, batch = epoch + 1, 0
        self.epoch, self.batch_index = epoch, batch
        rng = state.get("rng")
        if rng and len(rng) == self.world_size:
            self._pending_rng = rng[self.rank]
        else:
            if rng:
                logger.warn(f"checkpoint has RNG states for {len(rng)} ranks, this run has "
                            f"{self.world_size}; reseeding")
            seed_everything(seed_for(self.seed, self.rank, self.step))

    # ------------------------------------------------------------------ loop
    def _batches_per_epoch(self) -> int:
        try:
            return len(self.loader)
        except TypeError:
            return 0

    def _done(self) -> bool:
        if self.max_steps > 0 and self.step >= self.max_steps:
            return True
        if self.lr_anneal_steps > 0 and self.step >= self.lr_anneal_steps:
            return True
        return self.total_epochs > 0 and self.epoch >= self.total_epochs

    def _total_steps(self) -> int | None:
        limits = [s for s in (self.max_steps, self.lr_anneal_steps) if s > 0]
        if self.total_epochs > 0 and self._batches_per_epoch():
            limits.append(self.total_epochs * self._batches_per_epoch())
        return min(limits) if limits else None

    def _restore_pending_rng(self) -> None:
        if self._pending_rng is not None:
            set_rng_state(self._pending_rng)
            self._pending_rng = None

    def run_loop(self) -> None:
        """Train until max_steps / total_epochs; saves every save_interval steps and once at the end."""
        bar = None
        if dist_util.is_main_process() and sys.stdout.isatty():
            from tqdm import tqdm

            bar = tqdm(total=self._total_steps(), initial=self.step, desc="train", dynamic_ncols=True)
        n_batches = self._batches_per_epoch()
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

    def _current_lr(self) -> float:
        if self.lr_anneal_steps <= 0:
            return self.lr
        return self.lr * max(0.0, 1.0 - self.step / self.lr_anneal_steps)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

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
        for i in range(0, n, micro):
            xb = x[i:i + micro].to(self.device, non_blocking=True)
            kwargs = {k: v[i:i + micro].to(self.device) for k, v in cond.items()}
            if "y" in kwargs:
                kwargs["threshold"] = self.label_dropout
                kwargs["generator"] = gen
            last = i + micro >= n
            t, weights = self.schedule_sampler.sample(xb.shape[0], self.device, generator=gen)
            sync = self.ddp_model.no_sync() if self.world_size > 1 and not last else contextlib.nullcontext()
            with sync:
                with self._autocast():
                    losses = self.diffusion.training_losses(self.ddp_model, xb, t, model_kwargs=kwargs,
                                                            generator=gen)
                if hasattr(self.schedule_sampler, "update_with_local_losses"):
                    self.schedule_sampler.update_with_local_losses(t, losses["loss"].detach())
                loss = (losses["loss"].float() * weights).mean() * (xb.shape[0] / n)
                self._log_losses(t, {k: v.detach() * weights for k, v in losses.items()})
                if self.scaler is not None:
                    self.scaler.scale(loss).backward()
                else:
                    loss.backward()
        self._optimize()
        self.step += 1
        self._log_step(n, time.perf_counter() - t0)

    def _optimize(self) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(self.opt)
        grads = [p.grad for p in self.params if p.grad is not None]
        if self.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        norm_value = float(norm)
        logger.logkv_mean("grad_norm", norm_value)
        lr = self._current_lr()
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
        with torch.no_grad():
            for rate_str, ema in self.ema.items():
                rate = float(rate_str)
                for n, p in zip(self.param_names, self.params):
                    ema[n].mul_(rate).add_(p.detach(), alpha=1.0 - rate)

    def _log_losses(self, t: torch.Tensor, losses: Mapping[str, torch.Tensor]) -> None:
        quart = (4 * t.detach().cpu() // self.diffusion.num_timesteps).clamp(0, 3).tolist()
        for key, values in losses.items():
            vals = values.float().cpu().tolist()
            logger.logkv_mean(key, sum(vals) / len(vals))
            for q, v in zip(quart, vals):
                logger.logkv_mean(f"{key}_q{q}", v)

    def _log_step(self, n_local: int, seconds: float) -> None:
        logger.logkv("step", self.step)
        logger.logkv("samples", self.step * self.global_batch)
        logger.logkv("epoch", self.epoch)
        logger.logkv_mean("step_time", seconds)
        logger.logkv_mean("samples_per_s", n_local * self.world_size / max(seconds, 1e-9))
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        logger.logkv("peak_mem_mb", round(peak, 1))

    # ------------------------------------------------------------------ saving
    def _data_position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch_index": self.batch_index, "global_batch": self.global_batch,
                "batches_per_epoch": self._batches_per_epoch()}

    def save(self) -> None:
        """Write a complete checkpoint for the current step (rank 0), then previews; all ranks call it."""
        rng = dist_util.all_gather_object(get_rng_state())
        if dist_util.is_main_process():
            extra = {
                "config": self.config,
                "rng": rng,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "data": self._data_position(),
                "seed": self.seed,
                "precision": self.precision,
                "world_size": self.world_size,
            }
            checkpoint.save_checkpoint(self.log_dir, self.step, self.model, self.ema, self.opt, extra)
            logger.log(f"saved checkpoint for step {self.step} in {self.log_dir}")
            if self.preview_shape is not None:
                self.preview()
        dist_util.barrier()
        self.last_saved_step = self.step

    def ema_model(self, rate: str | None = None) -> torch.nn.Module:
        """A copy of the model holding the EMA weights of ``rate`` (default: the first rate), in eval mode."""
        rate = rate or self.ema_rates[0]
        m = copy.deepcopy(self.model)
        named = dict(m.named_parameters())
        with torch.no_grad():
            for n in self.param_names:
                named[n].copy_(self.ema[rate][n])
        return m.eval()

    def preview(self) -> list[str]:
        """DDIM (or DDPM) samples from the EMA weights, one PNG grid per guidance strength (rank 0)."""
        n, c, h, w = self.preview_shape
        model = self.ema_model()
        paths = []
        devices = [self.device] if self.device.type == "cuda" else []
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=devices), torch.no_grad(), self._autocast():
            gen = torch.Generator(device=self.device)
            gen.manual_seed(seed_for(self.seed, 7919))
            noise = torch.randn((n, c, h, w), generator=gen, device=self.device)
            kwargs = {}
            if self.num_classes:
                kwargs["y"] = torch.tensor([0] * (n // 2) + [1] * (n - n // 2), device=self.device).clamp(
                    max=self.num_classes - 1)
            pd = self.preview_diffusion
            loop = pd.p_sample_loop if self.ddpm_preview else pd.ddim_sample_loop
            for guidance in self.preview_w:
                if guidance is not None and not self.num_classes:
                    continue
                sample = loop(model, (n, c, h, w), noise=noise.clone(), w=guidance, clip_denoised=True,
                              model_kwargs=kwargs, device=self.device, generator=gen)
                tag = "cond" if guidance is None else f"w{guidance:g}"
                if not self.num_classes:
                    tag = "uncond"
                path = bf.join(self.image_dir, f"{self.step:06d}_{tag}.png")
                atomic_write_bytes(image_grid_png(sample.float().cpu()), path)
                paths.append(path)
        random.setstate(py_state)
        np.random.set_state(np_state)
        del model
        logger.log(f"wrote {len(paths)} preview grid(s) to {self.image_dir}")
        return paths


def image_grid_png(x: torch.Tensor, pad: int = 2) -> bytes:
    """PNG bytes of a grey-scale grid of ``x`` [N, C, H, W] in [-1, 1]: one row per sample with its C
    channels side by side (C > 1), or rows of up to 8 samples (C = 1)."""
    from PIL import Image

    x = ((x.clamp(-1, 1) + 1) / 2).numpy()
    n, c, h, w = x.shape
    tiles = [x[i, j] for i in range(n) for j in range(c)]
    cols = c if c > 1 else min(n, 8)
    rows = math.ceil(len(tiles) / cols)
    grid = np.ones((rows * (h + pad) + pad, cols * (w + pad) + pad), dtype=np.float32)
    for k, tile in enumerate(tiles):
        r, col = divmod(k, cols)
        y0, x0 = pad + r * (h + pad), pad + col * (w + pad)
        grid[y0:y0 + h, x0:x0 + w] = tile
    buf = io.BytesIO()
    Image.fromarray((grid * 255).round().astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()
