"""The method: the forward process with its divergence statistics (forward), gradient SAM, the
segmentation, the calibration from image-level labels, and the evaluation pipeline built on them
(translation: runtime, outputs, resume, flags) with its plots (anofpdm_plots).

May import: export, training, reporting and everything below; never baselines or experiments.

The layers are checked by ``lint-imports`` (pyproject.toml; docs/architecture.md).
"""
