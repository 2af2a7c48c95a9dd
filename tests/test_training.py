"""Shared training and sampling: [-1, 1] mapping, checkpoints, resume, determinism, errors, CLI."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from memstudy.data import ImageSet
from memstudy.models import (
    list_checkpoints,
    read_log,
    read_params,
    resolve_config,
    sample,
    to_model_range,
    to_uint8,
    train,
)
from memstudy.models.command import add_bench_train_command, add_model_commands
from memstudy.models.ddpm import DDPMTrainer

# Small enough for a step in a few tens of milliseconds on two CPU cores.
TINY = {
    "ddpm": dict(base_channels=8, channel_mult=(1, 2)),
    "stylegan": dict(
        channel_base=64, channel_max=16, z_dim=16, w_dim=16, r1_interval=2, pl_weight=2.0, pl_interval=3
    ),
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def images() -> ImageSet:
    """Six 16×16 two-channel images of smooth random blobs."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:16, :16]
    stack = []
    for _ in range(6):
        cy, cx, r = rng.uniform(4, 12, 3)
        disc = np.clip(1.5 - np.hypot(yy - cy, xx - cx) / r, 0, 1)
        stack.append(np.stack([disc, disc**2]))
    return ImageSet(
        (np.stack(stack) * 255).astype(np.uint8), [f"img{i}" for i in range(6)], range(6), ["a", "b"]
    )


def _train(model, images, run_dir, steps, **options):
    options = {"seed": 0, "batch_size": 2, "progress": False, **TINY[model], **options}
    return train(model, images, "tiny", run_dir, steps=steps, **options)


def _weights(result) -> dict[str, torch.Tensor]:
    """Every tensor of a trainer's state (weights, EMA, optimizer moments), flattened by key."""
    flat = {}

    def walk(prefix, value):
        if isinstance(value, torch.Tensor):
            flat[prefix] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(f"{prefix}/{i}", v)

    walk("", result.trainer.state_dict())
    return flat


def test_uint8_round_trip_through_model_range_is_exact():
    levels = np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16)
    x = to_model_range(levels)
    assert x.dtype == torch.float32
    assert x.min().item() == -1.0 and x.max().item() == 1.0
    assert np.array_equal(to_uint8(x), levels)
    assert np.array_equal(to_uint8(torch.tensor([-3.0, -1.0, 0.0, 1.0, 2.5])), [0, 0, 128, 255, 255])


@pytest.mark.parametrize("model", ["ddpm", "stylegan"])
def test_resume_reaches_the_same_weights_as_an_uninterrupted_run(tmp_path, images, model):
    straight = _train(model, images, tmp_path / "straight", 6)
    _train(model, images, tmp_path / "resumed", 3)
    resumed = _train(model, images, tmp_path / "resumed", 6)

    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys() and len(a) > 10
    mismatched = [k for k in a if not torch.equal(a[k], b[k])]
    assert not mismatched, f"resume differs in {mismatched[:5]}"
    assert [r["step"] for r in read_log(tmp_path / "resumed")] == list(range(1, 7))
    assert [r["loss" if model == "ddpm" else "loss_G"] for r in read_log(tmp_path / "resumed")] == [
        r["loss" if model == "ddpm" else "loss_G"] for r in read_log(tmp_path / "straight")
    ]


def test_killed_training_resumes_from_its_last_checkpoint(tmp_path, images, monkeypatch):
    straight = _train("ddpm", images, tmp_path / "straight", 6)

    original = DDPMTrainer.train_step

    def crash_at_step_5(self, x, step):
        if step == 4:
            raise KeyboardInterrupt("killed")
        return original(self, x, step)

    monkeypatch.setattr(DDPMTrainer, "train_step", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        _train("ddpm", images, tmp_path / "killed", 6, checkpoint_every=2)
    assert list(list_checkpoints(tmp_path / "killed")) == [4]
    monkeypatch.setattr(DDPMTrainer, "train_step", original)

    resumed = _train("ddpm", images, tmp_path / "killed", 6, checkpoint_every=2)
    a, b = _weights(straight), _weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in read_log(tmp_path / "killed")] == list(range(1, 7))


def test_checkpoints_asked_for_are_kept_and_others_pruned(tmp_path, images):
    result = _train("ddpm", images, tmp_path, 7, checkpoint_every=3, keep_checkpoints=[2, 5])
    assert list(list_checkpoints(tmp_path)) == [2, 5, 7]
    assert result.checkpoint == list_checkpoints(tmp_path)[7]
    state = torch.load(result.checkpoint, weights_only=True)
    assert state["step"] == 7 and state["model"] == "ddpm"
    early = sample(tmp_path, 2, seed=0, steps=5, checkpoint=2)
    assert early.provenance["checkpoint_step"] == 2
    with pytest.raises(FileNotFoundError, match=r"no checkpoint at step 4; kept steps: \[2, 5, 7\]"):
        sample(tmp_path, 2, seed=0, checkpoint=4)
    assert not list(tmp_path.rglob(".*"))  # no temporary files left behind


def test_run_records_its_parameters_and_losses(tmp_path, images):
    _train("stylegan", images, tmp_path, 4, keep_checkpoints=[2])
    params = read_params(tmp_path)
    assert params["model"] == "stylegan" and params["seed"] == 0 and params["steps"] == 4
    assert params["image_shape"] == [2, 16, 16] and params["channels"] == ["a", "b"]
    assert params["config"]["keep_checkpoints"] == [2] and params["config"]["z_dim"] == 16
    assert resolve_config("stylegan", params["config"]).channel_max == 16
    log = read_log(tmp_path)
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss_G"]) and np.isfinite(r["loss_D"]) and r["images_per_s"] > 0 for r in log)
    assert "loss_r1" in log[0] and "loss_pl" in log[0] and "loss_r1" not in log[1]


def test_kimg_sets_the_number_of_steps(tmp_path, images):
    result = train("ddpm", images, "tiny", tmp_path, kimg=0.006, batch_size=2, progress=False, **TINY["ddpm"])
    assert result.step == 3


@pytest.mark.parametrize("model", ["ddpm", "stylegan"])
def test_sampling_is_deterministic_for_a_seed(tmp_path, images, model):
    _train(model, images, tmp_path, 2)
    options = {"steps": 5} if model == "ddpm" else {}
    a = sample(tmp_path, 5, seed=1, batch_size=3, **options)
    b = sample(tmp_path, 5, seed=1, batch_size=3, **options)
    c = sample(tmp_path, 5, seed=2, batch_size=3, **options)
    assert a.images.dtype == np.uint8 and a.images.shape == (5, 2, 16, 16)
    assert a.channels == ("a", "b") and len(set(a.names)) == 5
    assert np.array_equal(a.images, b.images)
    assert not np.array_equal(a.images, c.images)


def test_sampling_into_a_file_gives_the_same_images(tmp_path, images):
    _train("stylegan", images, tmp_path, 1)
    in_memory = sample(tmp_path, 5, seed=0, batch_size=2)
    on_disk = sample(tmp_path, 5, seed=0, batch_size=2, out=tmp_path / "samples.npy")
    assert isinstance(on_disk.images, np.memmap)
    assert np.array_equal(np.load(tmp_path / "samples.npy"), in_memory.images)
    assert not list(tmp_path.glob(".samples*"))


def test_sampling_leaves_the_global_random_state_alone(tmp_path, images):
    _train("stylegan", images, tmp_path, 1)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    sample(tmp_path, 2, seed=0)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize(
    "model, overrides, message",
    [
        ("stylegan", {"image_size": 24}, "power of two"),
        ("ddpm", {"image_channels": 1}, r"has 2 channels \('a', 'b'\) but the 'tiny' config expects"),
        ("ddpm", {"batch_size": 8}, "has 6 images, fewer than batch_size=8"),
        ("ddpm", {"channel_mult": (1, 2, 2, 2, 2, 2)}, "multiple of 32"),
    ],
)
def test_bad_setup_fails_before_anything_is_written(tmp_path, images, model, overrides, message):
    with pytest.raises(ValueError, match=message):
        _train(model, images, tmp_path / "run", 2, **overrides)
    assert not (tmp_path / "run").exists()


def test_stylegan_rejects_images_that_are_not_a_power_of_two(tmp_path):
    odd = ImageSet(np.zeros((4, 1, 24, 24), np.uint8), list("abcd"), range(4), ["x"])
    with pytest.raises(ValueError, match="power of two"):
        train("stylegan", odd, "tiny", tmp_path / "run", steps=1, batch_size=2, progress=False)
    assert not (tmp_path / "run").exists()


def test_paper_config_insists_on_its_image_size(tmp_path, images):
    with pytest.raises(ValueError, match="16×16 but the 'paper' config expects image_size=256"):
        train("ddpm", images, "paper", tmp_path / "run", steps=1, batch_size=2, progress=False)


def test_resuming_with_other_settings_is_refused(tmp_path, images):
    _train("ddpm", images, tmp_path, 1)
    with pytest.raises(ValueError, match=r"differs in seed, config.lr"):
        _train("ddpm", images, tmp_path, 2, seed=1, lr=5e-4)
    _train("ddpm", images, tmp_path, 2, keep_checkpoints=[1])  # bookkeeping may change
    assert list(list_checkpoints(tmp_path)) == [1, 2]


def test_unknown_config_field_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown DDPMConfig fields \['base_channel'\]"):
        resolve_config("ddpm", "tiny", base_channel=64)


def test_train_and_sample_commands(tmp_path, images, capsys):
    images.save(tmp_path / "data")
    parser = argparse.ArgumentParser()
    add_model_commands(parser.add_subparsers())
    run_dir = tmp_path / "run"
    args = parser.parse_args(
        ["train", str(tmp_path / "data"), "--model", "ddpm", "--steps", "2", "--run-dir", str(run_dir),
         "--seed", "3", "--keep", "1", "--set", "base_channels=8", "--set", "channel_mult=[1, 2]",
         "--set", "batch_size=2", "--no-progress"]
    )  # fmt: skip
    assert args.func(args) == 0
    assert list(list_checkpoints(run_dir)) == [1, 2]
    assert read_params(run_dir)["seed"] == 3

    args = parser.parse_args(["sample", str(run_dir), "-n", "3", "--steps", "4", "--checkpoint", "1"])
    assert args.func(args) == 0
    assert np.load(run_dir / "samples.npy").shape == (3, 2, 16, 16)
    args = parser.parse_args(
        ["sample", str(run_dir), "-n", "3", "--steps", "4", "--out", str(tmp_path / "syn")]
    )
    assert args.func(args) == 0
    out = ImageSet.load(tmp_path / "syn")
    assert out.images.shape == (3, 2, 16, 16) and out.provenance["checkpoint_step"] == 2
    assert "wrote 3 samples" in capsys.readouterr().out


def test_bench_train_reports_speed_of_both_tiny_models(capsys, monkeypatch):
    # The tiny configs at demo size take seconds; shrink them so the command itself is what is tested.
    original = resolve_config
    monkeypatch.setattr(
        "memstudy.models.bench.resolve_config",
        lambda model, name: original(model, name, batch_size=4, **TINY[model]),
    )
    monkeypatch.setattr("memstudy.models.bench.BENCH_SHAPES", {"tiny": (1, 16, 16)})
    parser = argparse.ArgumentParser()
    add_bench_train_command(parser.add_subparsers())
    args = parser.parse_args(["train", "--json", "--steps", "2", "--repeats", "1"])
    assert args.func(args) == 0
    results = json.loads(capsys.readouterr().out)
    assert [(r["model"], r["config"]) for r in results] == [("ddpm", "tiny"), ("stylegan", "tiny")]
    for r in results:
        assert r["seconds_per_step"] > 0
        assert r["images_per_s"] == pytest.approx(r["batch_size"] / r["seconds_per_step"])
