"""DDPM in pixel space on MONAI: ``DiffusionModelUNet`` (2D or 3D), linear β schedule, ε-prediction.

Training noises an image to a uniformly drawn step t and regresses the added noise (Ho et al. 2020);
sampling runs the full ancestral chain (the paper's choice) or DDIM with fewer steps, from the EMA
weights.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from torch import nn

from memstudy.models.configs import DDPMConfig
from memstudy.models.distributed import DistInfo, wrap_ddp


def check_ddpm_shape(config: DDPMConfig, image_shape: tuple[int, ...]) -> None:
    """Raise ValueError unless images of ``image_shape`` (C, *spatial) fit ``config``."""
    spatial = image_shape[1:]
    if len(spatial) not in (2, 3):
        raise ValueError(f"DDPM takes 2D or 3D images (C, H, W) or (C, D, H, W), got shape {image_shape}")
    bad = [s for s in spatial if s % config.size_multiple]
    if bad:
        raise ValueError(
            f"image size {tuple(spatial)} does not fit the {config.name!r} U-Net: with "
            f"{len(config.channel_mult)} levels every size must be a multiple of {config.size_multiple}"
        )


def build_unet(config: DDPMConfig, image_shape: tuple[int, ...]) -> DiffusionModelUNet:
    """Return the MONAI U-Net for images of shape ``(C, H, W)`` or ``(C, D, H, W)``."""
    check_ddpm_shape(config, image_shape)
    channels, size = image_shape[0], min(image_shape[1:])
    # Levels are numbered from full resolution; attention goes where the feature map has the listed size.
    attention = tuple(
        size // 2**level in config.attention_resolutions for level in range(len(config.channel_mult))
    )
    return DiffusionModelUNet(
        spatial_dims=len(image_shape) - 1,
        in_channels=channels,
        out_channels=channels,
        channels=config.level_channels,
        num_res_blocks=config.num_res_blocks,
        attention_levels=attention,
        norm_num_groups=config.norm_num_groups,
        # MONAI's middle block always has attention; a head never spans more than a level's channels.
        num_head_channels=tuple(math.gcd(c, config.num_head_channels) for c in config.level_channels),
        use_flash_attention=True,  # torch's scaled_dot_product_attention; same weights either way
    )


def make_scheduler(config: DDPMConfig) -> DDPMScheduler:
    """Return MONAI's DDPM scheduler with the config's linear β schedule and ε-prediction."""
    return DDPMScheduler(
        num_train_timesteps=config.num_train_timesteps,
        schedule="linear_beta",
        beta_start=config.beta_start,
        beta_end=config.beta_end,
        variance_type=config.variance_type,
        prediction_type="epsilon",
        clip_sample=True,
    )


def make_ddim_scheduler(config: DDPMConfig, steps: int) -> DDIMScheduler:
    """Return MONAI's DDIM scheduler (η = 0) set to ``steps`` evenly spaced steps."""
    ddim = DDIMScheduler(
        num_train_timesteps=config.num_train_timesteps,
        schedule="linear_beta",
        beta_start=config.beta_start,
        beta_end=config.beta_end,
        prediction_type="epsilon",
        clip_sample=True,
    )
    ddim.set_timesteps(steps)
    # MONAI's step() looks back by T // steps; place the steps on that grid so each step lands on the next.
    ddim.timesteps = torch.arange(steps - 1, -1, -1) * (config.num_train_timesteps // steps)
    return ddim


def ddpm_loss(net: nn.Module, scheduler: DDPMScheduler, x0: torch.Tensor) -> torch.Tensor:
    """Return the ε-prediction MSE for a batch ``x0`` in [-1, 1], with t and ε from the global RNG."""
    t = torch.randint(0, scheduler.num_train_timesteps, (x0.shape[0],), device=x0.device)
    noise = torch.randn_like(x0)
    xt = scheduler.add_noise(x0, noise, t)
    return F.mse_loss(net(xt, timesteps=t).float(), noise)


@torch.no_grad()
def generate(
    net: nn.Module,
    config: DDPMConfig,
    n: int,
    image_shape: tuple[int, ...],
    *,
    steps: int | None,
    device: torch.device,
    amp: bool = False,
) -> torch.Tensor:
    """Draw ``n`` images in [-1, 1] (float32, ``(n, *image_shape)``) using the global RNG.

    ``steps`` None or equal to ``num_train_timesteps`` runs the full ancestral DDPM chain; fewer runs
    DDIM with η = 0. ``amp`` runs the network under bf16 autocast (CUDA).
    """
    if steps is None or steps == config.num_train_timesteps:
        scheduler = make_scheduler(config)
    else:
        if not 1 <= steps < config.num_train_timesteps:
            raise ValueError(f"steps must be in 1..{config.num_train_timesteps} or None, got {steps}")
        scheduler = make_ddim_scheduler(config, steps)
    x = torch.randn((n, *image_shape), device=device)
    for t in scheduler.timesteps.tolist():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            eps = net(x, timesteps=torch.full((n,), t, device=device, dtype=torch.long)).float()
        x, _ = scheduler.step(eps, t, x)
    return x.clamp(-1, 1)


class DDPMTrainer:
    """The U-Net, its EMA, the Adam optimizer and one training step.

    Parameters
    ----------
    config : DDPMConfig
    image_shape : tuple of int
        ``(C, H, W)`` or ``(C, D, H, W)``.
    device : torch.device
    dist : DistInfo
        Under torchrun the U-Net is wrapped in ``DistributedDataParallel``.
    """

    def __init__(
        self, config: DDPMConfig, image_shape: tuple[int, ...], device: torch.device, dist: DistInfo
    ):
        self.config, self.device = config, device
        self.net = build_unet(config, image_shape).to(device)
        self.ema = copy.deepcopy(self.net).requires_grad_(False).eval()
        self.train_net = wrap_ddp(self.net, dist)
        # foreach: one kernel per operation over all tensors (on CPU the default is a Python loop over them).
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=config.lr, foreach=True)
        self.scheduler = make_scheduler(config)
        self.amp = config.amp and device.type == "cuda"

    def train_step(self, x: torch.Tensor, step: int) -> dict[str, float]:
        """Take one optimizer step on the batch ``x`` (float in [-1, 1]); return the losses."""
        self.net.train()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            loss = ddpm_loss(self.train_net, self.scheduler, x)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.net.parameters(), self.config.grad_clip)
        self.optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(
                list(self.ema.parameters()), list(self.net.parameters()), 1.0 - self.config.ema_decay
            )
        return {"loss": loss.item()}

    def state_dict(self) -> dict:
        """Weights, EMA weights and optimizer state (tensors and plain values only)."""
        return {
            "net": self.net.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.net.load_state_dict(state["net"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])

    def sampling_network(self) -> nn.Module:
        """The EMA network, which sampling uses."""
        return self.ema
