"""The main job's recipe on the embedded synthetic data (README, "Learning curves and the recipe"): the one
place its numbers live. ``scripts/run_main_job.py`` takes its defaults from here, and the denoiser
comparison's ``recipe`` preset (guided_diffusion/experiments/denoiser_comparison.py) is built from it, so
the two cannot drift apart.
"""

from __future__ import annotations

from typing import Any

RECIPE_STEPS = 7000  # the shipped model's (models/hae_v2_synth32) training steps

# synthetic data (scripts/make_synthetic_brats.py)
RECIPE_DATA: dict[str, Any] = dict(subjects=20, image_size=32, slice_step=2)

# network and diffusion (train.py and translation_FPDM.py share them); the network itself is --unet_ver
RECIPE_MODEL: dict[str, Any] = dict(
    image_size=RECIPE_DATA["image_size"], in_channels=4, num_classes=2, num_channels=16, channel_mult="1,2,2",
    attention_resolutions="16,8", num_heads=4, dropout=0.0, diffusion_steps=1000, noise_schedule="linear",
)

# optimisation (train.py; label_dropout is its --threshold)
RECIPE_TRAIN: dict[str, Any] = dict(train_steps=RECIPE_STEPS, batch_size=16, lr=5e-4, ema_rate="0.995",
                                    label_dropout=0.2)

# AnoFPDM evaluation (translation_FPDM.py): 30 forward steps of a 50-step chain = the paper's 600 of 1000.
# The w grid runs past the largest w of best validation accuracy (30 for the shipped model; 40 and 60 lose
# accuracy), so the paper's rule (largest w within 99 % of the best) is not cut off by the grid's end.
RECIPE_EVAL: dict[str, Any] = dict(timestep_respacing="50", forward_steps=30,
                                   w=(3.0, 6.0, 10.0, 15.0, 20.0, 30.0, 40.0, 60.0))
