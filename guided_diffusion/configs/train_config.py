"""The training run's typed config (``TrainConfig``: the flags besides the model and diffusion ones) and
its validators; the flags are generated from it in ``training.training_flags``."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import ClassVar

from guided_diffusion.configs.base import Config, require, require_finite, setting
from guided_diffusion.utils.precision import PRECISIONS

NOISE_TYPES = ("gaussian", "simplex")
NO_RUN_EFFECT: tuple[str, ...] = ()  # field metadata "changes" for settings that leave the weights alone


@dataclasses.dataclass(frozen=True)
class TrainConfig(Config):
    """The training flags besides the model and diffusion ones (docs/method.md, 'Training')."""

    SECTION: ClassVar[str] = "train"

    data_dir: str = setting("", "preprocessed data root (data_splits/, npy_train/)", changes=NO_RUN_EFFECT)
    log_dir: str = setting("", "logs and checkpoints (default $OPENAI_LOGDIR, else a new temp folder)",
                           changes=NO_RUN_EFFECT)
    image_dir: str = setting("", "preview images (default LOG_DIR/images)", changes=NO_RUN_EFFECT)
    name: str = setting("brats", "dataset name used in preview file names", changes=NO_RUN_EFFECT)
    mixed: bool = setting(True, "train on healthy and unhealthy slices (False: healthy slices only)")
    ret_lab: bool = setting(True, "load the slice labels (a class-conditional model needs them)")
    schedule_sampler: str = setting("uniform", "timestep sampler", choices=("uniform", "loss-second-moment"))
    lr: float = setting(1e-4, "AdamW learning rate")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    lr_anneal_steps: int = setting(0, "decay the learning rate linearly to 0 over N steps and stop (0: off)")
    batch_size: int = setting(1, "global batch size (all processes together)")
    microbatch: int = setting(-1, "split each process's batch into micro-batches of N (-1: off)")
    ema_rate: str = setting("0.9999", "EMA rates in [0, 1), comma-separated (e.g. 0.999,0.9999)")
    log_interval: int = setting(100, "log every N steps", changes=NO_RUN_EFFECT)
    save_interval: int = setting(100, "write a checkpoint every N steps", changes=NO_RUN_EFFECT)
    resume_checkpoint: str = setting("", "continue from this modelNNNNNN.pt (also upstream checkpoints)",
                                     changes=NO_RUN_EFFECT)
    resume: str = setting("auto", "auto: continue from the newest complete checkpoint in the log dir; "
                          "never: start fresh (refused where checkpoints exist, see --clear_checkpoints)",
                          choices=("auto", "never"), changes=NO_RUN_EFFECT)
    clear_checkpoints: bool = setting(False, "with --resume never: delete the checkpoints in the log dir",
                                      changes=NO_RUN_EFFECT)
    precision: str = setting("fp32", "fp32 | bf16 (autocast) | fp16 (autocast + loss scaling)",
                             choices=PRECISIONS)
    compile: bool = setting(False, "torch.compile the network (eager fallback with one line where "
                            "unsupported); checkpoints unchanged", changes=NO_RUN_EFFECT)
    channels_last: bool = setting(False, "channels_last memory format for the network and its inputs",
                                  changes=NO_RUN_EFFECT)
    cpu_fused_attention: bool = setting(
        False, "on the CPU, attention in torch's fused (flash) kernel, as on a GPU: ~6x faster at 1024 "
        "tokens (64 px with attention at 32), not bit-identical to the default; no effect on a GPU",
        changes=NO_RUN_EFFECT)
    grad_clip: float = setting(0.0, "clip the global gradient norm to this value (0: off)")
    n_unhealthy_patients: int = setting(-1, "use only the first N unhealthy patients (-1: all)")
    n_healthy_patients: int = setting(-1, "use only the first N healthy patients (-1: all)")
    total_epochs: int = setting(1000, "stop after N epochs (0: no epoch limit)", changes=NO_RUN_EFFECT)
    max_steps: int = setting(0, "stop after N steps (0: no step limit)", changes=NO_RUN_EFFECT)
    threshold: float = setting(-1.0, "label-dropout probability during training (<= 0: off; paper: 0.1)")
    seed: int = setting(0, "seed of the weights, data order and noise")
    noise_type: str = setting("gaussian", "training noise: gaussian, or multi-octave simplex (AnoDDPM (S))",
                              choices=NOISE_TYPES)
    simplex_frequency: float = setting(64.0, "simplex noise: first octave's wavelength in pixels "
                                       "(upstream: 64 at 128 px)")
    num_workers: int = setting(2, "data-loading worker processes", changes=NO_RUN_EFFECT)
    preview_steps: int = setting(50, "sampling steps of the preview images", changes=NO_RUN_EFFECT)
    ddpm_sampling: bool = setting(False, "previews with ancestral (DDPM) instead of DDIM sampling",
                                  changes=NO_RUN_EFFECT)
    sample_shape: tuple[int, ...] = setting((), "N C H W of preview samples at each save (empty: none)",
                                            changes=NO_RUN_EFFECT)
    w: tuple[float, ...] = setting((), "guidance strengths of the previews (empty or -1: no guidance)",
                                   changes=NO_RUN_EFFECT)

    def validate(self) -> None:
        parse_ema_rates(self.ema_rate)
        for name in ("lr", "weight_decay", "grad_clip", "threshold"):
            require_finite(name, getattr(self, name))
        require(self.lr > 0, f"--lr must be > 0, got {self.lr}")
        require_finite("simplex_frequency", self.simplex_frequency)
        require(self.simplex_frequency > 0, f"--simplex_frequency must be > 0, got {self.simplex_frequency}")
        require(self.batch_size >= 1, f"--batch_size must be >= 1, got {self.batch_size}")
        require(self.weight_decay >= 0, f"--weight_decay must be >= 0, got {self.weight_decay}")
        require(self.grad_clip >= 0, f"--grad_clip must be >= 0 (0: off), got {self.grad_clip}")
        require(self.microbatch == -1 or self.microbatch >= 1,
                f"--microbatch must be -1 (off) or >= 1, got {self.microbatch}")
        for name in ("lr_anneal_steps", "max_steps", "total_epochs", "seed"):
            require(getattr(self, name) >= 0, f"--{name} must be >= 0, got {getattr(self, name)}")
        for name in ("n_unhealthy_patients", "n_healthy_patients"):
            value = getattr(self, name)
            require(value >= -1, f"--{name} must be -1 (all) or >= 0, got {value}")
            require(value == -1 or not self.mixed, f"--{name} {value} applies only with --mixed False "
                    "(mixed training reads every subject); drop it or pass --mixed False")
        require(self.preview_steps >= 1, f"--preview_steps must be >= 1, got {self.preview_steps}")
        for w in self.w:
            require_finite("w", w)
            require(w == -1 or w >= 0, f"--w must be >= 0 (or -1: no guidance), got {w:g}")
        require(self.num_workers >= 0, f"--num_workers must be >= 0, got {self.num_workers}")
        require(self.log_interval > 0 and self.save_interval > 0,
                "--log_interval and --save_interval must be positive")
        require(not self.sample_shape or (len(self.sample_shape) == 4 and min(self.sample_shape) > 0),
                f"--sample_shape {list(self.sample_shape)}: expected 4 positive integers N C H W or nothing")


def parse_ema_rates(ema_rate: float | str | Sequence[float]) -> list[str]:
    """``--ema_rate`` ("0.9999" or "0.999,0.9999" or numbers) as rate strings, each a number in [0, 1)."""
    rates = ema_rate.split(",") if isinstance(ema_rate, str) else (
        [ema_rate] if isinstance(ema_rate, int | float) else list(ema_rate))
    out = [str(r).strip() for r in rates if str(r).strip()]
    if not out:
        raise ValueError(f"--ema_rate {ema_rate!r}: expected one or more rates in [0, 1), e.g. 0.9999")
    for r in out:
        try:
            value = float(r)
        except ValueError:
            raise ValueError(f"--ema_rate {ema_rate!r}: {r!r} is not a number; expected comma-separated "
                             "rates in [0, 1), e.g. 0.9999 or 0.999,0.9999") from None
        if not (0.0 <= value < 1.0):
            raise ValueError(f"--ema_rate {r}: must be in [0, 1) (1 or more never moves or diverges), "
                             "e.g. 0.9999")
    return out
