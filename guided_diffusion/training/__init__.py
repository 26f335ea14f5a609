"""Training a diffusion model: the run (run: configs -> model, data, loop), its command line
(training_flags), the loop (train_util), RNG state (rng), exact resume (train_resume), checkpoints and
the per-step log (train_logging).

May import: reporting, guided_diffusion.script_util, networks, diffusion core, data, metrics, configs,
cli, utils.

The layers are checked by ``lint-imports`` (pyproject.toml; docs/architecture.md).
"""
