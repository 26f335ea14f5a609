"""Shareable models: a training run exported as safetensors + config + calibration + model card
(export), and an export read back as the model of an evaluation (export_load).

May import: training, reporting and everything below (never anofpdm, baselines or experiments).

The layers are checked by ``lint-imports`` (pyproject.toml; docs/architecture.md).
"""
