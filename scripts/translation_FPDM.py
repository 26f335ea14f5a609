"""AnoFPDM evaluation: calibrate on the validation split, segment the test split, write metrics/reports.

Thin entry point; the logic lives in ``guided_diffusion.anofpdm.translation`` (see its module docstring and
``--help``). Bad input ends with one ``error: ...`` line and exit status 2 (``--debug``: traceback).
Example:
    python scripts/translation_FPDM.py --data_dir DATA --model_dir LOGS/model --log_dir OUT --w 2 \
        --image_size 128 --in_channels 4 --num_channels 128 --attention_resolutions 32,16,8 --ema True
Re-run a finished run from its record: ``--config OUT/config.json`` (flags given override single values).
"""

import sys

from guided_diffusion.anofpdm.translation import main
from guided_diffusion.cli import run_cli

if __name__ == "__main__":
    sys.exit(run_cli(main))
