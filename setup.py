"""Install the hae-fpdm package (`guided_diffusion`)."""

from setuptools import find_packages, setup

setup(
    name="hae-fpdm",
    version="0.1.0",
    description=(
        "Classifier-free-guided diffusion (FPDM and HAE UNets) for weakly supervised "
        "brain-MRI anomaly segmentation with AnoFPDM"
    ),
    packages=find_packages(include=["guided_diffusion", "guided_diffusion.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.1",
        "numpy>=1.24",
        "scipy>=1.10",
        "nibabel>=5.0",
        "nilearn>=0.10",
        "blobfile>=2.0",
        "tqdm>=4.60",
        "scikit-learn>=1.2",
        "scikit-image>=0.21",
        "matplotlib>=3.6",
        "monai>=1.4",
        "safetensors>=0.4",
    ],
    extras_require={
        # mpi4py is imported only when the process was started by mpiexec.
        "mpi": ["mpi4py>=3.1", "mpich"],
        # TensorBoard events during training (guided_diffusion.reporting.training_plots.ScalarWriter)
        "tensorboard": ["tensorboard>=2.10"],
        "test": ["pytest>=7", "ruff>=0.4", "mpi4py>=3.1", "mpich"],
    },
)
