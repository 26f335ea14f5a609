"""Learning curves over training seeds: mean ± std per group and step, table and figure with bands
(``guided_diffusion.experiments.curves_summary``).

Example: python scripts/summarise_curves.py --group v2=runs/lc_v2_s0,runs/lc_v2_s1,runs/lc_v2_s2 \
    --group hae_v2=runs/lc_hae_v2_s0,runs/lc_hae_v2_s1,runs/lc_hae_v2_s2 --out runs/curves_over_seeds
Or a folder of runs named <label>_s<seed>:
    python scripts/summarise_curves.py --runs docs/results/curves/32px --out runs/ablations --step 4000
"""

import sys

from guided_diffusion.cli import run_cli
from guided_diffusion.experiments.curves_summary import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
