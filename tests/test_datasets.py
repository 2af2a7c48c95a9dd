"""Named datasets end to end: the phantoms through the real loaders, the analysis, and `memstudy data`."""

from __future__ import annotations

import numpy as np
import pytest

from memstudy.analysis import dataset_summary, neighbour_statistics
from memstudy.cli import main
from memstudy.data import ImageSet, load_dataset
from memstudy.data.phantoms import write_cxr_phantom


@pytest.fixture(scope="module")
def brain(tmp_path_factory):
    """Four generated phantom subjects read by the BraTS loader, one held out."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MEMSTUDY_CACHE", str(tmp_path_factory.mktemp("brain-cache")))
        return {
            split: load_dataset(
                "brain-phantom", phantom_subjects=4, size=32, holdout=1, split=split, progress=False
            )
            for split in ("train", "holdout")
        }


def test_brain_phantom_loads_through_the_brats_pipeline(brain):
    train, held = brain["train"], brain["holdout"]
    assert train.channels == ("t1", "t2", "flair", "t1ce", "seg") and train.image_shape == (5, 32, 32)
    assert len(np.unique(train.groups)) == 3 and len(np.unique(held.groups)) == 1
    assert set(np.unique(train.channel("seg")).tolist()) <= {0, 51, 102, 204}
    assert dataset_summary(train)["images_per_subject_min"] > 20


def test_adjacent_slices_correlate_more_than_other_subjects_best_match(brain):
    stats = neighbour_statistics(brain["train"])
    assert stats["median_adjacent_r"] > 0.97
    assert stats["median_adjacent_r"] > stats["median_other_subject_r"] + 0.02
    assert np.nanmedian(stats["by_distance"][1]) > np.nanmedian(stats["by_distance"][8])


def test_cxr_phantom_images_are_independent(tmp_path):
    root = write_cxr_phantom(tmp_path / "cxr", n_per_class={"train": (6, 6)}, progress=False)
    images = load_dataset("cxr-phantom", root=root, size=32, progress=False)
    stats = neighbour_statistics(images)
    assert len(images) == 12 and len(np.unique(images.groups)) == 12
    assert stats["by_distance"] is None and stats["median_adjacent_r"] is None
    assert stats["median_other_subject_r"] < 0.99
    # n_subjects draws patients class-stratified, as the real loader does: 2 of each class here.
    subset = load_dataset("cxr-phantom", root=root, size=32, n_subjects=4, progress=False)
    assert sorted(name.split("/")[0] for name in subset.names) == ["NORMAL"] * 2 + ["PNEUMONIA"] * 2


def test_a_small_cxr_phantom_holds_the_first_images_of_a_larger_one(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMSTUDY_CACHE", str(tmp_path / "cache"))
    small = load_dataset(
        "cxr-phantom", phantom_per_class={"train": [2, 1]}, size=32, split="train", progress=False
    )
    # An independent reference: a set of another size, written straight by the generator.
    larger = write_cxr_phantom(tmp_path / "larger", n_per_class={"train": (3, 2)}, progress=False)
    reference = load_dataset("cxr-phantom", root=larger, size=32, split="train", progress=False)
    assert len(small) == 3 and len(reference) == 5
    position = {name: i for i, name in enumerate(reference.names)}
    assert set(small.names) <= set(position)
    for i, name in enumerate(small.names):
        np.testing.assert_array_equal(small.images[i], reference.images[position[name]])


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("cxr-phantom", {"phantom_per_class": {"train": 4}}, "phantom_per_class must map splits"),
        ("cxr-phantom", {"phantom_per_class": {"train": [1, -1]}}, "phantom_per_class must map splits"),
        ("cxr-phantom", {"phantom_per_class": {"tarin": [1, 1]}}, "unknown splits"),
        ("cxr-phantom", {"phantom_subjects": 3}, "cxr-phantom takes phantom_per_class"),
        ("brain-phantom", {"phantom_per_class": {"train": [1, 1]}}, "brain-phantom takes phantom_subjects"),
    ],
)
def test_phantom_size_options_are_checked_with_their_name(tmp_path, monkeypatch, name, options, message):
    monkeypatch.setenv("MEMSTUDY_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=message):
        load_dataset(name, size=32, progress=False, **options)
    phantoms = tmp_path / "cache" / "phantoms"
    assert not phantoms.exists() or not any(phantoms.iterdir())  # refused before anything is written


@pytest.mark.filterwarnings("ignore")  # the correlation engine may warn about images without a match
def test_summaries_leave_out_and_count_nan_values():
    # One subject of four slices, slice z001 constant: it has no defined r with anything, and no
    # image has another subject to match.
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(4, 1, 8, 8), dtype=np.uint8)
    images[1] = 7
    imageset = ImageSet(images, [f"s/z{z:03d}" for z in range(4)], [0] * 4, ["t1"])
    stats = neighbour_statistics(imageset, max_distance=3)
    # Adjacent pairs (0,1), (1,2), (2,3): two involve the constant slice.
    assert stats["adjacent_dropped"] == 2
    a, b = (images[k, 0].ravel().astype(np.float64) for k in (2, 3))
    a, b = a - a.mean(), b - b.mean()
    assert stats["median_adjacent_r"] == pytest.approx(a @ b / np.sqrt((a @ a) * (b @ b)), abs=1e-6)
    assert np.isnan(stats["median_other_subject_r"]) and stats["other_subject_dropped"] == 4


def test_data_prepare_prints_a_one_line_summary(tmp_path, capsys, brats20_root):
    assert (
        main(
            [
                "data",
                "prepare",
                "brats20",
                "--root",
                str(brats20_root),
                "--pad-to",
                "32",
                "--size",
                "16",
                "--holdout",
                "2",
            ]
        )
        == 0
    )
    line = capsys.readouterr().out.strip()
    assert line.startswith("brats20: ") and "shape (5, 16, 16)" in line and "4 subjects" in line
    assert "cached in" in line


def test_data_prepare_says_when_nothing_passes_the_slice_rule(brats20_root, capsys):
    assert main(["data", "prepare", "brats20", "--root", str(brats20_root)]) == 2
    assert "brats20-2d: no images were kept" in capsys.readouterr().err


def test_data_prepare_rejects_options_the_loader_does_not_take(kermany_root, capsys):
    assert main(["data", "prepare", "chestxray", "--root", str(kermany_root), "--holdout", "2"]) == 2
    assert "holdout" in capsys.readouterr().err
