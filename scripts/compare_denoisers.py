#!/usr/bin/env python
"""Denoiser comparison: v2, hae, hae_lite, hae_v2 trained alike, segmented with AnoFPDM label-free.

Thin entry point over guided_diffusion.experiments.denoiser_comparison (see its docstring for presets and
outputs).
Example: python scripts/compare_denoisers.py --preset demo --out runs/compare_denoisers_demo
"""

import sys

from guided_diffusion.cli import run_cli
from guided_diffusion.experiments.denoiser_comparison import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
