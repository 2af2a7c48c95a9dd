"""ImageSet validation, save/load and the atomic writes behind it."""

from __future__ import annotations

import numpy as np
import pytest

from memstudy.atomic import save_npy
from memstudy.data import ImageSet


def make_set(n=3):
    images = np.arange(n * 2 * 4 * 4, dtype=np.uint8).reshape(n, 2, 4, 4)
    return ImageSet(
        images, [f"s{i}/z{i:03d}" for i in range(n)], [0, 0, 1][:n], ("t1", "seg"), {"loader": "x"}
    )


def test_save_then_load_round_trips_as_a_read_only_memmap(tmp_path):
    original = make_set()
    loaded = ImageSet.load(original.save(tmp_path / "set"))
    assert isinstance(loaded.images, np.memmap) and not loaded.images.flags.writeable
    np.testing.assert_array_equal(loaded.images, original.images)
    assert loaded.names == original.names and loaded.channels == original.channels
    np.testing.assert_array_equal(loaded.groups, original.groups)
    assert loaded.provenance == {"loader": "x"}


def test_subset_and_channel_select_images_and_channels():
    imageset = make_set()
    sub = imageset.subset([2, 0])
    assert sub.names == ("s2/z002", "s0/z000") and sub.groups.tolist() == [1, 0]
    np.testing.assert_array_equal(imageset.channel("seg"), imageset.images[:, 1])
    with pytest.raises(KeyError, match="no channel 'flair'"):
        imageset.channel("flair")


def test_invalid_images_are_rejected_with_the_expected_form():
    with pytest.raises(TypeError, match="must be uint8"):
        ImageSet(np.zeros((1, 1, 4, 4), np.float32), ["a"], [0], ["t1"])
    with pytest.raises(ValueError, match="3 images but 2 names"):
        ImageSet(np.zeros((3, 1, 4, 4), np.uint8), ["a", "b"], [0, 0, 0], ["t1"])
    with pytest.raises(ValueError, match="2 channels but 1 channel names"):
        ImageSet(np.zeros((1, 2, 4, 4), np.uint8), ["a"], [0], ["t1"])


def test_loading_a_folder_without_meta_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a saved ImageSet"):
        ImageSet.load(tmp_path)


def test_a_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "a.npy"
    save_npy(path, np.zeros(3))

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_npy(path, np.ones(3))
    monkeypatch.undo()
    np.testing.assert_array_equal(np.load(path), np.zeros(3))
    assert [p.name for p in tmp_path.iterdir()] == ["a.npy"]
