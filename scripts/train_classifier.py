"""Train the noise-aware classifier of the classifier-guided DDIM baseline (Wolleb et al. 2022).

Thin entry point over guided_diffusion.baselines.classifier_training (see its docstring and --help).
"""

import sys

from guided_diffusion.baselines.classifier_training import main
from guided_diffusion.cli import run_cli

if __name__ == "__main__":
    sys.exit(run_cli(main))
