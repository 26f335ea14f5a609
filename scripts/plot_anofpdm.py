"""Fig. 5 / Fig. 2-style plots of one finished AnoFPDM evaluation (``scripts/translation_FPDM.py`` log dir).

    python scripts/plot_anofpdm.py LOG_DIR [--data_dir D] [--out DIR] [--setting 'w=2,t_e_ratio=1']

writes te_ratio.png, thresholds.png, mse_curves.png and plots.json (default LOG_DIR/plots); the logic is
in ``guided_diffusion.anofpdm.anofpdm_plots``. Bad input ends with one ``error: ...`` line and exit status 2.
"""

import sys

from guided_diffusion.anofpdm.anofpdm_plots import main
from guided_diffusion.cli import run_cli

if __name__ == "__main__":
    sys.exit(run_cli(main))
