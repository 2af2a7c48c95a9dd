"""StyleGAN2: shapes, modulated convolution, resampling, R1, and learning four images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from memstudy.models import read_log, resolve_config, sample, train
from memstudy.models.stylegan import (
    Discriminator,
    DiscriminatorBlock,
    Generator,
    MinibatchStd,
    blur2d,
    modulated_conv2d,
    r1_penalty,
    upsample2d,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def tiny():
    return resolve_config("stylegan", "tiny", channel_base=128, channel_max=32, z_dim=16, w_dim=16)


def test_generator_and_discriminator_shapes_for_five_channels(tiny):
    torch.manual_seed(0)
    G, D = Generator(tiny, (5, 32, 32)), Discriminator(tiny, (5, 32, 32))
    z = torch.randn(3, tiny.z_dim)
    ws = G.map(z)
    img = G.synthesis(ws)
    assert ws.shape == (3, 8, tiny.w_dim)  # 2·log2(32) − 2 layers of styles
    assert img.shape == (3, 5, 32, 32) and img.dtype == torch.float32
    logits = D(img)
    assert logits.shape == (3,) and torch.isfinite(logits).all()


def test_style_mixing_takes_later_layers_from_a_second_latent(tiny):
    torch.manual_seed(0)
    G = Generator(tiny, (1, 16, 16))
    ws = G.map(torch.randn(2, tiny.z_dim), mixing_prob=1.0)
    changed = [not torch.equal(ws[:, 0], ws[:, i]) for i in range(G.num_ws)]
    assert not changed[0] and changed[-1]
    assert changed == sorted(changed)  # one cutoff: equal up to it, different after


@pytest.mark.parametrize(
    "shape, message", [((1, 24, 24), "power of two"), ((1, 16, 32), "square"), ((1, 8, 16, 16), "2D")]
)
def test_generator_rejects_shapes_it_cannot_make(tiny, shape, message):
    with pytest.raises(ValueError, match=message):
        Generator(tiny, shape)


def test_demodulated_conv_keeps_unit_variance_whatever_the_style():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 64, 32, 32, generator=g)
    weight = torch.randn(32, 64, 3, 3, generator=g)
    styles = 3.0 * torch.rand(8, 64, generator=g) + 0.5  # far from unit scale
    out = modulated_conv2d(x, weight, styles, demodulate=True)[..., 1:-1, 1:-1]  # interior: no zero padding
    plain = modulated_conv2d(x, weight, styles, demodulate=False)[..., 1:-1, 1:-1]
    assert out.var().item() == pytest.approx(1.0, abs=0.05)
    assert plain.var().item() > 10  # without demodulation the styles' scale passes through


def test_modulated_conv_equals_convolving_each_sample_with_its_own_weights():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 8, 8, generator=g)
    weight = torch.randn(5, 4, 3, 3, generator=g)
    styles = torch.rand(3, 4, generator=g) + 0.5
    out = modulated_conv2d(x, weight, styles, demodulate=True)
    for n in range(3):
        w = weight * styles[n][None, :, None, None]
        w = w / w.square().sum(dim=(1, 2, 3), keepdim=True).sqrt()
        expected = torch.nn.functional.conv2d(x[n : n + 1], w, padding=1)
        assert torch.allclose(out[n : n + 1], expected, atol=1e-5)


def test_fir_resampling_keeps_constant_images_constant():
    x = torch.full((1, 2, 8, 8), 0.7)
    up, blurred = upsample2d(x), blur2d(x, padding=2)
    assert up.shape == (1, 2, 16, 16) and blurred.shape == (1, 2, 9, 9)
    assert torch.allclose(up[..., 2:-2, 2:-2], x.new_full((1, 2, 12, 12), 0.7), atol=1e-6)
    assert torch.allclose(blurred[..., 3:-3, 3:-3], x.new_full((1, 2, 3, 3), 0.7), atol=1e-6)


def test_discriminator_block_resamples_as_nvlabs_conv2d_resample():
    """NVlabs' down-sampling 3×3 layer blurs at full resolution (zero padding 1 + 1 for the filter)
    and convolves with stride 2; its 1×1 skip blurs (padding 0 + 1), keeps every second pixel and
    convolves."""
    g = torch.Generator().manual_seed(0)
    block = DiscriminatorBlock(3, 5)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    x = torch.randn(2, 3, 16, 16, generator=g)

    f = torch.tensor([1.0, 3.0, 3.0, 1.0])
    fir = (torch.outer(f, f) / 64).expand(3, 1, 4, 4)

    def lrelu(v):
        return torch.nn.functional.leaky_relu(v, 0.2) * 2**0.5

    conv0, conv1, skip = block.conv0, block.conv1, block.skip
    h = lrelu(F.conv2d(F.pad(x, (1, 1, 1, 1)), conv0.weight / (3 * 9) ** 0.5, conv0.bias))
    h = F.conv2d(F.pad(h, (2, 2, 2, 2)), fir, groups=3)  # 16 + 4 − 3 = 17 px
    h = lrelu(F.conv2d(h, conv1.weight / (3 * 9) ** 0.5, conv1.bias, stride=2))  # (17 − 3) / 2 + 1 = 8 px
    s = F.conv2d(F.pad(x, (1, 1, 1, 1)), fir, groups=3)[..., ::2, ::2]  # 15 px → every second: 8 px
    s = F.conv2d(s, skip.weight / 3**0.5)
    expected = (h + s) / 2**0.5

    out = block(x)
    assert out.shape == (2, 5, 8, 8)
    # float32 sums of ≤ 27 products of O(1) terms: rounding ~1e-6; the old order of operations
    # (subsample, then 3×3) differs by O(1).
    assert torch.allclose(out, expected, atol=1e-5, rtol=0)


def test_minibatch_std_is_zero_for_identical_images_only():
    layer = MinibatchStd(group_size=4, num_channels=1)
    same = layer(torch.ones(4, 3, 4, 4))
    varied = layer(torch.randn(4, 3, 4, 4))
    assert same.shape == (4, 4, 4, 4)
    assert same[:, 3].max() < 1e-3 and varied[:, 3].min() > 0.3


def test_r1_penalty_is_positive_and_differentiable(tiny):
    torch.manual_seed(0)
    D = Discriminator(tiny, (1, 16, 16))
    real = torch.rand(4, 1, 16, 16) * 2 - 1
    penalty, _ = r1_penalty(D, real)
    assert penalty.shape == (4,) and (penalty > 0).all()
    grads = torch.autograd.grad(penalty.sum(), list(D.parameters()), allow_unused=True)
    norms = [g.norm().item() for g in grads if g is not None]
    assert all(np.isfinite(norms)) and max(norms) > 0
    # The penalty is the squared input gradient of the logits.
    x = real.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(D(x).sum(), x)
    assert torch.allclose(penalty, expected.square().sum(dim=(1, 2, 3)), rtol=1e-4)


def test_truncation_pulls_samples_towards_the_mean_style(tiny):
    torch.manual_seed(0)
    G = Generator(tiny, (1, 16, 16)).eval()
    G.mapping.w_avg.copy_(torch.randn(tiny.w_dim))
    z = torch.randn(16, tiny.z_dim)
    free = G(z, truncation_psi=1.0, noise_mode="const")
    truncated = G(z, truncation_psi=0.0, noise_mode="const")
    assert free.std(dim=0).mean() > 10 * truncated.std(dim=0).mean()


@pytest.mark.slow
def test_stylegan_learns_four_images(tmp_path, blobs):
    def median_best_r(images: np.ndarray) -> float:
        a = images.reshape(len(images), -1).astype(float)
        b = blobs.images.reshape(4, -1).astype(float)
        a, b = a - a.mean(1, keepdims=True), b - b.mean(1, keepdims=True)
        r = (a @ b.T) / (np.linalg.norm(a, axis=1)[:, None] * np.linalg.norm(b, axis=1)[None] + 1e-9)
        return float(np.median(r.max(axis=1)))

    options = dict(seed=0, batch_size=4, ema_kimg=0.1, progress=False)
    train("stylegan", blobs, "tiny", tmp_path, steps=1, **options)
    before = median_best_r(sample(tmp_path, 16, seed=0).images)
    train("stylegan", blobs, "tiny", tmp_path, steps=300, **options)
    after = median_best_r(sample(tmp_path, 16, seed=0).images)
    log = read_log(tmp_path)
    d_loss = [r["loss_D"] for r in log]
    assert np.mean(d_loss[-20:]) < 0.6 * np.mean(d_loss[:20])  # D separates real from fake at first...
    assert after > before + 0.2 and after > 0.6  # ...and G's samples come to look like the training discs
