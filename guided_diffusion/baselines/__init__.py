"""Table 1's comparison methods (AnoDDPM, DDIM with classifier or classifier-free guidance), the
noise-aware classifier and its training, and the runner of one method row (table1_methods).

May import: export, training, reporting and everything below; never anofpdm or experiments.

The layers are checked by ``lint-imports`` (pyproject.toml; docs/architecture.md).
"""
