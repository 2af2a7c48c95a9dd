"""The BraTS loader: layouts, the paper's 2D pipeline, hold-out, 3D mode, cache and bad input."""

from __future__ import annotations

import gzip
import os
import re
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import TINY_SHAPE, write_subject

from memstudy.data import load_brats, load_dataset


def subject_dir(root, i):
    return root / "BraTS2020_TrainingData" / "MICCAI_BraTS2020_TrainingData" / f"BraTS20_Training_{i:03d}"


def independent_kept_slices(t1_path, padded_pixels):
    """The paper's slice rule written out per slice, from the raw file, on the unrounded doubles."""
    raw = np.asarray(nib.load(t1_path).dataobj, dtype=np.float64)
    kept = []
    for z in range(raw.shape[2]):
        scaled = raw[:, :, z] / raw.max() * 255
        if np.sum(scaled > 50) > 0.15 * padded_pixels:
            kept.append(z)
    return kept


def matlab_uint8(values):
    """MATLAB's uint8() of doubles, written out with exact decimal rounding (halves away from zero)."""
    rounded = [int(Decimal(float(v)).quantize(Decimal(1), rounding=ROUND_HALF_UP)) for v in values.ravel()]
    return np.clip(np.array(rounded), 0, 255).reshape(values.shape).astype(np.uint8)


def test_kept_slices_match_an_independent_count_of_the_rule(brats20_root):
    imageset = load_brats(brats20_root, pad_to=32, progress=False)
    for i in range(1, 7):
        name = f"BraTS20_Training_{i:03d}"
        expected = independent_kept_slices(subject_dir(brats20_root, i) / f"{name}_t1.nii", 32 * 32)
        got = [int(n.split("/z")[1]) for n in imageset.names if n.startswith(name + "/")]
        assert got == expected
        assert 0 < len(expected) < TINY_SHAPE[2]  # the fixture exercises both outcomes


def test_each_sequence_is_scaled_by_its_own_maximum_and_labels_by_255_over_5(brats20_root):
    imageset = load_brats(brats20_root, pad_to=None, n_subjects=None, progress=False)
    raw = {
        seq: np.asarray(nib.load(subject_dir(brats20_root, 1) / f"BraTS20_Training_001_{seq}.nii").dataobj)
        for seq in ("t2", "seg")
    }
    first = [j for j, n in enumerate(imageset.names) if n.startswith("BraTS20_Training_001/")]
    z = int(imageset.names[first[0]].split("/z")[1])
    t2 = imageset.channel("t2")[first[0]]
    expected_t2 = np.rot90(matlab_uint8(raw["t2"][:, :, z] / raw["t2"].max() * 255))
    np.testing.assert_array_equal(t2, expected_t2)
    seg = imageset.channel("seg")[first]
    assert set(np.unique(seg).tolist()) <= {0, 51, 102, 204}
    kept_z = [int(imageset.names[j].split("/z")[1]) for j in first]
    expected_seg = (
        np.rot90(raw["seg"][:, :, kept_z].transpose(2, 0, 1), axes=(1, 2)).astype(np.int64) * 255 // 5
    )
    np.testing.assert_array_equal(seg, expected_seg)


def test_slices_are_zero_padded_in_the_centre(brats20_root):
    unpadded = load_brats(brats20_root, pad_to=None, progress=False)
    padded = load_brats(brats20_root, pad_to=32, progress=False)
    common = [unpadded.names.index(n) for n in padded.names]
    assert padded.images.shape[-2:] == (32, 32)
    np.testing.assert_array_equal(padded.images[:, :, 4:28, 4:28], unpadded.images[common])
    assert padded.images[:, :, :4].max() == 0 and padded.images[:, :, :, 28:].max() == 0


def test_size_resamples_after_the_pipeline_by_area_averaging(brats20_root):
    full = load_brats(brats20_root, pad_to=32, channels=("t1",), progress=False)
    small = load_brats(brats20_root, pad_to=32, channels=("t1",), size=16, progress=False)
    block_means = full.images.reshape(len(full), 1, 16, 2, 16, 2).mean(axis=(3, 5))
    assert small.images.shape == (len(full), 1, 16, 16)
    assert np.abs(small.images.astype(float) - block_means).max() <= 1


def test_holdout_splits_by_whole_subjects_with_a_fixed_permutation(brats20_root):
    train = load_brats(brats20_root, pad_to=32, holdout=2, progress=False)
    held = load_brats(brats20_root, pad_to=32, holdout=2, split="holdout", progress=False)
    train_subjects, held_subjects = set(train.groups.tolist()), set(held.groups.tolist())
    assert len(held_subjects) == 2 and len(train_subjects) == 4
    assert train_subjects.isdisjoint(held_subjects)
    again = load_brats(brats20_root, pad_to=32, holdout=2, split="holdout", channels=("t1",), progress=False)
    assert set(again.groups.tolist()) == held_subjects


def test_n_subjects_gives_nested_training_sets(brats20_root):
    small = load_brats(brats20_root, pad_to=32, holdout=1, n_subjects=2, progress=False)
    large = load_brats(brats20_root, pad_to=32, holdout=1, n_subjects=4, progress=False)
    assert len(set(small.groups.tolist())) == 2
    assert set(small.groups.tolist()) < set(large.groups.tolist())
    with pytest.raises(ValueError, match="n_subjects=9"):
        load_brats(brats20_root, holdout=1, n_subjects=9, progress=False)


def split_names(root, **options):
    imageset = load_brats(root, pad_to=32, progress=False, **options)
    return list(dict.fromkeys(name.split("/")[0] for name in imageset.names))


def test_a_subjects_split_depends_neither_on_other_subjects_files_nor_on_channels(brats20_root):
    held = split_names(brats20_root, holdout=2, split="holdout")
    train = split_names(brats20_root, holdout=2)
    assert len(held) == 2 and len(train) == 4 and not set(held) & set(train)
    assert split_names(brats20_root, holdout=2, split="holdout", channels=("t1",)) == held
    # A held-out subject without FLAIR is dropped; nobody else changes sides.
    os.remove(subject_dir(brats20_root, int(held[0][-3:])) / f"{held[0]}_flair.nii")
    assert split_names(brats20_root, holdout=2, on_error="skip") == train
    assert split_names(brats20_root, holdout=2, split="holdout", on_error="skip") == held[1:]
    # Asking only for channels the incomplete subject has still loads it, on the same side.
    assert split_names(brats20_root, holdout=2, split="holdout", channels=("t1", "t2")) == held


AUTHORS_DIR = Path(__file__).parents[1] / "memstudy" / "data" / "authors"


def authors_order(year):
    """The shipped list, read as plain text (independently of the loader)."""
    return (AUTHORS_DIR / f"brats{year % 100}_subject_order.txt").read_text().split()


def test_authors_subject_orders_ship_as_package_data():
    from importlib import resources

    for year, n, pattern in ((2020, 369, r"BraTS20_Training_\d{3}"), (2021, 1251, r"BraTS2021_\d{5}")):
        text = resources.files("memstudy.data").joinpath("authors", f"brats{year % 100}_subject_order.txt")
        names = text.read_text().split()
        assert len(names) == len(set(names)) == n
        assert all(re.fullmatch(pattern, name) for name in names)
    assert {f"BraTS20_Training_{i:03d}" for i in range(1, 370)} == set(authors_order(2020))
    notice = resources.files("memstudy.data").joinpath("authors", "LICENSE").read_text()
    assert "Copyright (c) 2023 Muhammad Usman Akbar" in notice and "muhamadusman/Assist" in notice


def test_authors_holdout_follows_the_position_in_their_order(tmp_path):
    order = authors_order(2020)
    # First two and last training subjects (positions 0, 1, 312), first and last held out (313, 368).
    picked = [order[i] for i in (0, 1, 312, 313, 368)]
    for k, name in enumerate(picked):
        write_subject(tmp_path / name, seed=k)
    assert split_names(tmp_path, holdout="authors") == picked[:3]
    assert split_names(tmp_path, holdout="authors", split="holdout") == picked[3:]
    assert split_names(tmp_path, holdout="authors", n_subjects=2) == picked[:2]
    assert split_names(tmp_path, holdout="authors", n_subjects=1) == picked[:1]


def test_authors_holdout_names_subjects_missing_from_their_order(tmp_path, brats21_root):
    write_subject(tmp_path / "BraTS20_Training_370", seed=1)
    write_subject(tmp_path / "BraTS20_Training_001", seed=2)
    with pytest.raises(
        ValueError, match=r"BraTS20_Training_370 not in the authors' BraTS 2020 subject order"
    ):
        load_brats(tmp_path, pad_to=32, holdout="authors", progress=False)
    with pytest.raises(ValueError, match="holdout must be a number of subjects"):
        load_brats(tmp_path, pad_to=32, holdout="paper", progress=False)
    # BraTS 2021: the authors trained on the first 1195 of their order and held out the rest.
    position = {name: i for i, name in enumerate(authors_order(2021))}
    found = sorted(["BraTS2021_00000", "BraTS2021_00002", "BraTS2021_00005"], key=position.get)
    train = [name for name in found if position[name] < 1195]
    assert split_names(brats21_root, year=2021, holdout="authors") == train
    assert split_names(brats21_root, year=2021, holdout="authors", split="holdout") == [
        name for name in found if name not in train
    ]
    assert train and len(train) < len(found)  # the fixture has subjects on both sides


def test_scaling_is_float64_rounded_half_away_and_the_rule_reads_unrounded_values(tmp_path):
    # T1 peaks at 510, so voxel v scales to v / 2 (v / 510 * 255 is exact for these v): 100 → 50.0
    # (on the threshold: not > 50), 100.8 → 50.4 (> 50, though it rounds to 50), 101 → 50.5 and
    # 105 → 52.5 (halves: 51 and 53 away from zero; round-half-even would give 50 and 52).
    shape = (16, 16, 4)
    t1 = np.zeros(shape, np.float32)
    bright = (slice(0, 10), slice(0, 10))  # 100 pixels > 15 % of 256
    t1[(*bright, 0)], t1[(*bright, 1)], t1[(*bright, 2)], t1[(*bright, 3)] = 100, 100.8, 101, 105
    t1[15, 15, 3] = 510
    # A peak at which float32 `v * (255 / peak)` gives 254.99998, truncated to 254.
    t2 = np.where(t1 > 0, 163, 0).astype(np.float32)
    t2[0, 0, 0] = 81  # 81 / 163 * 255 = 126.72...
    folder = tmp_path / "BraTS20_Training_001"
    folder.mkdir()
    volumes = {"t1": t1, "t2": t2, "flair": t1, "t1ce": t1, "seg": np.zeros(shape, np.uint8)}
    for seq, volume in volumes.items():
        nib.save(nib.Nifti1Image(volume, np.eye(4)), folder / f"{folder.name}_{seq}.nii")
    imageset = load_brats(tmp_path, pad_to=None, progress=False)
    assert [name.split("/z")[1] for name in imageset.names] == ["001", "002", "003"]
    for channel, volume in (("t1", t1), ("t2", t2)):
        reference = volume.astype(np.float64) / float(volume.max()) * 255
        for i, z in enumerate((1, 2, 3)):
            expected = np.rot90(matlab_uint8(reference[:, :, z]))
            np.testing.assert_array_equal(imageset.channel(channel)[i], expected)
    assert imageset.channel("t2").max() == 255
    assert imageset.channel("t1")[:, 15, 0].tolist() == [50, 51, 53]  # rot90: voxel (0, 0) → (15, 0)


def test_brats21_layout_with_gzipped_volumes(brats21_root):
    imageset = load_brats(brats21_root, year=2021, pad_to=32, progress=False)
    assert {n.split("/")[0] for n in imageset.names} == {
        "BraTS2021_00000",
        "BraTS2021_00002",
        "BraTS2021_00005",
    }
    assert imageset.channels == ("t1", "t2", "flair", "t1ce", "seg")


def test_subject_355_label_file_name_is_found(tmp_path):
    folder = tmp_path / "MICCAI_BraTS2020_TrainingData" / "BraTS20_Training_355"
    write_subject(folder, seed=3, seg_name="W39_1998.09.19_Segm.nii")
    imageset = load_brats(tmp_path, pad_to=32, progress=False)
    assert imageset.channel("seg").max() > 0


def test_3d_mode_gives_one_brain_cube_per_subject(brats20_root):
    cubes = load_brats(brats20_root, mode="3d", size=16, progress=False)
    assert cubes.images.shape == (6, 5, 16, 16, 16)
    assert cubes.names[0] == "BraTS20_Training_001"
    t1 = cubes.channel("t1")
    # Cropped to the brain: the brain touches the cube's border along its longest axis.
    assert all(t1[i][:, 0].max() > 0 or t1[i][:, -1].max() > 0 or t1[i][0].max() > 0 for i in range(6))


def test_full_size_volume_gives_256_pixel_slices(tmp_path):
    folder = tmp_path / "BraTS20_Training_001"
    paths = write_subject(folder, shape=(240, 240, 155), seed=1, suffix=".nii.gz")
    imageset = load_brats(tmp_path, progress=False)
    expected = independent_kept_slices(paths["t1"], 256 * 256)
    assert imageset.images.shape == (len(expected), 5, 256, 256)
    assert [int(n.split("/z")[1]) for n in imageset.names] == expected


def test_cache_is_reused_and_invalidated_by_a_changed_file(brats20_root):
    first = load_brats(brats20_root, pad_to=32, progress=False)
    again = load_brats(brats20_root, pad_to=32, progress=False)
    assert again.provenance["cache_dir"] == first.provenance["cache_dir"]
    assert isinstance(again.images, np.memmap)
    write_subject(subject_dir(brats20_root, 2), seed=99)  # new content, new mtime
    changed = load_brats(brats20_root, pad_to=32, progress=False)
    assert changed.provenance["cache_dir"] != first.provenance["cache_dir"]
    assert not np.array_equal(
        changed.channel("t1")[changed.groups == 1], first.channel("t1")[first.groups == 1]
    )


def test_missing_flair_names_the_subject(brats20_root):
    os.remove(subject_dir(brats20_root, 3) / "BraTS20_Training_003_flair.nii")
    with pytest.raises(FileNotFoundError, match=r"BraTS20_Training_003: no FLAIR volume \(looked for"):
        load_brats(brats20_root, pad_to=32, progress=False)
    skipped = load_brats(brats20_root, pad_to=32, on_error="skip", progress=False)
    assert len(skipped.provenance["skipped"]) == 1
    assert "BraTS20_Training_003" not in {n.split("/")[0] for n in skipped.names}


def test_truncated_nifti_names_the_file_and_leaves_no_cache(brats21_root, isolated_cache):
    path = brats21_root / "BraTS2021_00002" / "BraTS2021_00002_t2.nii.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"BraTS2021_00002_t2\.nii\.gz: cannot read the T2 NIfTI"):
        load_brats(brats21_root, year=2021, pad_to=32, progress=False)
    assert not any((isolated_cache / "imagesets").iterdir())
    skipped = load_brats(brats21_root, year=2021, pad_to=32, on_error="skip", progress=False)
    assert [s["path"] for s in skipped.provenance["skipped"]] and len(set(skipped.groups.tolist())) == 2


def test_corrupt_gzip_content_is_a_clear_error(brats21_root):
    path = brats21_root / "BraTS2021_00005" / "BraTS2021_00005_t1ce.nii.gz"
    path.write_bytes(gzip.compress(b"this is not a nifti header" * 20))
    with pytest.raises(ValueError, match=r"BraTS2021_00005_t1ce\.nii\.gz: cannot read"):
        load_brats(brats21_root, year=2021, pad_to=32, progress=False)


def test_wrong_volume_shape_names_the_file(brats20_root):
    path = subject_dir(brats20_root, 4) / "BraTS20_Training_004_t1ce.nii"
    nib.save(nib.Nifti1Image(np.ones((24, 20, 12), np.int16), np.eye(4)), path)
    with pytest.raises(
        ValueError, match=r"BraTS20_Training_004_t1ce\.nii: volume shape \(24, 20, 12\), expected"
    ):
        load_brats(brats20_root, pad_to=32, progress=False)


def test_unexpected_label_values_are_an_error(brats21_root):
    path = brats21_root / "BraTS2021_00000" / "BraTS2021_00000_seg.nii.gz"
    nib.save(nib.Nifti1Image(np.full(TINY_SHAPE, 3, np.uint8), np.eye(4)), path)
    with pytest.raises(ValueError, match=r"unexpected label values \[3\]"):
        load_brats(brats21_root, year=2021, pad_to=32, progress=False)


def test_empty_folder_and_foreign_layout_are_rejected(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a BraTS 2020 layout"):
        load_brats(tmp_path / "empty", progress=False)
    (tmp_path / "other" / "chest_xray" / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="not a BraTS 2021 layout"):
        load_brats(tmp_path / "other", year=2021, progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_brats(tmp_path / "nowhere", progress=False)


def test_real_datasets_need_a_root():
    with pytest.raises(ValueError, match="needs root="):
        load_dataset("brats20")
    with pytest.raises(ValueError, match="unknown dataset 'brats19'"):
        load_dataset("brats19")
