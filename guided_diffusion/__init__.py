"""hae-fpdm: classifier-free-guided diffusion (FPDM and HAE UNets) for weakly supervised
anomaly segmentation of brain MRI with the AnoFPDM method.

At the top of the package, as in guided-diffusion: the networks (nn, unet, unet_v1, hae_blocks,
unet_hae*, the registry and the list of variants), the diffusion core (gaussian_diffusion, respace,
resample, guidance, simplex), the factory (script_util) and the command-line helpers (cli). The
subpackages hold the layers above and below them (docs/architecture.md).
"""

__version__ = "0.1.0"
