"""Brain MRI slices: NIfTI preprocessing, the embedded synthetic BraTS-like dataset, datasets and
loaders, the data fingerprint, the FLAIR-threshold baseline and the evaluation read-ahead.

May import: metrics, configs, cli, utils.

The layers are checked by ``lint-imports`` (pyproject.toml; docs/architecture.md).
"""
