"""The chest x-ray loader: the Kermany layout and its clutter, resize policy, groups, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from memstudy.data import load_chestxray


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


def test_n_subjects_keeps_all_images_of_the_first_patients(kermany_root):
    imageset = load_chestxray(kermany_root, size=16, n_subjects=2, progress=False)
    assert imageset.names == (
        "NORMAL/IM-0001-0001.jpeg",
        "NORMAL/IM-0001-0002.jpeg",
        "NORMAL/NORMAL2-IM-0007-0001.jpeg",
    )
    with pytest.raises(ValueError, match="n_subjects=5, but the train split has 4 patients"):
        load_chestxray(kermany_root, n_subjects=5, progress=False)
