"""Models: a DDPM on MONAI and a StyleGAN2 in plain PyTorch, trained and sampled through one interface.

``train(model_name, imageset, config, run_dir, steps=...)`` writes resumable checkpoints;
``sample(run_dir, n, seed=..., checkpoint=...)`` returns a uint8 ImageSet shaped like the training data.
"""

from memstudy.models.configs import CONFIGS, DDPMConfig, StyleGANConfig, TrainingConfig, resolve_config
from memstudy.models.training import (
    TrainResult,
    find_checkpoint,
    list_checkpoints,
    read_log,
    read_params,
    sample,
    to_model_range,
    to_uint8,
    train,
)

__all__ = [
    "CONFIGS",
    "DDPMConfig",
    "StyleGANConfig",
    "TrainResult",
    "TrainingConfig",
    "find_checkpoint",
    "list_checkpoints",
    "read_log",
    "read_params",
    "resolve_config",
    "sample",
    "to_model_range",
    "to_uint8",
    "train",
]
