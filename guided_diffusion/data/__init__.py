"""Brain MRI slice data: preprocessing, synthetic BraTS-like data, datasets and loaders."""

from guided_diffusion.data.brats import (
    BrainDataset,
    ShardSampler,
    get_eval_loader,
    get_train_loader,
    process_slice,
    world_info,
)

__all__ = [
    "BrainDataset",
    "ShardSampler",
    "get_eval_loader",
    "get_train_loader",
    "process_slice",
    "world_info",
]
