"""Model configurations: plain frozen dataclasses, a ``tiny`` one for the CPU demo beside the paper's.

A configuration is chosen by name (``"tiny"``, ``"paper"``) or given as a dataclass, and any field can
be overridden by keyword, e.g. ``resolve_config("ddpm", "tiny", base_channels=64)``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import types
import typing
from dataclasses import dataclass
from typing import Any

# Field metadata of settings that change bookkeeping, not the weights (a resumed run may change them).
_BOOKKEEPING = {"bookkeeping": True}


@dataclass(frozen=True)
class TrainingConfig:
    """Fields every model shares: batch, augmentation, bookkeeping and precision.

    Fields marked ``metadata={"bookkeeping": True}`` change what a run records, not its weights: a
    resumed run may change them (:func:`memstudy.models.runs.bookkeeping_fields`).

    Attributes
    ----------
    name : str
        The configuration this one was derived from (``"tiny"``, ``"paper"``), for the record.
    image_size : int or None
        Expected spatial size of the training images (every spatial axis); None takes the data's.
    image_channels : int or None
        Expected number of image channels; None takes the data's.
    batch_size : int
        Global batch over all processes; each of ``world_size`` processes gets an equal share.
    mirror : bool
        Flip each training image horizontally (last axis) with probability 1/2 at every step, as
        NVlabs' ``--mirror=1``; the flips are drawn from (seed, step) over the global batch.
    checkpoint_every : int
        Write a resumable checkpoint every this many steps (and always at the end).
    keep_checkpoints : tuple of int
        Steps whose checkpoints are kept for later sampling; other checkpoints are deleted once a newer
        one exists.
    log_every : int
        Losses are averaged over this many steps per record in ``log.json``.
    amp : bool
        bf16 autocast on CUDA; ignored on CPU, where training is float32 and deterministic.
    """

    name: str = dataclasses.field(default="custom", metadata=_BOOKKEEPING)
    image_size: int | None = None
    image_channels: int | None = None
    batch_size: int = 32
    mirror: bool = False
    checkpoint_every: int = dataclasses.field(default=1000, metadata=_BOOKKEEPING)
    keep_checkpoints: tuple[int, ...] = dataclasses.field(default=(), metadata=_BOOKKEEPING)
    log_every: int = dataclasses.field(default=1, metadata=_BOOKKEEPING)
    amp: bool = dataclasses.field(default=True, metadata=_BOOKKEEPING)

    def __post_init__(self) -> None:
        check_field_types(self)
        for field in ("batch_size", "checkpoint_every", "log_every"):
            if getattr(self, field) < 1:
                raise ValueError(f"{type(self).__name__}.{field} must be >= 1, got {getattr(self, field)}")
        if any(step < 1 for step in self.keep_checkpoints):
            raise ValueError(f"keep_checkpoints must be positive steps, got {self.keep_checkpoints}")


@dataclass(frozen=True)
class DDPMConfig(TrainingConfig):
    """A pixel-space DDPM: MONAI ``DiffusionModelUNet``, ε-prediction, linear β schedule, EMA.

    Attributes
    ----------
    base_channels : int
        Channels of the first U-Net level; the model-size knob (levels have ``base * channel_mult``).
    channel_mult : tuple of int
        Channel multiplier per level; the U-Net halves the resolution ``len(channel_mult) - 1`` times.
    num_res_blocks : int
        Residual blocks per level.
    attention_resolutions : tuple of int
        Spatial sizes (pixels) at which levels get self-attention, as guided-diffusion's ``16,8``.
    num_head_channels : int
        Channels per attention head.
    norm_num_groups : int
        Group-norm groups; must divide every level's channels.
    num_train_timesteps : int
        Diffusion steps T.
    beta_start, beta_end : float
        Linear β schedule end points.
    variance_type : str
        Reverse-process variance for ancestral sampling, ``"fixed_small"`` (β̃) or ``"fixed_large"`` (β).
    lr : float
        Adam learning rate (constant).
    grad_clip : float or None
        Gradient-norm clip; None for none.
    ema_decay : float
        Per-step EMA decay of the weights used for sampling.
    sampler : str
        Default sampler: ``"ancestral"`` (the DDPM posterior chain, the paper's) or ``"ddim"``.
    sample_steps : int or None
        Default number of sampling steps: None (or ``num_train_timesteps``) for every step, fewer for a
        respaced chain (evenly spaced steps, βs recomputed from ᾱ, as guided-diffusion's
        ``timestep_respacing``).
    ddim_eta : float
        Default DDIM η in [0, 1]: 0 is deterministic, 1 has the ancestral chain's variance.
    """

    base_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    attention_resolutions: tuple[int, ...] = ()
    num_head_channels: int = 32
    norm_num_groups: int = 8
    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    variance_type: str = "fixed_small"
    lr: float = 1e-3
    grad_clip: float | None = 1.0
    ema_decay: float = 0.995
    sampler: str = dataclasses.field(default="ancestral", metadata=_BOOKKEEPING)
    sample_steps: int | None = dataclasses.field(default=None, metadata=_BOOKKEEPING)
    ddim_eta: float = dataclasses.field(default=0.0, metadata=_BOOKKEEPING)

    def __post_init__(self) -> None:
        super().__post_init__()
        bad_groups = [c for c in self.level_channels if c % self.norm_num_groups]
        if bad_groups:
            raise ValueError(
                f"norm_num_groups={self.norm_num_groups} must divide every level's channels "
                f"{self.level_channels} (base_channels={self.base_channels} × "
                f"channel_mult={self.channel_mult})"
            )
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.variance_type not in ("fixed_small", "fixed_large"):
            raise ValueError(
                f"variance_type must be 'fixed_small' or 'fixed_large', got {self.variance_type!r}"
            )
        if self.sampler not in ("ancestral", "ddim"):
            raise ValueError(f"sampler must be 'ancestral' or 'ddim', got {self.sampler!r}")
        if self.sample_steps is not None and not 1 <= self.sample_steps <= self.num_train_timesteps:
            raise ValueError(
                f"sample_steps must be in 1..{self.num_train_timesteps} or None, got {self.sample_steps}"
            )
        if not 0.0 <= self.ddim_eta <= 1.0:
            raise ValueError(f"ddim_eta must be in [0, 1], got {self.ddim_eta}")

    @property
    def level_channels(self) -> tuple[int, ...]:
        """Channels per U-Net level."""
        return tuple(self.base_channels * m for m in self.channel_mult)

    @property
    def size_multiple(self) -> int:
        """Every spatial size must be a multiple of this (the U-Net's total downsampling)."""
        return 2 ** (len(self.channel_mult) - 1)


@dataclass(frozen=True)
class StyleGANConfig(TrainingConfig):
    """A StyleGAN2 (config F style, skip generator, residual discriminator), as in NVlabs' code.

    Attributes
    ----------
    z_dim, w_dim : int
        Latent and intermediate latent sizes.
    mapping_layers : int
        Depth of the mapping MLP.
    mapping_lr_mul : float
        Learning-rate multiplier of the mapping network (equalized learning rate).
    channel_base, channel_max : int
        Feature maps at resolution r are ``min(channel_base // r, channel_max)`` (NVlabs' rule).
    mbstd_group, mbstd_channels : int
        Minibatch-standard-deviation group size and feature count.
    lr : float
        Adam learning rate of both networks (before the lazy-regularization correction).
    betas : tuple of float
        Adam betas.
    gamma : float
        R1 weight γ (the penalty is ``γ/2 · |∇D(x)|²`` on real images).
    r1_interval : int
        Lazy R1: the penalty is applied every this many steps, scaled by the interval.
    pl_weight : float
        Path-length regularization weight; 0 disables it.
    pl_interval, pl_batch_shrink : int
        Lazy path-length interval and batch-size divisor.
    pl_decay : float
        Decay of the running mean path length.
    style_mixing_prob : float
        Probability of mixing two latents at a random layer during training.
    ema_kimg : float
        Half-life of the generator EMA, in thousands of images.
    truncation_psi : float
        Default truncation ψ at sampling (1 = none).
    """

    z_dim: int = 512
    w_dim: int = 512
    mapping_layers: int = 8
    mapping_lr_mul: float = 0.01
    channel_base: int = 32768
    channel_max: int = 512
    mbstd_group: int = 4
    mbstd_channels: int = 1
    lr: float = 0.002
    betas: tuple[float, float] = (0.0, 0.99)
    gamma: float = 10.0
    r1_interval: int = 16
    pl_weight: float = 2.0
    pl_interval: int = 4
    pl_batch_shrink: int = 2
    pl_decay: float = 0.01
    style_mixing_prob: float = 0.9
    ema_kimg: float = 10.0
    truncation_psi: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.image_size is not None:
            check_power_of_two(self.image_size, "StyleGANConfig.image_size")
        for field in ("r1_interval", "pl_interval", "pl_batch_shrink", "mapping_layers"):
            if getattr(self, field) < 1:
                raise ValueError(f"StyleGANConfig.{field} must be >= 1, got {getattr(self, field)}")

    def channels_at(self, resolution: int) -> int:
        """Feature maps at one resolution."""
        return min(self.channel_base // resolution, self.channel_max)


def check_field_types(config: TrainingConfig) -> None:
    """Raise ValueError naming the first field whose value does not have the field's type.

    A value from the command line (``--set batch_size=abc``) would otherwise fail later, far from
    where it was given. Integers pass for float fields; booleans pass only for bool fields.
    """
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if not _has_type(value, hints[field.name]):
            raise ValueError(
                f"{type(config).__name__}.{field.name} must be {_type_name(hints[field.name])}, got {value!r}"
            )


def _has_type(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, arg) for arg in args)
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_has_type(v, args[0]) for v in value)
        return len(value) == len(args) and all(_has_type(v, a) for v, a in zip(value, args, strict=True))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0])}"
        return f"a list of {len(args)} {_type_name(args[0])}"
    return "None" if hint is type(None) else hint.__name__


def check_power_of_two(size: int, what: str) -> None:
    """Raise ValueError unless ``size`` is a power of two and at least 4."""
    if size < 4 or 2 ** round(math.log2(size)) != size:
        raise ValueError(f"{what} must be a power of two >= 4 (StyleGAN doubles from 4×4), got {size}")


CONFIGS: dict[str, dict[str, TrainingConfig]] = {
    "ddpm": {
        # ~1 M parameters at 32×32: memorizes small sets within a few thousand steps on a 2-core CPU.
        "tiny": DDPMConfig(name="tiny", mirror=False, checkpoint_every=500),
        # The authors' guided-diffusion settings: 256 px, 64 channels, 3 res blocks, attention at 16
        # and 8, 4000 linear steps (guided-diffusion scales the 1000-step β range by 1000/T), lr 1e-4,
        # batch 32, EMA 0.9999, full ancestral sampling. No flips: the authors' data preparation sets
        # useAugmentation = false (guided-diffusion's own loader would flip by default).
        "paper": DDPMConfig(
            name="paper",
            image_size=256,
            mirror=False,
            base_channels=64,
            channel_mult=(1, 1, 2, 2, 4, 4),
            num_res_blocks=3,
            attention_resolutions=(16, 8),
            num_head_channels=64,
            norm_num_groups=32,
            num_train_timesteps=4000,
            beta_start=1e-4 * 1000 / 4000,
            beta_end=0.02 * 1000 / 4000,
            lr=1e-4,
            grad_clip=None,
            ema_decay=0.9999,
            sample_steps=None,
            checkpoint_every=10000,
            log_every=10,
        ),
    },
    "stylegan": {
        # 64/64/32/16 channels at 4..32 px: ~0.12 s/step at batch 32 on 2 CPU cores (`memstudy bench train`).
        "tiny": StyleGANConfig(
            name="tiny",
            z_dim=64,
            w_dim=64,
            mapping_layers=2,
            channel_base=512,
            channel_max=64,
            gamma=0.1,
            pl_weight=0.0,
            ema_kimg=1.0,
            mirror=False,
            checkpoint_every=500,
        ),
        # NVlabs' "stylegan2" configuration at 256 px with the paper's γ = 8, batch 32 and --mirror=1; the
        # length of training (25,000 kimg in the paper) is train()'s ``kimg``.
        "paper": StyleGANConfig(
            name="paper", image_size=256, gamma=8.0, mirror=True, checkpoint_every=5000, log_every=10
        ),
    },
}

MODEL_NAMES = tuple(CONFIGS)
CONFIG_CLASSES: dict[str, type[TrainingConfig]] = {"ddpm": DDPMConfig, "stylegan": StyleGANConfig}


def resolve_config(
    model_name: str, config: str | TrainingConfig | dict = "tiny", **overrides: Any
) -> TrainingConfig:
    """Return the configuration for ``model_name`` with ``overrides`` applied.

    Parameters
    ----------
    model_name : {"ddpm", "stylegan"}
    config : str, dataclass or dict
        A name in :data:`CONFIGS` (``"tiny"``, ``"paper"``), a config dataclass, or a dict of fields
        (as stored in ``params.json``).
    **overrides
        Field values replacing the config's; lists become tuples.

    Returns
    -------
    DDPMConfig or StyleGANConfig
    """
    if model_name not in CONFIGS:
        raise ValueError(f"unknown model {model_name!r}; expected one of {MODEL_NAMES}")
    cls = CONFIG_CLASSES[model_name]
    if isinstance(config, str):
        if config not in CONFIGS[model_name]:
            raise ValueError(
                f"unknown {model_name} config {config!r}; expected one of {tuple(CONFIGS[model_name])}"
            )
        base = CONFIGS[model_name][config]
    elif isinstance(config, dict):
        base = cls(**_coerce(cls, config))
    elif isinstance(config, cls):
        base = config
    else:
        raise TypeError(f"config for {model_name} must be a name, a dict or a {cls.__name__}, got {config!r}")
    return dataclasses.replace(base, **_coerce(cls, overrides)) if overrides else base


def config_to_dict(config: TrainingConfig) -> dict[str, Any]:
    """Return the config as a JSON-serializable dict (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def _coerce(cls: type[TrainingConfig], values: dict[str, Any]) -> dict[str, Any]:
    """Check field names and turn lists into tuples where the field is a tuple."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {unknown}; valid fields: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    out = {}
    for key, value in values.items():
        if isinstance(value, list) and typing.get_origin(hints[key]) is tuple:
            value = tuple(value)
        out[key] = value
    return out
