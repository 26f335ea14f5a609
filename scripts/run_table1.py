#!/usr/bin/env python
"""Table 1 of the paper: AnoFPDM against AnoDDPM (G/S), DDIM + classifier / classifier-free guidance and
the FLAIR-intensity baseline, mean ± std over 3 evaluation seeds.

Thin entry point over guided_diffusion.experiments.table1 (see its docstring for presets and outputs).
Example: python scripts/run_table1.py --preset demo --out runs/table1_demo
"""

import sys

from guided_diffusion.cli import run_cli
from guided_diffusion.experiments.table1 import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
