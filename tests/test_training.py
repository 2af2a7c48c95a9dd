"""Shared training and sampling: [-1, 1] mapping, mirroring, checkpoints, resume, determinism, errors, CLI."""

from __future__ import annotations

import argparse
import json
import re

import numpy as np
import pytest
import torch

from memstudy.cli import main
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
from memstudy.models.command import add_bench_train_command
from memstudy.models.ddpm import DDPMTrainer
from memstudy.models.training import derive_seed

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_uint8_round_trip_through_model_range_is_exact():
    levels = np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16)
    x = to_model_range(levels)
    assert x.dtype == torch.float32
    assert x.min().item() == -1.0 and x.max().item() == 1.0
    assert np.array_equal(to_uint8(x), levels)
    assert np.array_equal(to_uint8(torch.tensor([-3.0, -1.0, 0.0, 1.0, 2.5])), [0, 0, 128, 255, 255])


@pytest.mark.parametrize("model", ["ddpm", "stylegan"])
def test_resume_reaches_the_same_weights_as_an_uninterrupted_run(
    tmp_path, training_images, model, train_tiny, trainer_tensors
):
    # With mirroring on, so that the flips of a resumed run are those of the uninterrupted one too.
    straight = train_tiny(model, training_images, tmp_path / "straight", 6, mirror=True)
    train_tiny(model, training_images, tmp_path / "resumed", 3, mirror=True)
    resumed = train_tiny(model, training_images, tmp_path / "resumed", 6, mirror=True)

    a, b = trainer_tensors(straight), trainer_tensors(resumed)
    assert a.keys() == b.keys() and len(a) > 10
    mismatched = [k for k in a if not torch.equal(a[k], b[k])]
    assert not mismatched, f"resume differs in {mismatched[:5]}"
    assert [r["step"] for r in read_log(tmp_path / "resumed")] == list(range(1, 7))
    assert [r["loss" if model == "ddpm" else "loss_G"] for r in read_log(tmp_path / "resumed")] == [
        r["loss" if model == "ddpm" else "loss_G"] for r in read_log(tmp_path / "straight")
    ]


def test_killed_training_resumes_from_its_last_checkpoint(
    tmp_path, training_images, monkeypatch, train_tiny, trainer_tensors
):
    straight = train_tiny("ddpm", training_images, tmp_path / "straight", 6)

    original = DDPMTrainer.train_step

    def crash_at_step_5(self, x, step):
        if step == 4:
            raise KeyboardInterrupt("killed")
        return original(self, x, step)

    monkeypatch.setattr(DDPMTrainer, "train_step", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        train_tiny("ddpm", training_images, tmp_path / "killed", 6, checkpoint_every=2)
    assert list(list_checkpoints(tmp_path / "killed")) == [4]
    monkeypatch.setattr(DDPMTrainer, "train_step", original)

    resumed = train_tiny("ddpm", training_images, tmp_path / "killed", 6, checkpoint_every=2)
    a, b = trainer_tensors(straight), trainer_tensors(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in read_log(tmp_path / "killed")] == list(range(1, 7))


def test_checkpoints_asked_for_are_kept_and_others_pruned(tmp_path, training_images, train_tiny):
    result = train_tiny("ddpm", training_images, tmp_path, 7, checkpoint_every=3, keep_checkpoints=[2, 5])
    assert list(list_checkpoints(tmp_path)) == [2, 5, 7]
    assert result.checkpoint == list_checkpoints(tmp_path)[7]
    state = torch.load(result.checkpoint, weights_only=True)
    assert state["step"] == 7 and state["model"] == "ddpm"
    early = sample(tmp_path, 2, seed=0, steps=5, checkpoint=2)
    assert early.provenance["checkpoint_step"] == 2
    with pytest.raises(FileNotFoundError, match=r"no checkpoint at step 4; kept steps: \[2, 5, 7\]"):
        sample(tmp_path, 2, seed=0, checkpoint=4)
    assert not list(tmp_path.rglob(".*"))  # no temporary files left behind


def test_run_records_its_parameters_and_losses(tmp_path, training_images, train_tiny):
    train_tiny("stylegan", training_images, tmp_path, 4, keep_checkpoints=[2])
    params = read_params(tmp_path)
    assert params["model"] == "stylegan" and params["seed"] == 0 and params["steps"] == 4
    assert params["image_shape"] == [2, 16, 16] and params["channels"] == ["a", "b"]
    assert params["config"]["keep_checkpoints"] == [2] and params["config"]["z_dim"] == 16
    assert resolve_config("stylegan", params["config"]).channel_max == 16
    log = read_log(tmp_path)
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss_G"]) and np.isfinite(r["loss_D"]) and r["images_per_s"] > 0 for r in log)
    assert "loss_r1" in log[0] and "loss_pl" in log[0] and "loss_r1" not in log[1]


def test_kimg_sets_the_number_of_steps(tmp_path, training_images, tiny_model_options):
    options = tiny_model_options["ddpm"]
    result = train(
        "ddpm", training_images, "tiny", tmp_path, kimg=0.006, batch_size=2, progress=False, **options
    )
    assert result.step == 3


def test_sampling_leaves_the_global_random_state_alone(tmp_path, training_images, train_tiny):
    train_tiny("stylegan", training_images, tmp_path, 1)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    sample(tmp_path, 2, seed=0)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("mirror", [False, True])
def test_mirror_flips_the_images_each_step_draws(tmp_path, training_images, train_tiny, monkeypatch, mirror):
    batches = []

    def record(self, x, step):
        batches.append(to_uint8(x))
        return {"loss": 0.0}

    monkeypatch.setattr(DDPMTrainer, "train_step", record)
    seed, steps, batch_size = 3, 9, 2
    train_tiny("ddpm", training_images, tmp_path, steps, seed=seed, batch_size=batch_size, mirror=mirror)

    originals = training_images.images
    mirrored = originals[..., ::-1]  # left–right: the last (width) axis
    assert not any(np.array_equal(a, b) for a, b in zip(originals, mirrored, strict=True))
    assert len(batches) == steps
    used, flips = [], []
    for step, batch in enumerate(batches):
        # The rule a run's reproducibility rests on: image j of the global batch of step s is flipped
        # when the j-th uniform of torch.rand seeded by derive_seed(seed, 4, s) is below 1/2 (stream 4).
        generator = torch.Generator().manual_seed(derive_seed(seed, 4, step))
        expected = (torch.rand(batch_size, generator=generator) < 0.5).numpy() & mirror
        for image, flip in zip(batch, expected, strict=True):
            source = mirrored if flip else originals
            found = [i for i in range(len(originals)) if np.array_equal(image, source[i])]
            assert len(found) == 1, f"step {step}: not image {'mirrored' if flip else 'as is'}"
            used.append(found[0])
        flips.extend(expected)
    # Mirroring leaves the data order alone: each epoch (3 steps) shows every image once.
    assert all(sorted(used[e : e + 6]) == list(range(6)) for e in range(0, len(used), 6))
    assert (0 < sum(flips) < len(flips)) == mirror


@pytest.mark.parametrize(
    "model, overrides, message",
    [
        ("stylegan", {"image_size": 24}, "power of two"),
        ("ddpm", {"image_channels": 1}, r"has 2 channels \('a', 'b'\) but the 'tiny' config expects"),
        ("ddpm", {"batch_size": 8}, "has 6 images, fewer than batch_size=8"),
        ("ddpm", {"channel_mult": (1, 2, 2, 2, 2, 2)}, "multiple of 32"),
    ],
)
def test_bad_setup_fails_before_anything_is_written(
    tmp_path, training_images, model, overrides, message, train_tiny
):
    with pytest.raises(ValueError, match=message):
        train_tiny(model, training_images, tmp_path / "run", 2, **overrides)
    assert not (tmp_path / "run").exists()


def test_stylegan_rejects_images_that_are_not_a_power_of_two(tmp_path):
    odd = ImageSet(np.zeros((4, 1, 24, 24), np.uint8), list("abcd"), range(4), ["x"])
    with pytest.raises(ValueError, match="power of two"):
        train("stylegan", odd, "tiny", tmp_path / "run", steps=1, batch_size=2, progress=False)
    assert not (tmp_path / "run").exists()


def test_paper_config_insists_on_its_image_size(tmp_path, training_images):
    with pytest.raises(ValueError, match="16×16 but the 'paper' config expects image_size=256"):
        train("ddpm", training_images, "paper", tmp_path / "run", steps=1, batch_size=2, progress=False)


def test_resuming_with_other_settings_is_refused(tmp_path, training_images, train_tiny):
    train_tiny("ddpm", training_images, tmp_path, 1)
    with pytest.raises(ValueError, match=r"differs in seed, config.mirror, config.lr"):
        train_tiny("ddpm", training_images, tmp_path, 2, seed=1, lr=5e-4, mirror=True)
    train_tiny("ddpm", training_images, tmp_path, 2, keep_checkpoints=[1])  # bookkeeping may change
    assert list(list_checkpoints(tmp_path)) == [1, 2]


def test_unknown_config_field_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown DDPMConfig fields \['base_channel'\]"):
        resolve_config("ddpm", "tiny", base_channel=64)


def test_train_and_sample_commands(tmp_path, training_images, capsys):
    training_images.save(tmp_path / "data")
    run_dir = tmp_path / "run"
    status = main(
        ["train", str(tmp_path / "data"), "--model", "ddpm", "--steps", "2", "--run-dir", str(run_dir),
         "--seed", "3", "--keep", "1", "--set", "base_channels=8", "--set", "channel_mult=[1, 2]",
         "--set", "batch_size=2", "--no-progress"]
    )  # fmt: skip
    assert status == 0
    assert list(list_checkpoints(run_dir)) == [1, 2]
    assert read_params(run_dir)["seed"] == 3

    sample_args = ["sample", str(run_dir), "-n", "3", "--steps", "4", "--no-progress"]
    assert main([*sample_args, "--checkpoint", "1", "--seed", "5"]) == 0
    first = run_dir / "samples" / "step_00000001-seed5"
    assert f"to {first}" in capsys.readouterr().out
    written = ImageSet.load(first)
    assert written.images.shape == (3, 2, 16, 16) and written.names[0] == "sample_000000"
    assert written.provenance["checkpoint_step"] == 1 and written.provenance["seed"] == 5
    assert str(run_dir) in written.provenance["run_dir"]

    # "last" is step 2, a folder of its own; a second draw into an existing folder is refused.
    assert main(sample_args) == 0
    assert ImageSet.load(run_dir / "samples" / "step_00000002-seed0").provenance["checkpoint_step"] == 2
    before = (first / "images.npy").read_bytes()
    assert main([*sample_args, "--checkpoint", "1", "--seed", "5", "-n", "2"]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert (first / "images.npy").read_bytes() == before

    assert main([*sample_args, "--checkpoint", "1", "--seed", "5", "-n", "2", "--force"]) == 0
    assert len(ImageSet.load(first)) == 2
    assert main([*sample_args, "--out", str(tmp_path / "syn")]) == 0
    assert ImageSet.load(tmp_path / "syn").provenance["checkpoint_step"] == 2
    assert not list(tmp_path.rglob(".*"))  # no temporary or set-aside folders left behind


def test_a_failed_forced_sample_keeps_the_old_output(tmp_path, training_images, train_tiny, monkeypatch):
    run_dir = tmp_path / "run"
    train_tiny("stylegan", training_images, run_dir, 1)
    out = tmp_path / "syn"
    assert main(["sample", str(run_dir), "-n", "2", "--out", str(out), "--no-progress"]) == 0
    before = ImageSet.load(out).images.copy()

    def broken_sample(*args, **kwargs):
        raise ValueError("sampling failed")

    monkeypatch.setattr("memstudy.models.sampling.sample", broken_sample)
    assert main(["sample", str(run_dir), "-n", "3", "--out", str(out), "--force", "--no-progress"]) == 2
    assert np.array_equal(ImageSet.load(out).images, before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "syn"]


@pytest.fixture
def trained_run(tmp_path, training_images, train_tiny) -> tuple:
    """A saved ImageSet folder and a one-step DDPM run on it."""
    training_images.save(tmp_path / "data")
    train_tiny("ddpm", training_images, tmp_path / "run", 1)
    return tmp_path / "data", tmp_path / "run"


@pytest.mark.parametrize(
    "command, message",
    [
        (["train", "{tmp}/nothing", "--steps", "1", "--run-dir", "{tmp}/new"], "nothing does not exist"),
        (["train", "{tmp}", "--steps", "1", "--run-dir", "{tmp}/new"], "is not a saved ImageSet folder"),
        (["train", "{data}", "--steps", "1", "--run-dir", "{data}/meta.json"], "is a file, not a folder"),
        (
            ["train", "{data}", "--steps", "1", "--run-dir", "{tmp}/new", "--config", "huge"],
            "unknown ddpm config 'huge'",
        ),
        (
            ["train", "{data}", "--steps", "1", "--run-dir", "{tmp}/new", "--set", "batch_size=abc"],
            "DDPMConfig.batch_size must be int, got 'abc'",
        ),
        (
            ["train", "{data}", "--steps", "1", "--run-dir", "{tmp}/new", "--set", "lr"],
            "--set expects KEY=VALUE",
        ),
        (
            [
                "train",
                "{data}",
                "--steps",
                "1",
                "--run-dir",
                "{tmp}/new",
                "--set",
                "batch_size=2",
                "--device",
                "gpu7",
            ],
            "unknown device 'gpu7'",
        ),
        (
            ["train", "{data}", "--steps", "1", "--run-dir", "{tmp}/new", "--set", "batch_size=64"],
            "fewer than batch_size=64",
        ),
        (["train", "{data}", "--steps", "0", "--run-dir", "{tmp}/new"], "expected a positive integer"),
        (
            ["train", "{data}", "--steps", "2", "--run-dir", "{run}", "--set", "batch_size=2", "--seed", "4"],
            "differs in seed",
        ),
        (["sample", "{tmp}", "-n", "2"], "not a training run"),
        (["sample", "{run}", "-n", "2", "--checkpoint", "7"], r"no checkpoint at step 7; kept steps: \[1\]"),
        (["sample", "{run}", "-n", "2", "--checkpoint", "best"], "expected 'last' or a step number"),
        (["sample", "{run}", "-n", "0"], "expected a positive integer"),
        (["sample", "{run}", "-n", "2", "--out", "{data}/meta.json", "--force"], "is a file"),
        (["bench", "train", "--configs", "huge"], "unknown config 'huge'"),
        (["bench", "train", "--steps", "-1"], "expected a positive integer"),
    ],
)
def test_user_errors_print_one_line_and_exit_2(trained_run, tmp_path, capsys, command, message):
    data, run = trained_run
    argv = [part.format(tmp=tmp_path, data=data, run=run) for part in command]
    try:
        status = main(argv)
    except SystemExit as exit_:  # argparse exits for a bad option value
        status = exit_.code
    assert status == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_bench_train_reports_speed_of_both_tiny_models(capsys, monkeypatch, tiny_model_options):
    # The tiny configs at demo size take seconds; shrink them so the command itself is what is tested.
    original = resolve_config
    monkeypatch.setattr(
        "memstudy.models.bench.resolve_config",
        lambda model, name: original(model, name, batch_size=4, **tiny_model_options[model]),
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


def test_mirror_is_on_only_where_the_authors_flipped():
    # NVlabs' --mirror=1 in the authors' StyleGAN runs; no augmentation in their DDPM runs or in tiny.
    assert resolve_config("stylegan", "paper").mirror
    assert not resolve_config("stylegan", "tiny").mirror
    assert not resolve_config("ddpm", "paper").mirror
    assert not resolve_config("ddpm", "tiny").mirror
