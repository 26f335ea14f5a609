"""Runners of whole studies: Table 1, the denoiser comparison, the learning curves, the block diagnosis
(block_diagnosis), their resumable rows (experiments) and the model measurements (measure).

May import: anything in guided_diffusion (the top layer).

The layers are checked by ``lint-imports`` (pyproject.toml; docs/architecture.md).
"""
