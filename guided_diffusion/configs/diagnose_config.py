"""The typed config of the block diagnosis (``scripts/diagnose_blocks.py``): which run and checkpoints, the
validation batch (slices, seed), the timesteps of the fusion-output ratios and the weights (model or EMA)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from guided_diffusion.configs.base import Config, require, setting


@dataclasses.dataclass(frozen=True)
class DiagnoseConfig(Config):
    """The flags of scripts/diagnose_blocks.py (docs/hae.md, 'Diagnosing a collapse')."""

    SECTION: ClassVar[str] = "diagnose"

    model_dir: str = setting("", "the training log dir (run_config.json and its checkpoints)", changes=())
    data_dir: str = setting("", "preprocessed data root; the batch is drawn from its validation split",
                            changes=())
    out: str = setting("", "output folder of diagnosis.json / diagnosis.png", changes=())
    steps: tuple[int, ...] = setting((), "checkpoint steps to measure (default: every step found)",
                                     changes=())
    slices: int = setting(16, "validation slices in the fixed batch (half unhealthy when the split allows)")
    seed: int = setting(0, "seed of the slice choice, the noise and the timesteps of the gradient")
    ema: bool = setting(False, "measure the EMA weights of the run's first --ema_rate (default: the model)")
    timesteps: tuple[int, ...] = setting((100, 300, 600), "timesteps of the fusion-output ratios (of the "
                                         "run's training chain)")

    def validate(self) -> None:
        require(bool(self.model_dir), "--model_dir is required: the training log dir to diagnose")
        require(bool(self.data_dir), "--data_dir is required: the data the run was trained on")
        require(bool(self.out), "--out is required: the folder for diagnosis.json and diagnosis.png")
        require(self.slices >= 1, f"--slices must be >= 1, got {self.slices}")
        require(self.seed >= 0, f"--seed must be >= 0, got {self.seed}")
        require(len(self.timesteps) >= 1 and min(self.timesteps) >= 0,
                f"--timesteps needs one or more steps >= 0, got {list(self.timesteps)}")
        require(len(set(self.timesteps)) == len(self.timesteps),
                f"--timesteps has repeated values {list(self.timesteps)}")
        require(all(s >= 0 for s in self.steps), f"--steps must be >= 0, got {list(self.steps)}")
        require(len(set(self.steps)) == len(self.steps), f"--steps has repeated values {list(self.steps)}")
