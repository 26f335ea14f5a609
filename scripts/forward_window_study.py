"""Where M_t peaks (chain and forward window) and how many validation slices the calibration needs
(``guided_diffusion.experiments.forward_window``; docs/method.md, 'Where M_t peaks: the forward window').

Example: python scripts/forward_window_study.py --model_dir models/hae_v2_synth32 --data_dir DATA
    --out runs/window_study [--respacings 25 50 100] [--w 3 6 10 15 20] [--val_sizes 4 8 12 18 24 36]
    [--draws 20] [--seed 0] [--overwrite]
"""

import sys

from guided_diffusion.cli import run_cli
from guided_diffusion.experiments.forward_window import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
