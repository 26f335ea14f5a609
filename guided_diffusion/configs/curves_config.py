"""The typed config of the learning curves (``scripts/learning_curves.py``): the flags it adds to the
training ones (evaluation every K steps, its slices, w, forward steps, seeds)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from guided_diffusion.configs.base import Config, require, require_finite, setting


@dataclasses.dataclass(frozen=True)
class CurvesConfig(Config):
    """The flags of scripts/learning_curves.py on top of scripts/train.py's."""

    SECTION: ClassVar[str] = "curves"

    eval_every: int = setting(0, "evaluate every K training steps (and at --max_steps)")
    eval_slices: int = setting(32, "first N slices of the validation and of the test split")
    eval_w: tuple[float, ...] = setting((), "guidance strength(s) of the AnoFPDM evaluation; several: the "
                                        "paper's rule picks one per checkpoint")
    forward_steps: int = setting(600, "AnoFPDM forward steps (of the --eval_respacing chain)")
    modality: tuple[int, ...] = setting((0, 3), "channel indices of the AnoFPDM statistics")
    eval_respacing: str = setting("", "timestep respacing of the AnoFPDM evaluation (empty: the training "
                                  "chain)")
    eval_batch: int = setting(32, "evaluation batch size", changes=())
    eval_seed: int = setting(0, "seed of the evaluation noise (per slice: seed, split, index)")
    eval_ema: bool = setting(False, "evaluate the EMA weights of the first --ema_rate (default: the model)")
    loss_draws: int = setting(4, "(t, noise) pairs per slice of the denoising loss")
    cond_steps: int = setting(10, "evenly spaced t of the training chain for the conditioning strength")
    selection_tolerance: float = setting(0.99, "several --eval_w: largest w whose validation accuracy >= "
                                         "this * best")
    curves_dir: str = setting("", "output folder of curves.json / curves.png (default LOG_DIR/curves)",
                              changes=())

    def validate(self) -> None:
        require(self.eval_every >= 1, f"--eval_every must be >= 1 training steps, got {self.eval_every}")
        require(self.eval_slices >= 1, f"--eval_slices must be >= 1, got {self.eval_slices}")
        require(len(self.eval_w) >= 1,
                "--eval_w is required: one or more guidance strengths, e.g. --eval_w 2")
        for w in self.eval_w:
            require_finite("eval_w", w, 0.0)
        require(len(set(self.eval_w)) == len(self.eval_w),
                f"--eval_w has repeated values {list(self.eval_w)}")
        require(self.forward_steps >= 1, f"--forward_steps must be >= 1, got {self.forward_steps}")
        require(len(self.modality) >= 1 and min(self.modality) >= 0,
                f"--modality needs channel indices >= 0, got {list(self.modality)}")
        require(len(set(self.modality)) == len(self.modality),
                f"--modality has repeated channel indices {list(self.modality)}")
        require(self.eval_seed >= 0, f"--eval_seed must be >= 0, got {self.eval_seed}")
        require(self.eval_batch >= 1, f"--eval_batch must be >= 1, got {self.eval_batch}")
        require(self.loss_draws >= 1, f"--loss_draws must be >= 1, got {self.loss_draws}")
        require(self.cond_steps >= 1, f"--cond_steps must be >= 1, got {self.cond_steps}")
        require_finite("selection_tolerance", self.selection_tolerance)
        require(0.0 < self.selection_tolerance <= 1.0,
                f"--selection_tolerance must be in (0, 1], got {self.selection_tolerance}")


# ---------------------------------------------------------------------------------------------- settings
