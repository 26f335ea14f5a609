"""Typed, frozen, self-validating configs, each setting defined once: model and diffusion (base), the
evaluation (eval_configs), training (train_config), the learning curves (curves_config), the block diagnosis
(diagnose_config), the calibration record and its file (calibration), and the flag generator that turns a
config class into argparse flags (config_flags).

May import: guided_diffusion.cli, guided_diffusion.registry, utils.

The layers are checked by ``lint-imports`` (pyproject.toml; docs/architecture.md).
"""
