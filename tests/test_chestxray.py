"""The chest x-ray loader: the Kermany layout and its clutter, resize policy, groups, bad input."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from conftest import write_xray
from PIL import Image

from memstudy.data import load_chestxray
from memstudy.data.chestxray import patient_key, stratified_patient_order


def test_reads_the_split_and_ignores_macos_clutter_and_the_nested_copy(kermany_root):
    imageset = load_chestxray(kermany_root, size=32, progress=False)
    assert imageset.names == (
        "NORMAL/IM-0001-0001.jpeg",
        "NORMAL/IM-0001-0002.jpeg",
        "NORMAL/NORMAL2-IM-0007-0001.jpeg",
        "PNEUMONIA/person1_bacteria_1.jpeg",
        "PNEUMONIA/person1_bacteria_2.jpeg",
        "PNEUMONIA/person3_virus_15.jpeg",
    )
    assert imageset.images.shape == (6, 1, 32, 32) and imageset.channels == ("gray",)
    assert imageset.provenance["classes"] == ["NORMAL"] * 3 + ["PNEUMONIA"] * 3


def test_root_may_be_the_chest_xray_folder_itself(kermany_root):
    imageset = load_chestxray(kermany_root / "chest_xray", split="test", size=16, progress=False)
    assert len(imageset) == 6


def test_images_of_one_patient_share_a_group(kermany_root):
    groups = load_chestxray(kermany_root, size=16, progress=False).groups.tolist()
    assert groups[0] == groups[1]  # IM-0001-0001 and IM-0001-0002
    assert groups[3] == groups[4]  # person1_bacteria_1 and _2
    assert len(set(groups)) == 4


def test_a_patients_group_is_the_same_in_every_split_and_subset(kermany_root):
    # Numbered per load, train and test would give different children the same group, and a
    # held-out baseline would see shared subjects (or miss really shared ones).
    def by_patient(imageset):
        pairs = zip(imageset.names, imageset.groups.tolist(), strict=True)
        return {patient_key(*name.split("/")): group for name, group in pairs}

    for name in ("IM-0001-0001.jpeg", "IM-0001-0002.jpeg"):  # the test split lacks one patient
        (kermany_root / "chest_xray" / "test" / "NORMAL" / name).unlink()
    train = by_patient(load_chestxray(kermany_root, size=16, progress=False))
    test = by_patient(load_chestxray(kermany_root, split="test", size=16, progress=False))
    subset = by_patient(load_chestxray(kermany_root, size=16, n_subjects=2, progress=False))
    assert len(test) == 3 and test.items() <= train.items()  # same patient names, same groups
    assert subset.items() <= train.items()
    assert len(set(train.values())) == len(train) == 4


def test_resize_centre_crops_to_a_square_before_resizing(kermany_root):
    path = kermany_root / "chest_xray" / "val" / "NORMAL" / "IM-0001-0001.jpeg"  # 120 wide, 90 high
    original = np.asarray(Image.open(path).convert("L"))
    expected = np.asarray(Image.fromarray(original[:, 15:105]).resize((30, 30), Image.Resampling.LANCZOS))
    imageset = load_chestxray(kermany_root, split="val", size=30, progress=False)
    np.testing.assert_array_equal(imageset.images[0, 0], expected)


def test_rgb_images_become_grayscale(kermany_root):
    path = kermany_root / "chest_xray" / "train" / "PNEUMONIA" / "person3_virus_15.jpeg"
    assert Image.open(path).mode == "RGB"
    imageset = load_chestxray(kermany_root, size=16, progress=False)
    assert imageset.images.dtype == np.uint8 and imageset.images[5].std() > 0


def test_corrupt_jpeg_names_the_file_or_is_skipped(kermany_root):
    path = kermany_root / "chest_xray" / "train" / "NORMAL" / "IM-0001-0002.jpeg"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"IM-0001-0002\.jpeg: cannot read the image"):
        load_chestxray(kermany_root, size=16, progress=False)
    skipped = load_chestxray(kermany_root, size=16, on_error="skip", progress=False)
    assert len(skipped) == 5 and len(skipped.provenance["skipped"]) == 1
    assert "NORMAL/IM-0001-0002.jpeg" not in skipped.names


def test_empty_class_folders_and_foreign_roots_are_rejected(tmp_path):
    for label in ("NORMAL", "PNEUMONIA"):
        (tmp_path / "chest_xray" / "train" / label).mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"train: no images"):
        load_chestxray(tmp_path, progress=False)
    (tmp_path / "other").mkdir()
    with pytest.raises(FileNotFoundError, match="not a chest x-ray layout"):
        load_chestxray(tmp_path / "other", progress=False)
    with pytest.raises(ValueError, match="split must be one of"):
        load_chestxray(tmp_path, split="validation", progress=False)


def test_n_subjects_keeps_all_images_of_patients_from_both_classes(kermany_root):
    imageset = load_chestxray(kermany_root, size=16, n_subjects=2, progress=False)
    # Two patients per class in the fixture: a stratified draw of two takes one of each, whole.
    patients = {name.split("/")[0]: set() for name in imageset.names}
    for name, group in zip(imageset.names, imageset.groups.tolist(), strict=True):
        patients[name.split("/")[0]].add(group)
    assert sorted(patients) == ["NORMAL", "PNEUMONIA"] and all(len(g) == 1 for g in patients.values())
    everything = load_chestxray(kermany_root, size=16, progress=False)
    for group in set(imageset.groups.tolist()):
        assert (imageset.groups == group).sum() == (everything.groups == group).sum()
    with pytest.raises(ValueError, match="n_subjects=5, but the train split has 4 patients"):
        load_chestxray(kermany_root, n_subjects=5, progress=False)


@pytest.fixture
def unbalanced_root(tmp_path):
    """10 NORMAL and 30 PNEUMONIA patients (one 8×8 image each), like Kermany's 1:3 imbalance."""
    root = tmp_path / "chest_xray" / "train"
    for i in range(10):
        write_xray(root / "NORMAL" / f"IM-{i:04d}-0001.jpeg", (8, 8), seed=i)
    for i in range(30):
        write_xray(root / "PNEUMONIA" / f"person{i}_bacteria_{i}.jpeg", (8, 8), seed=100 + i)
    return tmp_path


def classes_of(imageset):
    return [name.split("/")[0] for name in imageset.names]


def test_n_subjects_is_a_seeded_class_stratified_nested_draw(unbalanced_root):
    small = load_chestxray(unbalanced_root, size=8, n_subjects=16, progress=False)
    large = load_chestxray(unbalanced_root, size=8, n_subjects=32, progress=False)
    # Shares 1/4 and 3/4: 16 patients are exactly 4 + 12, 32 are 8 + 24.
    assert classes_of(small).count("NORMAL") == 4 and classes_of(small).count("PNEUMONIA") == 12
    assert classes_of(large).count("NORMAL") == 8 and classes_of(large).count("PNEUMONIA") == 24
    assert set(small.names) < set(large.names)
    # Not simply the first files of each class: the draw is shuffled within a class.
    first_files = {f"NORMAL/IM-{i:04d}-0001.jpeg" for i in range(4)}
    assert {n for n in small.names if n.startswith("NORMAL")} != first_files
    again = load_chestxray(unbalanced_root, size=8, n_subjects=16, progress=False)
    assert again.names == small.names


def test_stratified_order_keeps_every_prefix_within_one_patient_of_the_class_shares():
    sizes = {"A": 7, "B": 19, "C": 3}
    patients = {f"{label}/{i}": label for label, n in sizes.items() for i in range(n)}
    order = stratified_patient_order(patients)
    assert sorted(order) == sorted(patients) and stratified_patient_order(patients) == order
    total = sum(sizes.values())
    for t in range(1, total + 1):
        for label, n in sizes.items():
            quota = Fraction(t * n, total)
            count = sum(patients[p] == label for p in order[:t])
            assert math.floor(quota) <= count <= math.ceil(quota), (t, label)
    # Each class's own order depends only on its patients and the seed.
    only_a = stratified_patient_order({p: c for p, c in patients.items() if c == "A"})
    assert [p for p in order if patients[p] == "A"] == only_a
    assert stratified_patient_order(patients, seed=1) != order
