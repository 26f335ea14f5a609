"""Diagnosis of a collapse: per saved checkpoint of a training run, the hybrid blocks' fusion output relative
to the decoder path, their zero-initialised weights and the gradient norm per block
(``guided_diffusion.experiments.block_diagnosis``; docs/hae.md, 'Diagnosing a collapse').

Example: python scripts/diagnose_blocks.py --model_dir runs/curves_hae_v2 --data_dir data32 --out runs/diag
    --slices 16 [--steps 1000 2000] [--seed 0] [--ema True]
"""

import sys

from guided_diffusion.cli import run_cli
from guided_diffusion.experiments.block_diagnosis import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
