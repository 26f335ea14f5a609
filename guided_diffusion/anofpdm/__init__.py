"""The method: the forward process with its divergence statistics (forward), gradient SAM, the
segmentation, the calibration from image-level labels, the pipeline that turns a batch into maps, masks
and labels (pipeline.AnoFPDMPipeline), and the evaluation run built on it (translation: runtime, outputs,
resume, flags) with its plots (anofpdm_plots).

May import: export, training, reporting and everything below; never baselines or experiments.

The layers are checked by ``lint-imports`` (pyproject.toml; docs/architecture.md).
"""
