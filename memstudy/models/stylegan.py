"""StyleGAN2 in plain PyTorch, after NVlabs' stylegan2-ada-pytorch, without custom CUDA ops.

Generator: mapping MLP (z → w), learned constant 4×4 input, modulated/demodulated 3×3 convolutions with
per-layer noise, skip-style toRGB outputs summed over resolutions, style mixing, truncation.
Discriminator: residual blocks, minibatch standard deviation, 4×4 epilogue. Every weight uses the
equalized learning rate (stored N(0, 1), scaled by 1/√fan_in at run time). Loss: non-saturating
logistic, lazy R1 on real images, optional lazy path-length regularization; the generator's EMA is
what samples. Resampling uses NVlabs' [1, 3, 3, 1] FIR filter. 2D only; any number of channels.
"""

from __future__ import annotations

import copy
import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from memstudy.models.configs import StyleGANConfig, check_power_of_two
from memstudy.models.distributed import DistInfo, all_reduce_mean, average_gradients, broadcast_buffers

_SQRT2 = math.sqrt(2.0)


def check_stylegan_shape(config: StyleGANConfig, image_shape: tuple[int, ...]) -> None:
    """Raise ValueError unless images of ``image_shape`` (C, H, W) fit a StyleGAN2."""
    if len(image_shape) != 3:
        raise ValueError(f"StyleGAN2 here is 2D: images must be (C, H, W), got shape {image_shape}")
    _, h, w = image_shape
    if h != w:
        raise ValueError(f"StyleGAN2 needs square images, got {h}×{w}")
    check_power_of_two(h, "StyleGAN2 image size")


def _lrelu(x: torch.Tensor) -> torch.Tensor:
    # Leaky ReLU with the gain that keeps unit variance (NVlabs' def_gain √2).
    return F.leaky_relu(x, 0.2) * _SQRT2


def _fir_kernel(channels: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    f = torch.tensor([1.0, 3.0, 3.0, 1.0], device=device, dtype=dtype)
    f = torch.outer(f, f) / f.sum() ** 2
    return f.expand(channels, 1, 4, 4)


def upsample2d(x: torch.Tensor) -> torch.Tensor:
    """Double the resolution: zero-insertion followed by the [1, 3, 3, 1] low-pass (DC gain kept)."""
    c = x.shape[1]
    return F.conv_transpose2d(x, _fir_kernel(c, x.device, x.dtype) * 4, stride=2, padding=1, groups=c)


def blur2d(x: torch.Tensor, padding: int) -> torch.Tensor:
    """The [1, 3, 3, 1] low-pass (DC gain 1) at full resolution, after zero-padding every side."""
    c = x.shape[1]
    return F.conv2d(x, _fir_kernel(c, x.device, x.dtype), padding=padding, groups=c)


class EqualLinear(nn.Module):
    """Fully connected layer with equalized learning rate and an optional √2-gained leaky ReLU."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias_init: float = 0.0,
        lr_mul: float = 1.0,
        activation: bool = False,
    ):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_mul)
        self.bias = nn.Parameter(torch.full((out_features,), float(bias_init)))
        self.weight_gain = lr_mul / math.sqrt(in_features)
        self.lr_mul, self.activation = lr_mul, activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.linear(x, self.weight * self.weight_gain, self.bias * self.lr_mul)
        return _lrelu(x) if self.activation else x


class EqualConv2d(nn.Module):
    """Convolution with equalized learning rate, optionally down-sampling ×2, optional leaky ReLU after.

    Down-sampling follows NVlabs' ``conv2d_resample``: blur at full resolution, zero-padded by
    ``k // 2 + 1`` (the layer's padding plus the filter's), then the k×k convolution with stride 2.
    For the 3×3 layers this differs from blurring, subsampling and convolving at half resolution; for
    1×1 it is the same (NVlabs' fast path).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        bias: bool = True,
        activation: bool = True,
        down: bool = False,
    ):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.weight_gain = 1.0 / math.sqrt(in_channels * kernel_size**2)
        self.activation, self.down = activation, down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = self.weight.shape[-1] // 2
        if self.down:
            x = F.conv2d(blur2d(x, pad + 1), self.weight * self.weight_gain, self.bias, stride=2)
        else:
            x = F.conv2d(x, self.weight * self.weight_gain, self.bias, padding=pad)
        return _lrelu(x) if self.activation else x


def modulated_conv2d(
    x: torch.Tensor, weight: torch.Tensor, styles: torch.Tensor, *, demodulate: bool = True
) -> torch.Tensor:
    """Convolve each sample with its own style-scaled (and, if asked, demodulated) weights.

    Parameters
    ----------
    x : Tensor, shape (N, I, H, W)
    weight : Tensor, shape (O, I, k, k)
    styles : Tensor, shape (N, I)
        Per-sample input-channel scales.
    demodulate : bool
        Rescale each output channel's weights to unit norm, so unit-variance input gives unit-variance
        output whatever the style (StyleGAN2's replacement for AdaIN).

    Returns
    -------
    Tensor, shape (N, O, H, W)
    """
    # Scaling the input, convolving with the shared weights and scaling the output equals convolving with
    # per-sample weights w·s/‖w·s‖, and is one ordinary convolution instead of N grouped ones (NVlabs'
    # non-fused path).
    out = F.conv2d(x * styles[:, :, None, None], weight, padding=weight.shape[-1] // 2)
    if demodulate:
        # ‖w_o · s‖² = Σ_i s_i² Σ_k w_oik²  for every sample and output channel.
        norms = styles.square() @ weight.square().sum(dim=(2, 3)).T
        out = out * torch.rsqrt(norms + 1e-8)[:, :, None, None]
    return out


class MappingNetwork(nn.Module):
    """z → w: normalize z, then an MLP; tracks the mean w for truncation."""

    def __init__(self, z_dim: int, w_dim: int, num_layers: int, lr_mul: float, w_avg_beta: float = 0.995):
        super().__init__()
        dims = [z_dim] + [w_dim] * num_layers
        self.layers = nn.Sequential(
            *[EqualLinear(a, b, lr_mul=lr_mul, activation=True) for a, b in itertools.pairwise(dims)]
        )
        self.register_buffer("w_avg", torch.zeros(w_dim))
        self.w_avg_beta = w_avg_beta

    def forward(
        self, z: torch.Tensor, *, truncation_psi: float = 1.0, update_w_avg: bool = False
    ) -> torch.Tensor:
        z = z * torch.rsqrt(z.square().mean(dim=1, keepdim=True) + 1e-8)
        w = self.layers(z)
        if update_w_avg:
            self.w_avg.copy_(w.detach().float().mean(dim=0).lerp(self.w_avg, self.w_avg_beta))
        if truncation_psi != 1.0:
            w = self.w_avg.lerp(w, truncation_psi)
        return w


class StyledConv(nn.Module):
    """Modulated 3×3 convolution (optionally after ×2 up-sampling), noise input, bias, leaky ReLU."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, *, up: bool = False):
        super().__init__()
        self.affine = EqualLinear(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, 3, 3))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.noise_strength = nn.Parameter(torch.zeros([]))
        self.register_buffer("noise_const", torch.randn(resolution, resolution))
        self.up = up

    def forward(
        self, x: torch.Tensor, w: torch.Tensor, noise_mode: str = "random", noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``noise`` (N, 1, H, W), when given, replaces the random draw of ``noise_mode="random"``."""
        if self.up:
            x = upsample2d(x)
        x = modulated_conv2d(x, self.weight, self.affine(w))
        if noise is not None:
            x = x + noise.to(x.dtype) * self.noise_strength
        elif noise_mode == "random":
            x = (
                x
                + torch.randn(x.shape[0], 1, *x.shape[2:], device=x.device, dtype=x.dtype)
                * self.noise_strength
            )
        elif noise_mode == "const":
            x = x + self.noise_const * self.noise_strength
        return _lrelu(x + self.bias[None, :, None, None])


class ToRGB(nn.Module):
    """Modulated 1×1 convolution to image channels, without demodulation."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int):
        super().__init__()
        self.affine = EqualLinear(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.weight_gain = 1.0 / math.sqrt(in_channels)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        x = modulated_conv2d(x, self.weight, self.affine(w) * self.weight_gain, demodulate=False)
        return x + self.bias[None, :, None, None]


class Generator(nn.Module):
    """StyleGAN2 generator with skip (toRGB at every resolution) architecture.

    Parameters
    ----------
    config : StyleGANConfig
    image_shape : tuple of int
        ``(C, R, R)`` with R a power of two.
    """

    def __init__(self, config: StyleGANConfig, image_shape: tuple[int, ...]):
        super().__init__()
        check_stylegan_shape(config, image_shape)
        channels, resolution = image_shape[0], image_shape[-1]
        self.z_dim = config.z_dim
        self.mapping = MappingNetwork(
            config.z_dim, config.w_dim, config.mapping_layers, config.mapping_lr_mul
        )
        c4 = config.channels_at(4)
        self.const = nn.Parameter(torch.randn(c4, 4, 4))
        self.convs = nn.ModuleList([StyledConv(c4, c4, config.w_dim, 4)])
        self.to_rgbs = nn.ModuleList([ToRGB(c4, channels, config.w_dim)])
        res = 8
        while res <= resolution:
            cin, cout = config.channels_at(res // 2), config.channels_at(res)
            self.convs.append(StyledConv(cin, cout, config.w_dim, res, up=True))
            self.convs.append(StyledConv(cout, cout, config.w_dim, res))
            self.to_rgbs.append(ToRGB(cout, channels, config.w_dim))
            res *= 2
        # As NVlabs: each toRGB shares its w with the next block's first conv, so 2·log2(R) − 2 ws.
        self.num_ws = 2 * int(math.log2(resolution)) - 2

    def noise_shapes(self) -> list[tuple[int, int, int]]:
        """Shape ``(1, H, W)`` of one image's noise input for each styled convolution, in order."""
        return [(1, *conv.noise_const.shape) for conv in self.convs]

    def synthesis(
        self, ws: torch.Tensor, noise_mode: str = "random", noises: list[torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Map ``ws`` (N, num_ws, w_dim) to images (N, C, R, R).

        ``noises``, one (N, 1, H, W) tensor per styled convolution (see :meth:`noise_shapes`), replaces
        the noise inputs that ``noise_mode`` would give.
        """
        noises = noises if noises is not None else [None] * len(self.convs)
        x = self.const[None].expand(ws.shape[0], -1, -1, -1)
        x = self.convs[0](x, ws[:, 0], noise_mode, noises[0])
        img = self.to_rgbs[0](x, ws[:, 1])
        for block, to_rgb in enumerate(self.to_rgbs[1:]):
            i = 2 * block + 1  # index of this block's first w
            x = self.convs[i](x, ws[:, i], noise_mode, noises[i])
            x = self.convs[i + 1](x, ws[:, i + 1], noise_mode, noises[i + 1])
            img = upsample2d(img) + to_rgb(x, ws[:, i + 2])
        return img

    def map(
        self,
        z: torch.Tensor,
        *,
        truncation_psi: float = 1.0,
        mixing_prob: float = 0.0,
        update_w_avg: bool = False,
    ) -> torch.Tensor:
        """Map latents z (N, z_dim) to per-layer ws (N, num_ws, w_dim), mixing styles with ``mixing_prob``."""
        w = self.mapping(z, truncation_psi=truncation_psi, update_w_avg=update_w_avg)
        ws = w[:, None].repeat(1, self.num_ws, 1)
        if mixing_prob > 0 and torch.rand([]).item() < mixing_prob:
            # Layers from a random cutoff on take their style from a second latent (StyleGAN's mixing).
            cutoff = int(torch.randint(1, self.num_ws, []).item())
            w2 = self.mapping(torch.randn_like(z), truncation_psi=truncation_psi, update_w_avg=False)
            ws[:, cutoff:] = w2[:, None]
        return ws

    def forward(
        self, z: torch.Tensor, *, truncation_psi: float = 1.0, noise_mode: str = "random"
    ) -> torch.Tensor:
        return self.synthesis(self.map(z, truncation_psi=truncation_psi), noise_mode)


class MinibatchStd(nn.Module):
    """Append the standard deviation over groups of samples as extra feature maps (against collapse)."""

    def __init__(self, group_size: int, num_channels: int):
        super().__init__()
        self.group_size, self.num_channels = group_size, num_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        # Largest group size that divides the batch, so any batch size works.
        g = max(d for d in range(1, min(self.group_size, n) + 1) if n % d == 0)
        f = self.num_channels
        y = x.reshape(g, -1, f, c // f, h, w)
        y = (y - y.mean(dim=0)).square().mean(dim=0).add(1e-8).sqrt()
        y = y.mean(dim=(2, 3, 4)).reshape(-1, f, 1, 1).repeat(g, 1, h, w)
        return torch.cat([x, y], dim=1)


class DiscriminatorBlock(nn.Module):
    """Residual block: two 3×3 convs (the second down-sampling) plus a 1×1 down-sampling skip, / √2."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv0 = EqualConv2d(in_channels, in_channels, 3)
        self.conv1 = EqualConv2d(in_channels, out_channels, 3, down=True)
        self.skip = EqualConv2d(in_channels, out_channels, 1, bias=False, activation=False, down=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.skip(x) + self.conv1(self.conv0(x))) * math.sqrt(0.5)


class Discriminator(nn.Module):
    """StyleGAN2 residual discriminator, returning one logit per image."""

    def __init__(self, config: StyleGANConfig, image_shape: tuple[int, ...]):
        super().__init__()
        check_stylegan_shape(config, image_shape)
        channels, resolution = image_shape[0], image_shape[-1]
        self.from_rgb = EqualConv2d(channels, config.channels_at(resolution), 1)
        blocks, res = [], resolution
        while res > 4:
            blocks.append(DiscriminatorBlock(config.channels_at(res), config.channels_at(res // 2)))
            res //= 2
        self.blocks = nn.Sequential(*blocks)
        c4 = config.channels_at(4)
        if c4 % config.mbstd_channels:
            raise ValueError(f"mbstd_channels={config.mbstd_channels} must divide the 4×4 channels {c4}")
        self.mbstd = MinibatchStd(config.mbstd_group, config.mbstd_channels)
        self.conv = EqualConv2d(c4 + config.mbstd_channels, c4, 3)
        self.fc = EqualLinear(c4 * 16, c4, activation=True)
        self.out = EqualLinear(c4, 1)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.from_rgb(img))
        x = self.conv(self.mbstd(x))
        return self.out(self.fc(x.flatten(1))).squeeze(1)


def r1_penalty(discriminator: nn.Module, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (per-image ‖∇ₓD(x)‖², logits) on real images; differentiable (create_graph=True)."""
    real = real.detach().requires_grad_(True)
    logits = discriminator(real)
    (grad,) = torch.autograd.grad(logits.float().sum(), real, create_graph=True)
    return grad.float().square().sum(dim=(1, 2, 3)), logits


class StyleGANTrainer:
    """Generator, discriminator, generator EMA, their optimizers and one training step (NVlabs' phases).

    Parameters
    ----------
    config : StyleGANConfig
    image_shape : tuple of int
        ``(C, R, R)``.
    device : torch.device
    dist : DistInfo
        Under torchrun gradients are averaged across ranks by hand after each phase.
    """

    def __init__(
        self, config: StyleGANConfig, image_shape: tuple[int, ...], device: torch.device, dist: DistInfo
    ):
        self.config, self.device, self.dist = config, device, dist
        self.G = Generator(config, image_shape).to(device)
        self.D = Discriminator(config, image_shape).to(device)
        self.G_ema = copy.deepcopy(self.G).requires_grad_(False).eval()
        self.optimizers = {
            "G": self._adam(self.G, config.pl_interval if config.pl_weight > 0 else None),
            "D": self._adam(self.D, config.r1_interval if config.gamma > 0 else None),
        }
        self.pl_mean = torch.zeros([], device=device)
        self.amp = config.amp and device.type == "cuda"

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def _adam(self, module: nn.Module, reg_interval: int | None) -> torch.optim.Adam:
        # Lazy regularization takes an extra step every `interval` steps; scale lr and betas to match.
        ratio = reg_interval / (reg_interval + 1) if reg_interval else 1.0
        betas = tuple(b**ratio for b in self.config.betas)
        return torch.optim.Adam(
            module.parameters(), lr=self.config.lr * ratio, betas=betas, eps=1e-8, foreach=True
        )

    def _phase(self, name: str, module: nn.Module, loss: torch.Tensor) -> None:
        optimizer = self.optimizers[name]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients([p for p in module.parameters()], self.dist)
        optimizer.step()

    def train_step(self, real: torch.Tensor, step: int) -> dict[str, float]:
        """One iteration of the four phases (G main, G path length, D main, D R1); return the losses.

        ``step`` is the number of steps done before this one; lazy regularizers run when it is a
        multiple of their interval.
        """
        cfg, n = self.config, real.shape[0]
        z_shape = (n, cfg.z_dim)
        losses = {}
        self.G.train()
        self.D.train()

        # G main: non-saturating logistic loss, softplus(−D(G(z))).
        self.G.requires_grad_(True)
        self.D.requires_grad_(False)
        with self._autocast():
            ws = self.G.map(
                torch.randn(z_shape, device=self.device), mixing_prob=cfg.style_mixing_prob, update_w_avg=True
            )
            fake_logits = self.D(self.G.synthesis(ws))
        loss_g = F.softplus(-fake_logits.float()).mean()
        self._phase("G", self.G, loss_g)
        losses["loss_G"] = loss_g.item()

        # G path length: the image's sensitivity to w should be the same everywhere (lazy).
        if cfg.pl_weight > 0 and step % cfg.pl_interval == 0:
            m = max(1, n // cfg.pl_batch_shrink)
            with self._autocast():
                ws = self.G.map(
                    torch.randn((m, cfg.z_dim), device=self.device), mixing_prob=cfg.style_mixing_prob
                )
                img = self.G.synthesis(ws).float()
            pl_noise = torch.randn_like(img) / math.sqrt(img.shape[2] * img.shape[3])
            (grad,) = torch.autograd.grad((img * pl_noise).sum(), ws, create_graph=True)
            lengths = grad.float().square().sum(dim=2).mean(dim=1).sqrt()
            pl_mean = self.pl_mean.lerp(all_reduce_mean(lengths.mean(), self.dist), cfg.pl_decay)
            self.pl_mean.copy_(pl_mean.detach())
            penalty = (lengths - pl_mean).square().mean()
            # `img * 0` puts every generator parameter in the graph, as NVlabs does.
            self._phase("G", self.G, penalty * cfg.pl_weight * cfg.pl_interval + img[:, 0, 0, 0].sum() * 0)
            losses["loss_pl"] = penalty.item()

        # D main: softplus(D(G(z))) + softplus(−D(x)).
        self.G.requires_grad_(False)
        self.D.requires_grad_(True)
        with self._autocast():
            with torch.no_grad():
                ws = self.G.map(torch.randn(z_shape, device=self.device), mixing_prob=cfg.style_mixing_prob)
                fake = self.G.synthesis(ws)
            fake_logits = self.D(fake)
            real_logits = self.D(real)
        loss_d = (F.softplus(fake_logits.float()) + F.softplus(-real_logits.float())).mean()
        self._phase("D", self.D, loss_d)
        losses["loss_D"] = loss_d.item()

        # D R1: γ/2 · ‖∇D(x)‖² on real images, every r1_interval steps, scaled by the interval.
        if cfg.gamma > 0 and step % cfg.r1_interval == 0:
            with self._autocast():
                penalty, logits = r1_penalty(self.D, real)
            self._phase(
                "D", self.D, (penalty * (cfg.gamma / 2) * cfg.r1_interval + logits.float() * 0).mean()
            )
            losses["loss_r1"] = penalty.mean().item()

        self._update_ema(n)
        return losses

    @torch.no_grad()
    def _update_ema(self, batch_per_rank: int) -> None:
        broadcast_buffers(self.G, self.dist)  # w_avg comes from each rank's batch; keep rank 0's
        beta = 0.5 ** (batch_per_rank * self.dist.world_size / max(self.config.ema_kimg * 1000, 1e-8))
        torch._foreach_lerp_(list(self.G_ema.parameters()), list(self.G.parameters()), 1.0 - beta)
        for b_ema, b in zip(self.G_ema.buffers(), self.G.buffers(), strict=True):
            b_ema.copy_(b)

    def state_dict(self) -> dict:
        """All weights, optimizer states and the running path length (tensors and plain values only)."""
        return {
            "G": self.G.state_dict(),
            "D": self.D.state_dict(),
            "G_ema": self.G_ema.state_dict(),
            "opt_G": self.optimizers["G"].state_dict(),
            "opt_D": self.optimizers["D"].state_dict(),
            "pl_mean": self.pl_mean,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.G.load_state_dict(state["G"])
        self.D.load_state_dict(state["D"])
        self.G_ema.load_state_dict(state["G_ema"])
        self.optimizers["G"].load_state_dict(state["opt_G"])
        self.optimizers["D"].load_state_dict(state["opt_D"])
        self.pl_mean.copy_(state["pl_mean"])

    def sampling_network(self) -> nn.Module:
        """The generator EMA, which sampling uses."""
        return self.G_ema


@torch.no_grad()
def generate(
    G: Generator,
    generators: list[torch.Generator],
    *,
    truncation_psi: float,
    device: torch.device,
    amp: bool = False,
) -> torch.Tensor:
    """Draw one image per generator: float32 in [-1, 1], ``(len(generators), C, R, R)``.

    Image i's latent z and then its noise inputs (layer by layer) come from the CPU generator
    ``generators[i]`` only, so an image does not depend on the batch it is drawn in or the device.
    """
    shapes = G.noise_shapes()
    draws = [
        [torch.randn(shape, generator=g) for shape in [(G.z_dim,), *shapes]] for g in generators
    ]  # per image: z, then one noise map per styled convolution
    z, *noises = (torch.stack(per_layer).to(device) for per_layer in zip(*draws, strict=True))
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        img = G.synthesis(G.map(z, truncation_psi=truncation_psi), noises=noises)
    return img.float().clamp(-1, 1)
