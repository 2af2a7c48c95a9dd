"""sample(): per-image seeding, streaming into an ImageSet folder, provenance, options, progress."""

from __future__ import annotations

import numpy as np
import pytest

from memstudy.data import ImageSet
from memstudy.models import resolve_config, sample, train

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Tiny networks; the DDPM has T = 20 so that its default (every step) sampler is quick.
OPTIONS = {
    "ddpm": {"base_channels": 8, "channel_mult": (1, 2), "num_train_timesteps": 20},
    "stylegan": {"z_dim": 8, "w_dim": 8, "channel_base": 64, "channel_max": 8},
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    rng = np.random.default_rng(0)
    images = ImageSet(rng.integers(0, 256, (4, 2, 8, 8), dtype=np.uint8), list("abcd"), range(4), ["a", "b"])
    out = {}
    for model, options in OPTIONS.items():
        out[model] = tmp_path_factory.mktemp(model)
        train(model, images, "tiny", out[model], steps=1, seed=0, batch_size=2, progress=False, **options)
    return out


@pytest.mark.parametrize(
    "model, options",
    [("ddpm", {"steps": 5}), ("ddpm", {"sampler": "ddim", "steps": 4, "eta": 1.0}), ("stylegan", {})],
    ids=["ancestral", "ddim-eta1", "stylegan"],
)
def test_images_depend_on_seed_and_index_not_on_batch_or_count(runs, model, options):
    run = runs[model]
    draws = [sample(run, 6, seed=3, batch_size=b, **options).images for b in (2, 5, 6)]
    assert all(np.array_equal(draws[0], d) for d in draws[1:])
    assert np.array_equal(sample(run, 4, seed=3, batch_size=3, **options).images, draws[0][:4])
    other_seed = sample(run, 6, seed=4, **options).images
    assert not np.array_equal(other_seed, draws[0])
    assert len({d.tobytes() for d in draws[0]}) == 6  # every image has its own noise


def test_samples_stream_into_a_new_imageset_folder(runs, tmp_path):
    target = tmp_path / "samples"
    written = sample(runs["ddpm"], 5, seed=1, batch_size=2, out=target, steps=4)
    in_memory = sample(runs["ddpm"], 5, seed=1, steps=4)
    loaded = ImageSet.load(target)
    assert isinstance(written.images, np.memmap)
    assert np.array_equal(loaded.images, in_memory.images)
    assert loaded.names == in_memory.names == tuple(f"sample_{i:06d}" for i in range(5))
    assert loaded.channels == ("a", "b") and loaded.groups.tolist() == [0, 1, 2, 3, 4]
    assert loaded.provenance == in_memory.provenance
    assert [p.name for p in tmp_path.iterdir()] == ["samples"]  # no staging folder left behind
    with pytest.raises(FileExistsError, match="samples already exists"):
        sample(runs["ddpm"], 5, seed=1, out=target)


def test_provenance_records_the_sampler(runs):
    ddpm_run = runs["ddpm"]
    full = sample(ddpm_run, 2, seed=0).provenance
    assert full["sampler"] == "ancestral-20" and full["steps"] == 20 and full["eta"] is None
    assert full["seed"] == 0 and full["checkpoint_step"] == 1 and full["run_dir"] == str(ddpm_run)
    assert len(full["training_dataset"]) == 16
    assert sample(ddpm_run, 2, seed=0, steps=7).provenance["sampler"] == "ancestral-7"
    ddim = sample(ddpm_run, 2, seed=0, sampler="ddim", steps=5).provenance
    assert ddim["sampler"] == "ddim-5-eta0" and ddim["eta"] == 0.0
    assert (
        sample(ddpm_run, 2, seed=0, sampler="ddim", steps=5, eta=0.5).provenance["sampler"] == "ddim-5-eta0.5"
    )
    gan = sample(runs["stylegan"], 2, seed=0, truncation_psi=0.7).provenance
    assert gan["sampler"] == "stylegan-psi0.7" and gan["truncation_psi"] == 0.7 and gan["steps"] is None


@pytest.mark.parametrize(
    "model, options, message",
    [
        ("stylegan", {"steps": 10}, "steps apply to DDPM runs only"),
        ("stylegan", {"sampler": "ddim"}, "sampler apply to DDPM runs only"),
        ("ddpm", {"truncation_psi": 0.5}, "truncation_psi applies to StyleGAN runs only"),
        ("ddpm", {"eta": 0.5}, r"eta applies to the DDIM sampler only"),
        ("ddpm", {"sampler": "euler"}, "unknown DDPM sampler 'euler'"),
        ("ddpm", {"steps": 21}, r"sampling steps must be in 1\.\.20"),
        ("ddpm", {"sampler": "ddim", "eta": 1.5}, r"eta must be in \[0, 1\], got 1\.5"),
        ("ddpm", {"batch_size": 0}, "batch_size must be >= 1"),
        ("ddpm", {"seed": -1}, "seed must be a non-negative integer"),
    ],
)
def test_options_that_do_not_apply_are_refused(runs, model, options, message):
    options = {"seed": 0} | options
    with pytest.raises(ValueError, match=message):
        sample(runs[model], 2, **options)


def test_progress_counts_denoising_steps_of_every_batch(runs, capsys):
    sample(runs["ddpm"], 3, seed=0, steps=4, batch_size=2, progress=True)
    err = capsys.readouterr().err
    assert "sampling batch 2/2" in err and "8/8" in err  # 2 batches × 4 steps


def test_ddpm_config_defaults_to_the_papers_full_ancestral_sampler():
    for name in ("tiny", "paper"):
        config = resolve_config("ddpm", name)
        assert config.sampler == "ancestral" and config.sample_steps is None and config.ddim_eta == 0.0
    with pytest.raises(ValueError, match="sampler must be 'ancestral' or 'ddim', got 'euler'"):
        resolve_config("ddpm", "tiny", sampler="euler")
    with pytest.raises(ValueError, match=r"ddim_eta must be in \[0, 1\], got 2"):
        resolve_config("ddpm", "tiny", ddim_eta=2.0)
