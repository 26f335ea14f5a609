"""Train a (classifier-free guided) diffusion model: ``guided_diffusion.training.run`` from the command line.

Example: python scripts/train.py --data_dir DATA --log_dir runs/x --image_size 64 --max_steps 1000
"""

import sys

from guided_diffusion.cli import run_cli
from guided_diffusion.training.run import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
