"""Plumbing every layer may use: atomic file writes and hashes (io_util), the logger, process groups
(dist_util), autocast / torch.compile / channels_last (precision), the log-dir lock (run_lock) and
device-sized batches (batch_size).

May import: nothing of guided_diffusion (the bottom layer).

The layers are checked by ``lint-imports`` (pyproject.toml; docs/architecture.md).
"""
