"""AnoFPDM evaluation of an HAE-v2 checkpoint: ``translation_FPDM.py`` with ``--unet_ver hae_v2`` and
``--use_hae True`` forced (the fork's script of this name could not run;
docs/method.md, 'Fork HAE scripts and attention'); a contradicting ``--unet_ver`` / ``--use_hae`` is
refused."""

import sys

from guided_diffusion.anofpdm.translation import main
from guided_diffusion.cli import run_cli

HAE_V2_OVERRIDES = {"unet_ver": "hae_v2", "use_hae": True}


def run(argv=None):
    """Same flags as translation_FPDM.py; unet_ver/use_hae are forced to the HAE-v2 values."""
    return main(argv, overrides=HAE_V2_OVERRIDES)


if __name__ == "__main__":
    sys.exit(run_cli(run))
