"""Models: a DDPM on MONAI and a StyleGAN2 in plain PyTorch, trained and sampled through one interface.

``train(model_name, imageset, config, run_dir, steps=...)`` writes resumable checkpoints;
``sample(run_dir, n, seed=..., checkpoint=...)`` returns a uint8 ImageSet shaped like the training data.

The names below are imported on first use: importing torch and MONAI takes seconds, and
``memstudy --help`` should not pay for it.
"""

import importlib

_EXPORTS = {
    "memstudy.models.configs": (
        "CONFIGS",
        "DDPMConfig",
        "StyleGANConfig",
        "TrainingConfig",
        "resolve_config",
    ),
    "memstudy.models.runs": ("find_checkpoint", "list_checkpoints", "read_log", "read_params"),
    "memstudy.models.sampling": ("load_sampling_network", "sample"),
    "memstudy.models.training": ("TrainResult", "to_model_range", "to_uint8", "train"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'memstudy.models' has no attribute {name!r}")
    return getattr(importlib.import_module(_MODULE_OF[name]), name)
