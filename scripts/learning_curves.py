"""Learning curves of an AnoFPDM model: train with scripts/train.py's flags and evaluate every K steps
(``guided_diffusion.experiments.learning_curves``).

Example: python scripts/learning_curves.py --data_dir DATA --log_dir runs/lc --image_size 64 --max_steps 20000
    --eval_every 2000 --eval_slices 64 --eval_w 1 2 3 --forward_steps 30 --eval_respacing 50
"""

import sys

from guided_diffusion.cli import run_cli
from guided_diffusion.experiments.learning_curves import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
