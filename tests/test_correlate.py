"""The correlation search against scipy.stats.pearsonr: values, ranks, shapes, edge cases, memory."""

from __future__ import annotations

import logging
import tracemalloc

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter
from scipy.stats import pearsonr

from memstudy.correlate import Exclude, Matches, merge_matches, release_buffers, topk_pearson
from memstudy.correlate.search import plan_blocks
from memstudy.data import ImageSet


def image_like(rng: np.random.Generator, n: int, shape: tuple[int, ...], smooth: float = 3.0) -> np.ndarray:
    """Smooth random uint8 images with varied brightness and contrast, like anatomy on a background."""
    sigma = (0,) + (smooth,) * len(shape)
    fields = gaussian_filter(rng.standard_normal((n, *shape)), sigma)
    axes = tuple(range(1, fields.ndim))
    fields = (fields - fields.mean(axis=axes, keepdims=True)) / fields.std(axis=axes, keepdims=True)
    extra = (1,) * len(shape)
    mean = rng.uniform(40, 200, (n, *extra))
    spread = rng.uniform(5, 50, (n, *extra))
    return np.clip(fields * spread + mean, 0, 255).astype(np.uint8)


def pearson_matrix(synthetic: np.ndarray, training: np.ndarray) -> np.ndarray:
    """All-pairs r with scipy.stats.pearsonr, the definition we must reproduce."""
    a = synthetic.reshape(len(synthetic), -1).astype(np.float64)
    b = training.reshape(len(training), -1).astype(np.float64)
    return np.array([[pearsonr(x, y)[0] for y in b] for x in a])


def reference_topk(r: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-r, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(r, order, axis=1), order


def test_values_and_indices_equal_pearsonr_on_random_images():
    rng = np.random.default_rng(0)
    synthetic = rng.integers(0, 256, (23, 20, 20), dtype=np.uint8)
    training = rng.integers(0, 256, (71, 20, 20), dtype=np.uint8)
    r = pearson_matrix(synthetic, training)
    values, indices = reference_topk(r, 5)

    matches = topk_pearson(synthetic, training, k=5, backend="numpy")

    assert matches.values.dtype == np.float32 and matches.indices.dtype == np.int64
    np.testing.assert_array_equal(matches.indices, indices)
    np.testing.assert_allclose(matches.values, values, atol=1e-6)


def test_values_equal_pearsonr_on_image_like_256_images_within_1e5():
    rng = np.random.default_rng(1)
    training = image_like(rng, 12, (256, 256), smooth=8)
    # Synthetic images close to some training images: r near 1 is where float32 must stay exact.
    synthetic = np.clip(training[[3, 7, 0]] * 0.8 + 30 + rng.normal(0, 2, (3, 256, 256)), 0, 255).astype(
        np.uint8
    )
    r = pearson_matrix(synthetic, training)

    matches = topk_pearson(synthetic, training, k=12, backend="numpy")

    values, _ = reference_topk(r, 12)
    np.testing.assert_array_equal(matches.indices[:, 0], [3, 7, 0])
    assert np.abs(matches.values - values).max() <= 1e-5


def test_planted_copy_with_affine_intensity_change_is_found_at_rank_one():
    rng = np.random.default_rng(2)
    training = image_like(rng, 200, (48, 48))
    source = training[137].astype(np.float64)
    planted = np.clip(0.6 * source + 70 + rng.normal(0, 1.5, source.shape), 0, 255).astype(np.uint8)
    synthetic = np.concatenate([image_like(rng, 5, (48, 48)), planted[None]])

    matches = topk_pearson(synthetic, training, k=3)

    assert matches.indices[5, 0] == 137
    assert matches.values[5, 0] > 0.98
    assert matches.values[5, 0] == pytest.approx(pearsonr(planted.ravel(), source.ravel())[0], abs=1e-5)
    assert matches.values[5, 1] < 0.9


def test_topk_is_descending_and_ties_are_ordered_by_index():
    rng = np.random.default_rng(3)
    training = image_like(rng, 30, (16, 16))
    training[[4, 21, 9]] = training[12]  # four identical training images
    synthetic = training[[12]].copy()

    matches = topk_pearson(synthetic, training, k=6, chunk_mb=0.05)

    np.testing.assert_array_equal(matches.indices[0, :4], [4, 9, 12, 21])
    np.testing.assert_allclose(matches.values[0, :4], 1.0, atol=1e-6)
    assert np.all(np.diff(matches.values[0]) <= 0)


@pytest.mark.parametrize("chunk_mb", [0.04, 0.05, 64])
def test_chunk_boundaries_do_not_change_the_answer(chunk_mb):
    rng = np.random.default_rng(4)
    synthetic = image_like(rng, 19, (12, 12))
    training = image_like(rng, 97, (12, 12))
    plan = plan_blocks(19, 97, 144, 3, chunk_mb)
    values, indices = reference_topk(pearson_matrix(synthetic, training), 3)

    matches = topk_pearson(synthetic, training, k=3, chunk_mb=chunk_mb)

    if chunk_mb < 1:
        assert 97 % plan.training_rows != 0 and plan.training_rows < 97 and plan.synthetic_rows < 19
    np.testing.assert_array_equal(matches.indices, indices)
    np.testing.assert_allclose(matches.values, values, atol=1e-6)


def test_3d_multichannel_images_are_flattened_whole_or_per_channel():
    rng = np.random.default_rng(5)
    training = rng.integers(0, 256, (15, 3, 4, 6, 6), dtype=np.uint8)  # (N, C, D, H, W)
    synthetic = rng.integers(0, 256, (4, 3, 4, 6, 6), dtype=np.uint8)

    whole = topk_pearson(synthetic, training, k=2)
    second = topk_pearson(synthetic, training, k=2, channel=1)

    for matches, r in (
        (whole, pearson_matrix(synthetic, training)),
        (second, pearson_matrix(synthetic[:, 1], training[:, 1])),
    ):
        values, indices = reference_topk(r, 2)
        np.testing.assert_array_equal(matches.indices, indices)
        np.testing.assert_allclose(matches.values, values, atol=1e-6)


def test_imageset_channel_is_picked_by_name():
    rng = np.random.default_rng(6)
    images = rng.integers(0, 256, (10, 2, 8, 8), dtype=np.uint8)
    imageset = ImageSet(images, tuple(f"s{i}/z{i:03d}" for i in range(10)), np.arange(10), ("t1", "flair"))

    by_name = topk_pearson(imageset, imageset, k=2, channel="flair", exclude="self")

    _, indices = reference_topk(pearson_matrix(images[:, 1], images[:, 1]) - 10 * np.eye(10), 2)
    np.testing.assert_array_equal(by_name.indices, indices)
    with pytest.raises(KeyError, match="no channel 'seg'"):
        topk_pearson(imageset, imageset, channel="seg")


def test_npy_paths_and_saved_imagesets_are_accepted(tmp_path):
    rng = np.random.default_rng(7)
    training = rng.integers(0, 256, (40, 1, 8, 8), dtype=np.uint8)
    synthetic = rng.integers(0, 256, (6, 8, 8), dtype=np.uint8)  # singleton channel axis may differ
    np.save(tmp_path / "synthetic.npy", synthetic)
    folder = ImageSet(training, tuple(map(str, range(40))), np.zeros(40), ("t1",)).save(tmp_path / "train")

    from_files = topk_pearson(tmp_path / "synthetic.npy", str(folder), k=2, chunk_mb=0.02)

    in_memory = topk_pearson(synthetic, training, k=2)
    np.testing.assert_array_equal(from_files.indices, in_memory.indices)
    np.testing.assert_allclose(from_files.values, in_memory.values, atol=1e-7)


def test_constant_images_are_reported_and_never_matched(caplog):
    rng = np.random.default_rng(8)
    training = rng.integers(0, 256, (20, 10, 10), dtype=np.uint8)
    training[[3, 11]] = 0
    synthetic = training[[3, 5]].copy()  # synthetic 0 is constant as well
    synthetic[0] = 200

    with caplog.at_level(logging.WARNING, logger="memstudy.correlate"):
        matches = topk_pearson(synthetic, training, k=18)

    np.testing.assert_array_equal(matches.constant_synthetic, [0])
    np.testing.assert_array_equal(matches.constant_training, [3, 11])
    assert np.isnan(matches.values[0]).all() and (matches.indices[0] == -1).all()
    assert not np.isin(matches.indices[1], [3, 11]).any()
    assert matches.indices[1, 0] == 5 and (matches.indices[1] >= 0).all()
    assert "constant synthetic" in caplog.text and "constant training" in caplog.text


def test_nan_or_inf_input_is_an_error_naming_the_image():
    rng = np.random.default_rng(9)
    training = rng.random((30, 5, 5))
    synthetic = rng.random((4, 5, 5)).astype(np.float32)
    training[17, 2, 3] = np.nan
    with pytest.raises(ValueError, match="training image 17 contains NaN"):
        topk_pearson(synthetic, training, chunk_mb=0.01)
    training[17, 2, 3] = 0.5
    synthetic[2, 0, 0] = np.inf
    with pytest.raises(ValueError, match="synthetic image 2 contains NaN or Inf"):
        topk_pearson(synthetic, training)


def test_mismatched_image_shapes_are_an_error():
    with pytest.raises(
        ValueError, match=r"synthetic images have shape \(8, 8\) per image but training .*\(8, 9\)"
    ):
        topk_pearson(np.zeros((2, 8, 8)), np.ones((3, 8, 9)))


def test_k_larger_than_training_set_is_an_error():
    with pytest.raises(ValueError, match="k must be between 1 and the number of training images \\(3\\)"):
        topk_pearson(np.arange(8.0).reshape(2, 4), np.arange(12.0).reshape(3, 4) ** 2, k=4)


def test_exclude_self_gives_leave_one_out_neighbours():
    rng = np.random.default_rng(10)
    images = image_like(rng, 40, (10, 10))
    r = pearson_matrix(images, images)
    np.fill_diagonal(r, -np.inf)
    values, indices = reference_topk(r, 2)

    matches = topk_pearson(images, images, k=2, exclude="self", chunk_mb=0.03)

    np.testing.assert_array_equal(matches.indices, indices)
    np.testing.assert_allclose(matches.values, values, atol=1e-6)


def test_exclude_same_subject_and_near_slices_using_imageset_groups_and_names():
    rng = np.random.default_rng(11)
    subjects, slices = 5, 8
    # Each subject is a smooth volume, so neighbouring slices correlate strongly (like BraTS).
    volumes = image_like(rng, subjects, (slices, 12, 12), smooth=2.0)
    images = volumes.reshape(subjects * slices, 1, 12, 12)
    groups = np.repeat(np.arange(subjects), slices)
    names = tuple(f"subject{g:03d}/z{z:03d}" for g in range(subjects) for z in range(10, 10 + slices))
    imageset = ImageSet(images, names, groups, ("t1",))
    r = pearson_matrix(images, images)
    same = groups[:, None] == groups[None, :]
    near = same & (np.abs(np.arange(40)[:, None] % slices - np.arange(40)[None, :] % slices) <= 2)

    other_subject = topk_pearson(imageset, imageset, k=3, exclude=Exclude(same_group=True), chunk_mb=0.04)
    far_slices = topk_pearson(imageset, imageset, k=3, exclude={"slice_distance": 2})

    for matches, banned in ((other_subject, same), (far_slices, near)):
        values, indices = reference_topk(np.where(banned, -np.inf, r), 3)
        np.testing.assert_array_equal(matches.indices, indices)
        np.testing.assert_allclose(matches.values, values, atol=1e-6)
    assert (groups[other_subject.indices] != groups[:, None]).all()
    assert (groups[far_slices.indices[:, 0]] == groups).any()  # farther slices of the subject still match


def test_exclude_by_group_without_groups_is_an_error():
    images = np.random.default_rng(14).random((6, 4, 4))
    with pytest.raises(ValueError, match="exclude by group needs groups"):
        topk_pearson(images, images, exclude="group")
    with pytest.raises(ValueError, match="searched against itself"):
        topk_pearson(images, images[:5], exclude="self")


def test_out_of_core_memmap_larger_than_budget_stays_within_chunk_mb(tmp_path):
    rng = np.random.default_rng(12)
    n, side, chunk_mb = 2000, 64, 2  # an 8 MiB training file, a 2 MiB working budget
    training = np.lib.format.open_memmap(
        tmp_path / "train.npy", mode="w+", dtype=np.uint8, shape=(n, side, side)
    )
    training[:] = rng.integers(0, 256, training.shape, dtype=np.uint8)
    training.flush()
    synthetic = rng.integers(0, 256, (16, side, side), dtype=np.uint8)
    synthetic[3] = training[1734]
    memmap = np.load(tmp_path / "train.npy", mmap_mode="r")
    assert memmap.nbytes > 3 * chunk_mb * 2**20
    release_buffers()  # buffers kept from earlier searches would hide this search's allocations

    tracemalloc.start()
    try:
        matches = topk_pearson(synthetic, memmap, k=2, chunk_mb=chunk_mb, backend="numpy")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert peak < 1.2 * chunk_mb * 2**20
    assert matches.indices[3, 0] == 1734 and matches.values[3, 0] == pytest.approx(1.0, abs=1e-6)
    in_memory = topk_pearson(synthetic, np.asarray(memmap), k=2, backend="numpy")
    np.testing.assert_array_equal(matches.indices, in_memory.indices)


def test_merged_shards_equal_one_search_and_matches_round_trip(tmp_path):
    rng = np.random.default_rng(13)
    synthetic = image_like(rng, 9, (10, 10))
    training = image_like(rng, 50, (10, 10))
    training[44] = 80
    whole = topk_pearson(synthetic, training, k=4)
    parts = []
    for a, b in ((0, 17), (17, 40), (40, 50)):
        part = topk_pearson(synthetic, training[a:b], k=4)
        shifted = np.where(part.indices >= 0, part.indices + a, -1)
        parts.append(Matches(part.values, shifted, part.constant_synthetic, part.constant_training + a))

    merged = merge_matches(parts)
    whole.save(tmp_path / "matches.npz")
    loaded = Matches.load(tmp_path / "matches.npz")

    np.testing.assert_array_equal(merged.indices, whole.indices)
    np.testing.assert_allclose(merged.values, whole.values, atol=1e-7)
    np.testing.assert_array_equal(merged.constant_training, [44])
    np.testing.assert_array_equal(loaded.values, whole.values)
    np.testing.assert_array_equal(loaded.constant_training, whole.constant_training)


def test_exclude_group_with_one_subject_warns_how_many_rows_have_no_match(caplog):
    rng = np.random.default_rng(15)
    images = rng.integers(0, 256, (6, 8, 8), dtype=np.uint8)
    imageset = ImageSet(images[:, None], tuple(f"s0/z{i:03d}" for i in range(6)), np.zeros(6), ("t1",))

    with caplog.at_level(logging.WARNING, logger="memstudy.correlate"):
        matches = topk_pearson(imageset, imageset, k=2, exclude="group")

    assert np.isnan(matches.values).all() and (matches.indices == -1).all()
    assert "6 of 6 synthetic image(s) got no eligible training image" in caplog.text
    assert "every image of its group" in caplog.text


def test_one_slice_position_rule_for_exclusions_and_analysis():
    from memstudy.analysis import slice_positions as analysis_positions
    from memstudy.correlate.exclude import slice_positions

    rng = np.random.default_rng(16)
    images = rng.integers(0, 256, (4, 1, 6, 6), dtype=np.uint8)
    slices = ImageSet(images, ("a/z010", "a/z012", "b/z003", "b/z011"), np.array([0, 0, 1, 1]), ("t1",))
    photos = ImageSet(images, ("NORMAL/IM-0001-0001.jpeg",) * 4, np.array([0, 0, 1, 1]), ("t1",))

    np.testing.assert_array_equal(analysis_positions(slices), [10, 12, 3, 11])
    np.testing.assert_array_equal(slice_positions(slices.names), [10, 12, 3, 11])
    assert analysis_positions(photos) is None and slice_positions(photos.names) is None
    # Exclusions use the same rule: names without "/z<n>" are not slices, so their position is
    # their order within the group and two photos of one patient are not "the same slice".
    found = topk_pearson(photos, photos, k=3, exclude=Exclude(slice_distance=0))
    assert sorted(found.indices[0]) == [1, 2, 3]


def test_analysis_standardized_gives_float64_pearson_and_nan_for_constant_images():
    from memstudy.analysis import standardized

    rng = np.random.default_rng(17)
    images = rng.integers(200, 211, (5, 32, 32), dtype=np.uint8)
    images[3] = 7

    unit = standardized(images)

    r = pearson_matrix(images[[0, 1, 2, 4]], images[[0, 1, 2, 4]])
    kept = unit[[0, 1, 2, 4]].astype(np.float64)
    # float32 rows: each value rounded once, so r is off by a few float32 ulps at most.
    np.testing.assert_allclose(kept @ kept.T, r, atol=1e-6)
    assert np.isnan(unit[3]).all() and unit.dtype == np.float32


def test_correlate_modules_import_without_a_circle_and_backends_share_only_core():
    import ast
    from pathlib import Path

    import memstudy.correlate

    folder = Path(memstudy.correlate.__file__).parent
    imports = {}
    for path in folder.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):  # function-level imports count too
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("memstudy.correlate."):
                found.add(node.module.split(".")[2])
        imports[path.stem] = found

    def reaches(start: str, target: str, seen: set[str]) -> bool:
        return any(
            m == target or (m not in seen and reaches(m, target, seen | {m})) for m in imports.get(start, ())
        )

    assert [m for m in imports if reaches(m, m, set())] == []
    for backend in ("backend_numpy", "backend_int8", "backend_cupy"):
        assert imports[backend] == {"core"}, backend
