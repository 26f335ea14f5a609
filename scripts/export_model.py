"""Export a training run as a shareable model folder (issue 12).

Writes to ``--out``: model.safetensors (EMA weights by default), config.json (the run's saved model and
diffusion config), calibration.json (from RUN_DIR or ``--calibration``, when present) and a README.md
model card (with the metrics of ``--metrics METRICS_JSON`` when given). Load it with
``guided_diffusion.export.export.load_pretrained(DIR)``. ``--out`` must be new or empty (``--overwrite``
replaces an
earlier export there, as a whole); ``--metrics`` and ``--calibration`` must come from the exported weights
(the sha256 they record). What is checked, and how a bad value ends: docs/edges.md.

Example:
    python scripts/export_model.py LOGS/run1 --out exports/run1 --metrics EVAL/metrics.json
"""

import sys

from guided_diffusion.cli import run_cli
from guided_diffusion.export.export import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
