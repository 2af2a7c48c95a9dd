"""Tests of the embedded phantom datasets: real layouts, determinism, resumability and plausibility."""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from threadpoolctl import threadpool_limits

from memstudy.data import phantoms
from memstudy.data.brain_phantom import BRATS_AFFINE, BRATS_DIR
from memstudy.data.phantom_tools import COMPLETE_MARKER, smooth_field
from memstudy.data.phantoms import (
    brain_phantom_subject,
    chest_xray_phantom_image,
    ensure_phantom,
    phantom_root,
    write_brain_phantom,
    write_cxr_phantom,
)

FILES = ("t1", "t1ce", "t2", "flair", "seg")
CXR_SIZES = {"train": (10, 10), "val": (1, 1), "test": (3, 3)}


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = a.ravel().astype(np.float64) - a.mean()
    b = b.ravel().astype(np.float64) - b.mean()
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


def subject_path(root: Path, index: int, name: str) -> Path:
    subject = f"BraTS20_Training_{index:03d}"
    return root / BRATS_DIR / subject / f"{subject}_{name}.nii.gz"


def read_subject(root: Path, index: int) -> dict[str, np.ndarray]:
    return {name: np.asarray(nib.load(subject_path(root, index, name)).dataobj) for name in FILES}


@pytest.fixture(scope="module")
def brain_root(tmp_path_factory) -> Path:
    """Three full-size subjects (seed 0: 1 and 3 high grade, 2 low grade), written serially."""
    return write_brain_phantom(
        tmp_path_factory.mktemp("brain"), n_subjects=3, seed=0, workers=1, progress=False
    )


@pytest.fixture(scope="module")
def brain_subjects(brain_root) -> list[dict[str, np.ndarray]]:
    return [read_subject(brain_root, i) for i in (1, 2, 3)]


@pytest.fixture(scope="module")
def cxr_root(tmp_path_factory) -> Path:
    return write_cxr_phantom(
        tmp_path_factory.mktemp("cxr"), n_per_class=CXR_SIZES, seed=0, workers=1, progress=False
    )


# ---------------------------------------------------------------------------------------------- brain


def test_brain_phantom_has_the_brats_2020_layout(brain_root):
    folders = sorted(p.name for p in (brain_root / BRATS_DIR).iterdir() if p.is_dir())
    assert folders == ["BraTS20_Training_001", "BraTS20_Training_002", "BraTS20_Training_003"]
    for index, name in itertools.product((1, 2, 3), FILES):
        image = nib.load(subject_path(brain_root, index, name))
        assert image.shape == (240, 240, 155)
        assert image.get_data_dtype() == (np.uint8 if name == "seg" else np.int16)
        np.testing.assert_array_equal(image.affine, BRATS_AFFINE)
        assert image.header.get_zooms() == (1.0, 1.0, 1.0)
    with open(brain_root / BRATS_DIR / "name_mapping.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["BraTS_2020_subject_ID"] for row in rows] == folders
    assert [row["Grade"] for row in rows] == ["HGG", "LGG", "HGG"]
    marker = json.loads((brain_root / COMPLETE_MARKER).read_text())
    assert marker["seed"] == 0 and marker["n_subjects"] == 3


def test_brain_labels_are_brats_values_inside_a_skull_stripped_brain(brain_subjects):
    for volumes in brain_subjects:
        seg = volumes["seg"]
        assert set(np.unique(seg)) <= {0, 1, 2, 4}
        assert (seg == 2).sum() > 1000  # every subject has edema
        brain = volumes["t1"] > 0
        assert 0.1 < brain.mean() < 0.25  # ~1.3-2 litres of 8.9 million 1 mm voxels
        assert not seg[~brain].any()
        for name in ("t1", "t1ce", "t2", "flair"):
            assert volumes[name].min() == 0
            assert not volumes[name][:10].any() and not volumes[name][:, :5].any()  # background is 0
    high, low = brain_subjects[0]["seg"], brain_subjects[1]["seg"]
    assert {1, 2, 4} <= set(np.unique(high))  # necrosis and an enhancing rim
    assert set(np.unique(low)) == {0, 1, 2}  # low grade: non-enhancing core


def test_tumour_changes_the_sequences_as_in_real_scans(brain_subjects):
    for volumes in brain_subjects:
        seg, t1 = volumes["seg"], volumes["t1"].astype(np.float64)
        healthy = (t1 > 0) & (seg == 0)
        # White matter is the brightest tissue on T1: its upper quartile away from the tumour.
        white = healthy & (t1 > np.percentile(t1[healthy], 75))

        def mean(name, region, volumes=volumes):
            return volumes[name][region].astype(np.float64).mean()

        assert mean("flair", seg == 2) > 1.3 * mean("flair", white)
        assert mean("t2", seg == 2) > 1.3 * mean("t2", white)
        if (seg == 4).any():
            assert mean("t1ce", seg == 4) > 1.3 * mean("t1ce", white)
        if (seg == 1).any():
            assert mean("t1", seg == 1) < 0.8 * mean("t1", white)


def test_subjects_differ_far_more_than_adjacent_slices(brain_subjects):
    # Axial FLAIR slices (FLAIR carries the tumours) at levels with brain in every subject, as rows of
    # centred unit vectors, so that a dot product is a Pearson r.
    levels = np.arange(30, 131)
    stacks = []
    for volumes in brain_subjects:
        rows = volumes["flair"][:, :, levels].reshape(-1, len(levels)).T.astype(np.float64)
        rows -= rows.mean(axis=1, keepdims=True)
        stacks.append(rows / np.linalg.norm(rows, axis=1, keepdims=True))
    adjacent = np.concatenate([np.sum(s[:-1] * s[1:], axis=1) for s in stacks])
    across = [np.sum(a * b, axis=1).max() for a, b in itertools.combinations(stacks, 2)]
    assert np.median(adjacent) > 0.97
    assert max(across) < np.median(adjacent) - 0.05


def test_same_seed_gives_identical_volumes_and_another_seed_differs(brain_root, brain_subjects):
    again = brain_phantom_subject(0, 2)
    for name in FILES:
        np.testing.assert_array_equal(again[name], brain_subjects[1][name])
    other = brain_phantom_subject(1, 2)
    assert pearson(other["t1"], brain_subjects[1]["t1"]) < 0.95
    assert not np.array_equal(other["seg"], brain_subjects[1]["seg"])


def test_resume_rewrites_only_the_missing_subject(brain_root, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(brain_root, root)
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*.nii.gz")}
    missing = subject_path(root, 2, "flair")
    expected = np.asarray(nib.load(missing).dataobj)
    missing.unlink()
    (root / COMPLETE_MARKER).unlink()  # as an interrupted run leaves it

    write_brain_phantom(root, n_subjects=3, seed=0, workers=1, progress=False)

    after = {p: p.stat().st_mtime_ns for p in root.rglob("*.nii.gz")}
    assert after.keys() == before.keys()
    changed = sorted(p.name for p in after if after[p] != before[p])
    assert changed == [f"BraTS20_Training_002_{name}.nii.gz" for name in sorted(FILES)]
    np.testing.assert_array_equal(np.asarray(nib.load(missing).dataobj), expected)
    assert (root / COMPLETE_MARKER).is_file()


def test_complete_set_is_not_rewritten(brain_root):
    before = {p: p.stat().st_mtime_ns for p in brain_root.rglob("*") if p.is_file()}
    write_brain_phantom(brain_root, n_subjects=3, seed=0, workers=1, progress=False)
    assert {p: p.stat().st_mtime_ns for p in brain_root.rglob("*") if p.is_file()} == before


def test_smooth_field_is_the_same_sum_whatever_the_grid_or_the_thread_count():
    spacing, extent = 10.0, 60.0
    centres = np.arange(-spacing, extent + 2 * spacing, spacing)  # the documented lattice: 9 points
    coefficients = np.random.default_rng(5).normal(size=(2, len(centres), len(centres), len(centres)))
    axes = [np.arange(0.0, 40.0), np.arange(3.0, 50.0), np.arange(0.0, 30.0)]
    with threadpool_limits(1):
        whole = smooth_field(coefficients, axes, spacing, [extent] * 3)
    with threadpool_limits(2):
        again = smooth_field(coefficients, axes, spacing, [extent] * 3)
    rows = [
        smooth_field(coefficients, [axes[0][i : i + 1], *axes[1:]], spacing, [extent] * 3) for i in range(40)
    ]
    np.testing.assert_array_equal(again, whole)
    np.testing.assert_array_equal(np.concatenate(rows, axis=1), whole)  # a worker's part of a grid
    # Reference: the field's definition summed term by term. Each point sums 729 terms whose
    # magnitudes add up to at most max|c| (sum_k g_k)^3 / pi^0.75 < 4 * 2.6^3 < 80; float64 rounding of
    # ~30 sequential operations on values that size stays below 30 * 80 * 2.2e-16 ≈ 5e-13.
    bumps = [np.exp(-0.5 * ((a[:, None] - centres[None, :]) / spacing) ** 2) for a in axes]
    reference = np.zeros(whole.shape)
    for i, j, k in itertools.product(range(len(centres)), repeat=3):
        product = bumps[0][:, i, None, None] * bumps[1][None, :, j, None] * bumps[2][None, None, :, k]
        reference += coefficients[:, i, j, k, None, None, None] * product
    np.testing.assert_allclose(whole, reference / math.pi**0.75, rtol=0, atol=1e-12)


def test_brain_phantom_fingerprint_changes_only_with_its_version(brain_subjects):
    # A change detector, not a numeric expectation: the generator is float64 without BLAS, so subject
    # 1 of seed 0 is the same on every CPU. If this fails, the generator's output changed: bump
    # BRAIN_PHANTOM_VERSION (memstudy/data/brain_phantom.py) and record the new pair here.
    digest = hashlib.sha256()
    for name in FILES:
        digest.update(name.encode() + np.ascontiguousarray(brain_subjects[0][name]).tobytes())
    recorded = (2, "e2f6cbc36e8b92a0a4ba565fefb7fa4932139b5db8638012d9c99f4f10baba91")
    assert (phantoms.BRAIN_PHANTOM_VERSION, digest.hexdigest()) == recorded, (
        "brain-phantom output or version changed: bump BRAIN_PHANTOM_VERSION if the output changed, "
        f"then record ({phantoms.BRAIN_PHANTOM_VERSION}, {digest.hexdigest()!r}) in this test"
    )


@pytest.mark.slow
def test_brain_subject_is_identical_with_another_blas_kernel_simd_level_and_thread_count(brain_subjects):
    # Another process with OpenBLAS's generic kernel on one thread and NumPy's SIMD dispatch off
    # (the baseline code paths of an older CPU) must write the same voxels as this one.
    from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__

    dispatched = [f for f in __cpu_dispatch__ if __cpu_features__.get(f)]
    env = {
        **os.environ,
        "OPENBLAS_CORETYPE": "Prescott",
        "OPENBLAS_NUM_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        "NPY_DISABLE_CPU_FEATURES": " ".join(dispatched),
    }
    script = (
        "import hashlib, json\n"
        "from memstudy.data.phantoms import brain_phantom_subject\n"
        "volumes = brain_phantom_subject(0, 1)\n"
        "print(json.dumps({k: hashlib.sha256(v.tobytes()).hexdigest() for k, v in volumes.items()}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    )
    there = json.loads(result.stdout.strip().splitlines()[-1])
    here = {
        name: hashlib.sha256(np.ascontiguousarray(brain_subjects[0][name]).tobytes()).hexdigest()
        for name in FILES
    }
    assert there == here


@pytest.mark.slow
def test_parallel_workers_write_the_same_subjects(brain_root, tmp_path):
    root = write_brain_phantom(tmp_path, n_subjects=2, seed=0, workers=2, progress=False)
    for index in (1, 2):
        for name, volume in read_subject(root, index).items():
            np.testing.assert_array_equal(volume, read_subject(brain_root, index)[name])


# ------------------------------------------------------------------------------------------ chest x-ray


def cxr_files(root: Path) -> list[Path]:
    return sorted((root / "chest_xray").rglob("*.jpeg"))


def test_cxr_phantom_has_the_kermany_layout(cxr_root):
    for split, (n_normal, n_pneumonia) in CXR_SIZES.items():
        normal = sorted(p.name for p in (cxr_root / "chest_xray" / split / "NORMAL").iterdir())
        pneumonia = sorted(p.name for p in (cxr_root / "chest_xray" / split / "PNEUMONIA").iterdir())
        assert len(normal) == n_normal and len(pneumonia) == n_pneumonia
        assert all(re.fullmatch(r"IM-\d{4}-0001\.jpeg", name) for name in normal)
        assert all(re.fullmatch(r"person\d+_(bacteria|virus)_\d+\.jpeg", name) for name in pneumonia)
    names = [p.name for p in cxr_files(cxr_root)]
    assert len(set(names)) == len(names) == 28
    assert {m.group(1) for n in names if (m := re.search(r"_(bacteria|virus)_", n))} == {"bacteria", "virus"}
    assert (cxr_root / COMPLETE_MARKER).is_file()


def test_cxr_images_are_grayscale_some_rgb_of_varied_non_square_sizes(cxr_root):
    sizes, modes = set(), []
    for path in cxr_files(cxr_root):
        with Image.open(path) as image:
            assert image.format == "JPEG"
            sizes.add(image.size)
            modes.append(image.mode)
            if image.mode == "RGB":
                r, g, b = (np.asarray(c, np.int16) for c in image.split())
                assert np.abs(r - g).max() <= 8 and np.abs(g - b).max() <= 8  # gray stored as RGB
    assert set(modes) == {"L", "RGB"} and modes.count("L") > modes.count("RGB")
    assert len(sizes) == 28
    assert all(400 <= w <= 1000 and w != h for w, h in sizes)


def test_cxr_images_are_deterministic_and_differ_from_each_other(cxr_root):
    path = cxr_root / "chest_xray" / "train" / "NORMAL" / "IM-0003-0001.jpeg"
    image, _ = chest_xray_phantom_image(0, (0, 0, 2), None)
    again, _ = chest_xray_phantom_image(0, (0, 0, 2), None)
    np.testing.assert_array_equal(image, again)
    with Image.open(path) as stored:
        written = np.asarray(stored.convert("L"), np.float64)
    assert np.abs(written - image).mean() < 3  # only JPEG loss
    other, _ = chest_xray_phantom_image(1, (0, 0, 2), None)
    assert other.shape != image.shape or pearson(other, image) < 0.95

    small = [np.asarray(Image.open(p).convert("L").resize((128, 128))) for p in cxr_files(cxr_root)]
    r = [pearson(a, b) for a, b in itertools.combinations(small, 2)]
    assert max(r) < 0.97 and np.median(r) < 0.8


def test_pneumonia_makes_the_lung_fields_more_opaque():
    keys = [(0, 0, i) for i in range(12)]
    normal = [chest_xray_phantom_image(0, key, None) for key in keys]
    paired = [chest_xray_phantom_image(0, key, ("bacteria", "virus")[i % 2]) for i, key in enumerate(keys)]
    for (clear, lungs), (ill, _) in zip(normal, paired, strict=True):
        assert ill[lungs].mean() > clear[lungs].mean() + 3  # same chest, with pneumonia
    independent = [chest_xray_phantom_image(0, (0, 1, i), ("bacteria", "virus")[i % 2]) for i in range(12)]
    assert np.mean([im[lungs].mean() for im, lungs in independent]) > np.mean(
        [im[lungs].mean() for im, lungs in normal]
    )


def test_cxr_resume_rewrites_only_the_missing_image(cxr_root, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(cxr_root, root)
    before = {p: p.stat().st_mtime_ns for p in cxr_files(root)}
    missing = next(p for p in before if "virus" in p.name)
    missing.unlink()

    write_cxr_phantom(root, n_per_class=CXR_SIZES, seed=0, workers=1, progress=False)

    after = {p: p.stat().st_mtime_ns for p in cxr_files(root)}
    assert after.keys() == before.keys()
    assert [p for p in after if after[p] != before[p]] == [missing]


# ------------------------------------------------------------------------------------------------ cache


def test_phantom_root_names_version_seed_and_size(monkeypatch, tmp_path):
    monkeypatch.setenv("MEMSTUDY_CACHE", str(tmp_path))
    root = phantom_root("brain-phantom", seed=3, n_subjects=7)
    version = f"{phantoms.BRAIN_PHANTOM_VERSION}-nilearn{metadata.version('nilearn')}"
    assert root == tmp_path / "phantoms" / f"brain-phantom-v{version}-seed3-n7"
    cxr = phantom_root("cxr-phantom", n_per_class={"train": (5, 6), "test": (1, 2)})
    assert cxr.name == f"cxr-phantom-v{phantoms.CXR_PHANTOM_VERSION}-seed0-train5x6-test1x2"
    with pytest.raises(ValueError, match="unknown phantom 'brats'"):
        phantom_root("brats")
    with pytest.raises(ValueError, match="unknown splits"):
        phantom_root("cxr-phantom", n_per_class={"training": (1, 1)})


def test_ensure_phantom_generates_once_into_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("MEMSTUDY_CACHE", str(tmp_path))
    sizes = {"val": (1, 2)}
    root = ensure_phantom("cxr-phantom", n_per_class=sizes, progress=False)
    assert root == phantom_root("cxr-phantom", n_per_class=sizes)
    assert json.loads((root / COMPLETE_MARKER).read_text())["n_per_class"] == {"val": [1, 2]}
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    assert len(before) == 4
    assert ensure_phantom("cxr-phantom", n_per_class=sizes, progress=False) == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == before
