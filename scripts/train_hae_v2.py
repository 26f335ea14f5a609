"""Train the HAE UNet V2: ``scripts/train.py`` with ``--unet_ver hae_v2`` fixed (another value is refused).

Takes every flag of ``scripts/train.py``; ``--use_hae`` and ``--bottleneck_ratio`` (in (0, 1],
default 0.25) come from the command line. Before training it prints the HAE settings and the
parameter count of the network the flags describe (counted on the meta device, no memory used).
"""

import sys

from guided_diffusion.cli import run_cli
from guided_diffusion.training.run import main_hae_v2

if __name__ == "__main__":
    sys.exit(run_cli(main_hae_v2))
