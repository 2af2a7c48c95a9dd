"""DDPM in pixel space on MONAI: ``DiffusionModelUNet`` (2D or 3D), linear β schedule, ε-prediction.

Training noises an image to a uniformly drawn step t and regresses the added noise (Ho et al. 2020);
sampling, from the EMA weights, runs the ancestral chain (all T steps: the paper's choice; or respaced to
fewer) or DDIM with η, written out here rather than taken from MONAI's schedulers.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDPMScheduler
from torch import nn
from tqdm.auto import tqdm

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


def ddpm_loss(net: nn.Module, scheduler: DDPMScheduler, x0: torch.Tensor) -> torch.Tensor:
    """Return the ε-prediction MSE for a batch ``x0`` in [-1, 1], with t and ε from the global RNG."""
    t = torch.randint(0, scheduler.num_train_timesteps, (x0.shape[0],), device=x0.device)
    noise = torch.randn_like(x0)
    xt = scheduler.add_noise(x0, noise, t)
    return F.mse_loss(net(xt, timesteps=t).float(), noise)


SAMPLERS = ("ancestral", "ddim")


def alphas_cumprod(config: DDPMConfig) -> np.ndarray:
    """ᾱ_t for t = 0 … T − 1 (float64), from the linear β schedule that training uses."""
    betas = np.linspace(config.beta_start, config.beta_end, config.num_train_timesteps, dtype=np.float64)
    return np.cumprod(1.0 - betas)


def sampling_timesteps(num_train_timesteps: int, steps: int | None = None) -> np.ndarray:
    """The training timesteps a sampler visits, decreasing from T − 1 to 0.

    ``steps`` None (or T) keeps all T; fewer keeps ``steps`` evenly spaced ones, rounded, always
    including T − 1 (where sampling starts from pure noise) and 0 (guided-diffusion's
    ``space_timesteps``). One step keeps T − 1 only.
    """
    total = num_train_timesteps
    steps = total if steps is None else steps
    if not 1 <= steps <= total:
        raise ValueError(f"sampling steps must be in 1..{total} (num_train_timesteps) or None, got {steps}")
    if steps == 1:
        return np.array([total - 1])
    return np.round(np.linspace(total - 1, 0, steps)).astype(np.int64)


def sampler_name(sampler: str, steps: int, eta: float = 0.0) -> str:
    """A sample set's sampler, for the record: ``"ancestral-1000"``, ``"ddim-50-eta0"``."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown DDPM sampler {sampler!r}; expected one of {SAMPLERS}")
    return f"ancestral-{steps}" if sampler == "ancestral" else f"ddim-{steps}-eta{eta:g}"


def _normal(generators: list[torch.Generator], shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """One standard normal draw of ``shape`` per image from that image's CPU generator, on ``device``."""
    return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)


@torch.no_grad()
def generate(
    net: nn.Module,
    config: DDPMConfig,
    image_shape: tuple[int, ...],
    generators: list[torch.Generator],
    *,
    sampler: str = "ancestral",
    steps: int | None = None,
    eta: float = 0.0,
    device: torch.device,
    amp: bool = False,
    bar: tqdm | None = None,
) -> torch.Tensor:
    """Draw one image per generator, float32 in [-1, 1], shape ``(len(generators), *image_shape)``.

    Parameters
    ----------
    net : nn.Module
        The ε-predicting U-Net, called as ``net(x, timesteps=t)``.
    config : DDPMConfig
        The run's config (its β schedule, T and ancestral variance).
    image_shape : tuple of int
        ``(C, H, W)`` or ``(C, D, H, W)``.
    generators : list of torch.Generator
        CPU generators, one per image: image i's initial noise and every step's noise come from
        ``generators[i]`` only, so an image does not depend on the batch it is drawn in or the device.
    sampler : {"ancestral", "ddim"}
        ``"ancestral"``: the DDPM posterior chain (Ho et al. 2020), over all T steps or, with fewer
        ``steps``, over the respaced chain whose βs are recomputed from ᾱ at the kept steps (Nichol &
        Dhariwal 2021). ``"ddim"``: Song et al.'s update with noise scale ``eta`` (0: deterministic).
    steps : int or None
        Number of network evaluations; None = T. See :func:`sampling_timesteps`.
    eta : float
        DDIM's η; 1 gives the ancestral chain's (``fixed_small``) variance.
    device : torch.device
    amp : bool
        Run the network under bf16 autocast (CUDA).
    bar : tqdm, optional
        Advanced by one per denoising step.

    Notes
    -----
    Each step predicts x̂₀ = (x_t − √(1 − ᾱ_t) ε̂) / √ᾱ_t and clips it to [-1, 1], as guided-diffusion
    does; DDIM then re-derives ε from the clipped x̂₀. MONAI's ``DDIMScheduler`` (used here before)
    kept the network's unclipped ε beside the clipped x̂₀: wherever x̂₀ clips (the -1 background of a
    brain slice, at every noisy step) each step injects the part of ε that the clip removed, an error
    that does not shrink with the step size, so more DDIM steps gave noisier samples (250 steps worse
    than 50). Its grid also started at ``T − T // steps`` instead of T − 1.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown DDPM sampler {sampler!r}; expected one of {SAMPLERS}")
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"DDIM eta must be in [0, 1], got {eta}")
    timesteps = sampling_timesteps(config.num_train_timesteps, steps)
    ab = alphas_cumprod(config)[timesteps]
    ab_prev = np.append(ab[1:], 1.0)  # the last step goes to x_0 itself (ᾱ = 1)
    n = len(generators)
    x = _normal(generators, image_shape, device)
    for k, t in enumerate(timesteps.tolist()):
        a, a_prev = float(ab[k]), float(ab_prev[k])
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            eps = net(x, timesteps=torch.full((n,), t, device=device, dtype=torch.long)).float()
        x0 = ((x - math.sqrt(1.0 - a) * eps) / math.sqrt(a)).clamp(-1.0, 1.0)
        beta = 1.0 - a / a_prev  # the (respaced) chain's β for this step
        if sampler == "ancestral":
            # Mean and variance of q(x_prev | x_t, x̂₀) (Ho et al. eqs. 6–7).
            mean = (math.sqrt(a_prev) * beta / (1.0 - a)) * x0 + (
                math.sqrt(1.0 - beta) * (1.0 - a_prev) / (1.0 - a)
            ) * x
            variance = beta * (1.0 - a_prev) / (1.0 - a) if config.variance_type == "fixed_small" else beta
        else:
            # Song et al. eq. 12 with σ² = η² β̃.
            variance = eta**2 * beta * (1.0 - a_prev) / (1.0 - a)
            eps = (x - math.sqrt(a) * x0) / math.sqrt(1.0 - a)
            mean = math.sqrt(a_prev) * x0 + math.sqrt(1.0 - a_prev - variance) * eps
        last = k == len(timesteps) - 1
        x = (
            mean
            if last or variance == 0
            else mean + math.sqrt(variance) * _normal(generators, image_shape, device)
        )
        if bar is not None:
            bar.update(1)
    return x


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
