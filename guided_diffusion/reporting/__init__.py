"""Files a person reads: metrics JSON/CSV/HTML panels (report), run summaries, figures (plots,
training_plots) and training previews.

May import: guided_diffusion.script_util and the networks / diffusion core, data, metrics, configs, cli,
utils.

The layers are checked by ``lint-imports`` (pyproject.toml; docs/architecture.md).
"""
