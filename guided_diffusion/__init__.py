"""hae-fpdm: classifier-free-guided diffusion (FPDM and HAE UNets) for weakly supervised
anomaly segmentation of brain MRI with the AnoFPDM method."""

__version__ = "0.1.0"
