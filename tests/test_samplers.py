"""DDPM samplers against data whose optimal noise predictor has a closed form.

For data of one image x* the optimal ε given x_t is (x_t − √ᾱ_t x*) / √(1 − ᾱ_t); for Gaussian data
N(μ, σ²) per pixel it is √(1 − ᾱ_t)(x_t − √ᾱ_t μ) / (ᾱ_t σ² + 1 − ᾱ_t). With these as the network, the
samplers must return x*, and for the Gaussian every sampler is a linear-Gaussian map per pixel whose
output mean and variance the tests propagate exactly, step by step, from the published updates.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from memstudy.models import resolve_config
from memstudy.models.ddpm import generate, sampler_name, sampling_timesteps

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHAPE = (1, 8, 8)
CPU = torch.device("cpu")


def _alpha_bar(config) -> np.ndarray:
    """ᾱ in float64 straight from the linear-β definition (Ho et al. 2020)."""
    betas = np.linspace(config.beta_start, config.beta_end, config.num_train_timesteps, dtype=np.float64)
    return np.cumprod(1.0 - betas)


class DeltaEps(torch.nn.Module):
    """The exact ε for training data of one image ``x_star``, computed in float64."""

    def __init__(self, config, x_star: np.ndarray):
        super().__init__()
        self.ab = torch.from_numpy(_alpha_bar(config))
        self.x_star = torch.from_numpy(x_star)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        a = self.ab[timesteps.cpu()].view(-1, 1, 1, 1)
        return ((x.double() - a.sqrt() * self.x_star) / (1 - a).sqrt()).float()


class GaussianEps(torch.nn.Module):
    """The exact ε for data N(mu, sigma²) per pixel, optionally made imperfect.

    ``error`` adds error · tanh(w ⋆ x_t), a smooth error that mixes neighbouring pixels as a trained
    U-Net's does; ``push`` then moves x̂₀ further out wherever it lies beyond [-1, 1] (changing ε there
    and nowhere else).
    """

    def __init__(self, config, mu: np.ndarray, sigma: float, *, error: float = 0.0, push: float = 0.0):
        super().__init__()
        self.ab = torch.from_numpy(_alpha_bar(config))
        self.mu, self.s2, self.error, self.push = torch.from_numpy(mu), sigma**2, error, push
        self.w = torch.randn(1, 1, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        a = self.ab[timesteps.cpu()].view(-1, 1, 1, 1)
        xd = x.double()
        x0 = self.mu + (a.sqrt() * self.s2 / (a * self.s2 + 1 - a)) * (xd - a.sqrt() * self.mu)  # E[x0 | x_t]
        eps = (xd - a.sqrt() * x0) / (1 - a).sqrt() + self.error * torch.tanh(F.conv2d(xd, self.w, padding=1))
        if self.push:
            x0 = (xd - (1 - a).sqrt() * eps) / a.sqrt()
            x0 = x0 + self.push * (x0 - x0.clamp(-1, 1))
            eps = (xd - a.sqrt() * x0) / (1 - a).sqrt()
        return eps.float()


def _generators(n: int, offset: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(1000 + offset + i) for i in range(n)]


def _first_draws(n: int) -> torch.Tensor:
    """Each image's initial noise: the first draw of its generator."""
    return torch.stack([torch.randn(SHAPE, generator=g) for g in _generators(n)]).double()


def _gaussian_output_moments(config, mu, sigma, sampler, steps, eta=0.0):
    """Exact per-pixel mean and std of the sampler's output for Gaussian data, starting from N(0, 1).

    Written from the papers: kept steps τ evenly spaced over 0..T−1 (T − 1 and 0 included), ᾱ' of the
    step after the last = 1, respaced β = 1 − ᾱ_τ / ᾱ_prev (Nichol & Dhariwal 2021); x̂₀ = E[x0 | x_t] is
    affine in x_t; ancestral: the posterior q(x_prev | x_t, x̂₀) mean (Ho et al. eq. 7) with variance β̃
    (fixed_small) or β (fixed_large); DDIM: Song et al. eq. 12 with σ² = η² β̃. Each step maps
    N(m, v) to N(slope·m + offset, slope²·v + noise variance).
    """
    T = config.num_train_timesteps
    kept = np.round(np.linspace(0, T - 1, steps)).astype(int)[::-1] if steps > 1 else np.array([T - 1])
    ab = _alpha_bar(config)[kept]
    ab_prev = np.append(ab[1:], 1.0)
    s2 = sigma**2
    m, v = np.zeros_like(mu), 1.0
    for i, (a, ap) in enumerate(zip(ab, ab_prev, strict=True)):
        c = np.sqrt(a) * s2 / (a * s2 + 1 - a)  # x̂₀ = (1 − c√a) μ + c x_t
        beta = 1 - a / ap
        tilde = beta * (1 - ap) / (1 - a)
        if sampler == "ancestral":
            k0, kx = np.sqrt(ap) * beta / (1 - a), np.sqrt(1 - beta) * (1 - ap) / (1 - a)
            noise = tilde if config.variance_type == "fixed_small" else beta
        else:
            noise = eta**2 * tilde
            k = np.sqrt(1 - ap - noise) / np.sqrt(1 - a)  # coefficient of ε̂ = (x_t − √a x̂₀)/√(1 − a)
            k0, kx = np.sqrt(ap) - k * np.sqrt(a), k
        slope = k0 * c + kx
        m = slope * m + k0 * (1 - c * np.sqrt(a)) * mu
        v = slope**2 * v + (noise if i < len(ab) - 1 else 0.0)
    return m, np.sqrt(v)


def test_timesteps_run_from_the_noisiest_to_the_cleanest_step():
    for steps in (1, 2, 3, 7, 50, 250, 333, 999, 1000):
        t = sampling_timesteps(1000, steps)
        assert len(t) == steps and t[0] == 999
        assert (np.diff(t) < 0).all() and (steps == 1 or t[-1] == 0)
    assert np.array_equal(sampling_timesteps(1000), np.arange(999, -1, -1))
    with pytest.raises(ValueError, match=r"sampling steps must be in 1\.\.1000"):
        sampling_timesteps(1000, 1001)


def test_sampler_names_say_kind_steps_and_eta():
    assert sampler_name("ancestral", 1000) == "ancestral-1000"
    assert sampler_name("ddim", 50, 0.0) == "ddim-50-eta0"
    assert sampler_name("ddim", 250, 0.5) == "ddim-250-eta0.5"
    with pytest.raises(ValueError, match="unknown DDPM sampler 'euler'"):
        sampler_name("euler", 10)


@pytest.mark.parametrize("steps", [50, 250, 1000])
@pytest.mark.parametrize("sampler, eta", [("ancestral", 0.0), ("ddim", 0.0), ("ddim", 1.0)])
def test_one_training_image_is_returned_exactly(sampler, eta, steps):
    config = resolve_config("ddpm", "tiny")
    rng = np.random.default_rng(0)
    x_star = rng.uniform(-1, 1, SHAPE)
    x_star[0, :2] = -1.0  # saturated background, as in brain slices
    out = generate(
        DeltaEps(config, x_star),
        config,
        SHAPE,
        _generators(4),
        sampler=sampler,
        steps=steps,
        eta=eta,
        device=CPU,
    )
    # The last step returns x̂₀ = (x − √(1 − ᾱ₀) ε)/√ᾱ₀ with ᾱ₀ = 1 − 1e-4: float32 rounding of values
    # ≤ 1 (ulp 1.2e-7) in a few operations. A wrong final ᾱ or timestep leaves √(1 − ᾱ) ≥ 1e-2 of noise.
    assert torch.allclose(out.double(), torch.from_numpy(x_star).expand(4, *SHAPE), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "sampler, steps, eta, variance_type",
    [
        ("ancestral", 1000, 0.0, "fixed_small"),
        ("ancestral", 1000, 0.0, "fixed_large"),
        ("ancestral", 250, 0.0, "fixed_small"),
        ("ancestral", 50, 0.0, "fixed_small"),
        ("ddim", 250, 1.0, "fixed_small"),
        ("ddim", 50, 1.0, "fixed_small"),
        ("ddim", 50, 0.5, "fixed_small"),
    ],
)
def test_gaussian_data_gives_the_exact_output_distribution(sampler, steps, eta, variance_type):
    config = resolve_config("ddpm", "tiny", variance_type=variance_type)
    # μ within ±0.4 and σ = 0.1: x̂₀ stays inside [-1, 1] (6σ), so the clip never acts.
    mu, sigma, n = np.linspace(-0.4, 0.4, 64).reshape(SHAPE), 0.1, 256
    out = generate(
        GaussianEps(config, mu, sigma),
        config,
        SHAPE,
        _generators(n),
        sampler=sampler,
        steps=steps,
        eta=eta,
        device=CPU,
    )
    mean, std = _gaussian_output_moments(config, mu, sigma, sampler, steps, eta)
    z = ((out.double().numpy() - mean) / std).ravel()  # N(0, 1), independent, if the sampler is right
    # 16,384 values: 5-sigma bounds on their mean (1/√N) and standard deviation (≈ 1/√(2N)).
    assert abs(z.mean()) < 5 / np.sqrt(z.size)
    assert abs(z.std() - 1) < 5 / np.sqrt(2 * z.size)
    assert stats.kstest(z, "norm").pvalue > 1e-6


@pytest.mark.parametrize("steps", [50, 250, 1000])
def test_ddim_maps_each_noise_image_to_its_exact_gaussian_sample(steps):
    """η = 0 is deterministic: for Gaussian data each pixel's output is an affine map of its noise."""
    config = resolve_config("ddpm", "tiny")
    mu, sigma, n = np.linspace(-0.4, 0.4, 64).reshape(SHAPE), 0.1, 8
    out = generate(
        GaussianEps(config, mu, sigma), config, SHAPE, _generators(n), sampler="ddim", steps=steps, device=CPU
    )
    mean, std = _gaussian_output_moments(config, mu, sigma, "ddim", steps)
    expected = torch.from_numpy(mean) + float(std) * _first_draws(n)
    # Each step rounds x (|x| < 4, ulp ≤ 4.8e-7) and the chain contracts (slopes < 1): at most
    # steps × 4.8e-7 in the worst case; a wrong ᾱ, grid or update is off by ≥ 1e-3.
    assert torch.allclose(out.double(), expected, atol=steps * 4.8e-7, rtol=0)


def _half_background(config, **options) -> GaussianEps:
    """Gaussian data whose left half is background at -1 (where x̂₀ leaves [-1, 1] half the time)."""
    mu = np.full(SHAPE, 0.3)
    mu[..., :4] = -1.0
    return GaussianEps(config, mu, 0.1, **options)


@pytest.mark.parametrize("sampler, steps", [("ddim", 50), ("ddim", 250), ("ancestral", 250)])
def test_a_prediction_beyond_the_clip_acts_as_its_clipped_value(sampler, steps):
    """x̂₀ is clipped to [-1, 1]; DDIM must re-derive ε from it, or what the clip removed leaks into x_t."""
    config = resolve_config("ddpm", "tiny")
    a, b = (
        generate(net, config, SHAPE, _generators(16), sampler=sampler, steps=steps, device=CPU)
        for net in (_half_background(config, error=0.1), _half_background(config, error=0.1, push=3.0))
    )
    # The networks agree wherever x̂₀ is inside [-1, 1] and clip to the same ±1 beyond it; they differ
    # by rounding where x̂₀ lies on the boundary: ≤ 1.2e-7 per step, not amplified (slopes < 1).
    assert torch.allclose(a, b, atol=steps * 1.2e-7, rtol=0)


def test_more_ddim_steps_approach_the_ode_solution_when_the_clip_acts():
    """MONAI's DDIM kept the unclipped ε: each noisy step then injected an error that does not shrink
    with the step size, so 250 DDIM steps were further from the ODE's solution than 50 were."""
    config = resolve_config("ddpm", "tiny")
    net = _half_background(config, error=0.1)
    runs = {
        s: generate(net, config, SHAPE, _generators(16), sampler="ddim", steps=s, device=CPU)
        for s in (50, 250, 1000)
    }
    # DDIM is a first-order solver of the probability-flow ODE: its error falls like 1/steps, so the
    # distance to the 1000-step solution from 250 steps is ~(1/250 − 1/1000)/(1/50 − 1/1000) ≈ 0.16 of
    # that from 50 steps; 0.5 leaves room for higher-order terms.
    far = (runs[50] - runs[1000]).abs().max()
    near = (runs[250] - runs[1000]).abs().max()
    assert near < 0.5 * far
