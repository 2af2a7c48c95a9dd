"""DDPM: U-Net shapes, the noising formula, and memorizing one image (samplers: test_samplers.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from memstudy.data import ImageSet
from memstudy.models import read_log, resolve_config, sample, train
from memstudy.models.ddpm import build_unet, make_scheduler

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _closed_form_schedule(config) -> tuple[np.ndarray, np.ndarray]:
    """β and ᾱ in float64, straight from the linear-schedule definition."""
    betas = np.linspace(config.beta_start, config.beta_end, config.num_train_timesteps, dtype=np.float64)
    return betas, np.cumprod(1.0 - betas)


@pytest.mark.parametrize("image_shape", [(5, 16, 16), (1, 8, 8, 8)], ids=["2d-5ch", "3d"])
def test_unet_predicts_noise_of_the_image_shape(image_shape):
    config = resolve_config("ddpm", "tiny", base_channels=8, channel_mult=(1, 2))
    net = build_unet(config, image_shape)
    x = torch.randn(2, *image_shape)
    out = net(x, timesteps=torch.tensor([0, 999]))
    assert out.shape == x.shape
    assert out.dtype == torch.float32


def test_unet_size_must_fit_its_levels():
    config = resolve_config("ddpm", "tiny")  # three levels: sizes must be multiples of 4
    with pytest.raises(ValueError, match="multiple of 4"):
        build_unet(config, (1, 18, 18))


def test_norm_groups_must_divide_channels():
    with pytest.raises(ValueError, match="norm_num_groups=8 must divide"):
        resolve_config("ddpm", "tiny", base_channels=12)


def test_paper_config_is_the_authors_guided_diffusion_setup():
    config = resolve_config("ddpm", "paper")
    net = build_unet(config, (5, 256, 256))
    attention_levels = [hasattr(block, "attentions") for block in net.down_blocks]
    # Levels run 256, 128, 64, 32, 16, 8 px: attention at the last two only.
    assert attention_levels == [False, False, False, False, True, True]
    assert config.level_channels[0] == 64 and config.num_res_blocks == 3
    betas, _ = _closed_form_schedule(config)
    # guided-diffusion's "linear" for T = 4000: the 1000-step range [1e-4, 0.02] scaled by 1000 / T.
    assert betas[0] == pytest.approx(2.5e-5) and betas[-1] == pytest.approx(5e-3)
    assert len(betas) == 4000


def test_forward_noising_matches_closed_form():
    config = resolve_config("ddpm", "tiny")
    scheduler = make_scheduler(config)
    _, alpha_bar = _closed_form_schedule(config)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(4, 1, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    xt = scheduler.add_noise(x0, noise, t).double()
    ab = torch.from_numpy(alpha_bar[t.numpy()]).view(-1, 1, 1, 1)
    expected = ab.sqrt() * x0.double() + (1 - ab).sqrt() * noise.double()
    assert torch.allclose(xt, expected, atol=1e-5)
    assert not torch.allclose(xt, x0.double(), atol=1e-2)  # noising changed the images


def test_training_loss_falls_on_four_images(tmp_path, blobs):
    train("ddpm", blobs, "tiny", tmp_path, steps=80, seed=0, batch_size=4, base_channels=16, progress=False)
    losses = [r["loss"] for r in read_log(tmp_path)]
    assert len(losses) == 80
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:10])


def test_3d_training_and_sampling_keep_the_volume_shape(tmp_path):
    rng = np.random.default_rng(0)
    volumes = ImageSet(rng.integers(0, 256, (2, 1, 8, 8, 8), dtype=np.uint8), ["a", "b"], [0, 1], ["t1"])
    train(
        "ddpm",
        volumes,
        "tiny",
        tmp_path,
        steps=2,
        seed=0,
        batch_size=2,
        base_channels=8,
        channel_mult=(1, 2),
        progress=False,
    )
    out = sample(tmp_path, 3, seed=0, steps=4)
    assert out.images.shape == (3, 1, 8, 8, 8)
    assert out.images.dtype == np.uint8
    assert out.channels == ("t1",)


@pytest.mark.slow
def test_ddpm_samples_copy_a_single_training_image(tmp_path):
    yy, xx = np.mgrid[:16, :16]
    image = (np.clip(1.2 - np.hypot(yy - 7, xx - 9) / 7, 0, 1) * 200 + (xx > 10) * 50).astype(np.uint8)
    one = ImageSet(image[None, None], ["only"], [0], ["x"])
    train(
        "ddpm",
        one,
        "tiny",
        tmp_path,
        steps=600,
        seed=0,
        batch_size=1,
        base_channels=16,
        ema_decay=0.98,
        progress=False,
    )
    out = sample(tmp_path, 8, seed=0, steps=25)
    r = [np.corrcoef(s.ravel().astype(float), image.ravel().astype(float))[0, 1] for s in out.images]
    assert np.median(r) > 0.9
