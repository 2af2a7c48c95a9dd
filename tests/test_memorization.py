"""The memorization report: planted copies are called, real unseen and averaged images are not.

Every number is checked against a float64 Pearson reference written here with plain numpy, and the
rank test against ``scipy.stats.mannwhitneyu`` on those reference values.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
from conftest import float64_pearson
from scipy.ndimage import gaussian_filter
from scipy.stats import binom, mannwhitneyu

from memstudy.analysis import memorization_report, memorization_reports
from memstudy.data import ImageSet

SIZE = 32
QUANTILE = 0.99
# |r_float32 - r_exact| <= 2**-24 / 2 for |r| <= 1 (the engine rounds the exact r to float32) and the
# float64 reference is good to ~1e-15, so 1e-7 covers every r; a difference of two r's gets 2e-7.
R_TOL = 1e-7


def subjects(seed: int, n_subjects: int, n_slices: int, first_group: int, channels: int = 1) -> ImageSet:
    """Smooth random 'volumes': a shared bright oval plus a subject's own 3D texture, sliced along z.

    Adjacent slices of one subject are alike (the texture is smooth along z too) and every image
    shares the oval, so different subjects correlate highly, as brain slices do.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / (SIZE - 1) * 2 - 1
    oval = np.exp(-(((xx / 0.7) ** 2 + (yy / 0.85) ** 2) ** 2))
    images, names, groups = [], [], []
    for s in range(n_subjects):
        texture = gaussian_filter(
            rng.standard_normal((channels, n_slices + 8, SIZE, SIZE)), (0, 1.5, 1.5, 1.5)
        )
        texture = texture[:, 4:-4] / texture.std()
        for z in range(n_slices):
            images.append(np.clip(np.rint(60 + 120 * oval + 80 * oval * texture[:, z]), 0, 255))
            names.append(f"S{first_group + s:03d}/z{z:03d}")
            groups.append(first_group + s)
    names_of_channels = tuple(f"c{i}" for i in range(channels))
    return ImageSet(np.stack(images).astype(np.uint8), tuple(names), np.array(groups), names_of_channels)


def reference_max_and_margin(query: np.ndarray, training: ImageSet) -> tuple[np.ndarray, ...]:
    """Best r, its training index and best r - best r in another subject than the best match's."""
    r = float64_pearson(query, training.images)
    best = r.argmax(axis=1)
    other = np.where(training.groups[None, :] != training.groups[best][:, None], r, -np.inf).max(axis=1)
    return r.max(axis=1), best, r.max(axis=1) - other


def to_uint8(images: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(images), 0, 255).astype(np.uint8)


def false_call_bound(n: int, rate: float) -> int:
    """Calls among n real unseen images that the rate allows, at the binomial 99.9th percentile."""
    return int(binom.ppf(0.999, n, rate))


@pytest.fixture(scope="module")
def sets() -> dict[str, ImageSet]:
    return {
        "training": subjects(0, 8, 12, 0),
        "holdout": subjects(1, 50, 4, 100),
        "unseen": subjects(2, 50, 4, 200),
    }


@pytest.fixture(scope="module")
def planted(sets) -> dict:
    """Synthetic set: planted copies, the training mean, blurred unseen images and unseen images."""
    training, unseen = sets["training"], sets["unseen"]
    rng = np.random.default_rng(3)
    sources = rng.choice(len(training), 15, replace=False)
    x = training.images[sources].astype(np.float64)
    parts = {
        "exact": x[:5],
        "rescaled": 0.8 * x[5:10] + 20,
        # Noise of sd 6 on texture of sd ~40: r with the source stays near 0.99.
        "noisy": x[10:15] + rng.normal(0, 6, x[10:15].shape),
        "mean": training.images.mean(axis=0, keepdims=True),
        "blurred": gaussian_filter(unseen.images.astype(np.float64), (0, 0, 2, 2)),
        "unseen": unseen.images,
    }
    images = to_uint8(np.concatenate(list(parts.values())))
    where, start = {}, 0
    for name, part in parts.items():
        where[name] = np.arange(start, start + len(part))
        start += len(part)
    report = memorization_report(images, training, sets["holdout"], quantile=QUANTILE, k=3)
    return {"images": images, "where": where, "sources": sources, "report": report}


def test_planted_copies_are_likely_copies_matched_to_their_source(planted):
    report, where = planted["report"], planted["where"]
    copies = np.concatenate([where["exact"], where["rescaled"], where["noisy"]])
    assert set(copies) <= set(report.likely_copies)
    np.testing.assert_array_equal(report.match_indices[copies, 0], planted["sources"])


def test_unseen_images_are_called_copies_at_most_at_the_quantiles_rate(planted):
    report, unseen = planted["report"], planted["where"]["unseen"]
    called = np.isin(unseen, report.likely_copies).sum()
    above = (report.max_r[unseen] > report.threshold).sum()
    # Unseen images are drawn like the held-out ones: each condition passes about 1 - q of them.
    assert called <= false_call_bound(unseen.size, 1 - QUANTILE)
    assert above <= false_call_bound(unseen.size, 1 - QUANTILE)


def test_averaging_is_not_copying_blurred_images_and_the_training_mean_are_not_called(planted):
    report, where = planted["report"], planted["where"]
    blurred = where["blurred"]
    assert where["mean"][0] not in report.likely_copies
    assert np.isin(blurred, report.likely_copies).sum() <= false_call_bound(blurred.size, 1 - QUANTILE)
    # The data make the point: max r alone would call many blurred images copies.
    assert (report.max_r[blurred] > report.threshold).sum() > 4 * false_call_bound(blurred.size, 1 - QUANTILE)
    assert report.max_r[where["mean"][0]] > report.threshold


def test_values_match_a_float64_pearson_reference(planted, sets):
    report, images, training = planted["report"], planted["images"], sets["training"]
    max_r, best, margin = reference_max_and_margin(images, training)
    np.testing.assert_allclose(report.max_r, max_r, rtol=0, atol=R_TOL)
    np.testing.assert_allclose(report.margin, margin, rtol=0, atol=2 * R_TOL)
    np.testing.assert_array_equal(report.match_indices[:, 0], best)
    r = float64_pearson(images, training.images)
    np.testing.assert_allclose(report.match_values, np.sort(r, axis=1)[:, ::-1][:, :3], rtol=0, atol=R_TOL)
    assert [report.match_names[i, 0] for i in range(3)] == [training.names[j] for j in best[:3]]
    np.testing.assert_array_equal(report.match_subjects[:, 0], training.groups[best])
    np.testing.assert_array_equal(report.match_slices[:, 0], [int(training.names[j][-3:]) for j in best])

    held_max, _, held_margin = reference_max_and_margin(sets["holdout"].images, training)
    np.testing.assert_allclose(report.holdout_max_r, held_max, rtol=0, atol=R_TOL)
    np.testing.assert_allclose(report.holdout_margin, held_margin, rtol=0, atol=2 * R_TOL)
    # Linear interpolation between two values each within R_TOL stays within R_TOL.
    assert report.threshold == pytest.approx(np.quantile(held_max, QUANTILE), abs=R_TOL)
    assert report.margin_threshold == pytest.approx(np.quantile(held_margin, QUANTILE), abs=2 * R_TOL)

    rh = float64_pearson(sets["holdout"].images, training.images)
    np.testing.assert_allclose(report.holdout_values, np.sort(rh, axis=1)[:, ::-1][:, :3], rtol=0, atol=R_TOL)
    np.testing.assert_array_equal(report.holdout_indices[:, 0], rh.argmax(axis=1))

    rt = float64_pearson(training.images, training.images)
    rt[training.groups[:, None] == training.groups[None, :]] = -np.inf
    np.testing.assert_allclose(report.train_max_r, rt.max(axis=1), rtol=0, atol=R_TOL)
    np.testing.assert_allclose(report.train_values, np.sort(rt, axis=1)[:, ::-1][:, :3], rtol=0, atol=R_TOL)
    np.testing.assert_array_equal(report.train_indices[:, 0], rt.argmax(axis=1))
    assert (training.groups[report.train_indices] != training.groups[:, None]).all()


def mann_whitney_check(report, synthetic_r: np.ndarray, holdout_r: np.ndarray) -> float:
    """Compare the report's U test with scipy's on reference values; return the reference p-value."""
    expected = mannwhitneyu(synthetic_r, holdout_r, alternative="greater")
    # U counts (synthetic, held-out) pairs in order; only pairs closer than the rounding of both
    # values can be ordered differently by the float32 values, each moving U by at most 1.
    close = int((np.abs(synthetic_r[:, None] - holdout_r[None, :]) <= 2 * R_TOL).sum())
    assert abs(report.mann_whitney_u - expected.statistic) <= close
    if close == 0:
        assert report.mann_whitney_p == pytest.approx(expected.pvalue, rel=1e-9)
    return float(expected.pvalue)


def test_rank_test_p_value_is_small_with_copies_and_not_without(sets):
    training, holdout, unseen = sets["training"], sets["holdout"], sets["unseen"]
    rng = np.random.default_rng(4)
    copies = training.images[rng.choice(len(training), 100)].astype(np.float64)
    with_copies = to_uint8(np.concatenate([unseen.images[:100], copies + rng.normal(0, 6, copies.shape)]))
    held_r = reference_max_and_margin(holdout.images, training)[0]
    for synthetic, small in ((with_copies, True), (unseen.images, False)):
        report = memorization_report(synthetic, training, holdout, k=1)
        p = mann_whitney_check(report, reference_max_and_margin(synthetic, training)[0], held_r)
        assert (p < 1e-3) if small else (p > 0.01)


def test_mirrored_and_shifted_copies_are_called_with_the_transform_option(sets):
    training = sets["training"]
    holdout = sets["holdout"].subset(np.arange(0, 200, 2))
    x = training.images[[5, 40, 77]]
    shifted = np.zeros_like(x[1:3])
    shifted[0, :, 2:] = x[1, :, :-2]  # content 2 rows lower, new rows black
    shifted[1, :, :, :-2] = x[2, :, :, 2:]  # content 2 columns further left
    synthetic = np.concatenate([x[:1, :, :, ::-1], shifted, sets["unseen"].images[:20]])
    report = memorization_report(synthetic, training, holdout, mirror=True, max_shift=2)
    assert {0, 1, 2} <= set(report.likely_copies)
    assert list(report.transform[:3]) == ["mirror", "shift(+2,+0)", "shift(+0,-2)"]
    # On the pixels the shift keeps, a shifted copy is its source exactly.
    np.testing.assert_array_equal(report.max_r[:3], [1.0, 1.0, 1.0])
    np.testing.assert_array_equal(report.match_indices[:3, 0], [5, 40, 77])
    # Cost: one search per transform for each of the two sets plus the train → train baseline.
    assert len(report.transforms) == 2 * 5 * 5
    assert report.searches >= 2 * 50 + 1
    assert report.pairs >= 50 * (len(synthetic) + len(holdout)) * len(training) + len(training) ** 2
    # The held-out baseline is scored with the same transforms: its max r can only rise.
    plain = memorization_report(synthetic, training, holdout)
    assert np.all(report.holdout_max_r >= plain.holdout_max_r)
    assert not {0, 2} & set(plain.likely_copies)


def test_recurring_matches_are_counted(sets):
    training, holdout = sets["training"], sets["holdout"]
    synthetic = training.images[[7, 7, 7, 30, 30, 61]]
    summary = memorization_report(synthetic, training, holdout, k=1).summary()
    report = memorization_report(synthetic, training, holdout, k=1)
    expected = np.bincount([7, 7, 7, 30, 30, 61], minlength=len(training))
    np.testing.assert_array_equal(report.best_match_counts, expected)
    assert summary["distinct_training_images"] == 3
    assert summary["distinct_subjects"] == np.unique(training.groups[[7, 30, 61]]).size
    assert summary["max_recurrence"] == 3
    assert summary["frac_recurring"] == pytest.approx(5 / 6)


def test_homogeneous_data_note_names_the_fixed_thresholds_below_held_out_p99(sets, caplog):
    training, holdout = sets["training"], sets["holdout"]
    held_p99 = np.quantile(reference_max_and_margin(holdout.images, training)[0], 0.99)
    below, above = held_p99 - 0.05, min(held_p99 + 0.05, 0.999)
    with caplog.at_level(logging.WARNING, logger="memstudy.analysis"):
        report = memorization_report(
            sets["unseen"].images[:10], training, holdout, fixed_thresholds=(below, above)
        )
    assert (
        len(report.notes) == 1 and f"{below:.2f}" in report.notes[0] and f"{above:.2f}" not in report.notes[0]
    )
    assert report.notes[0] in caplog.text
    quiet = memorization_report(sets["unseen"].images[:10], training, holdout, fixed_thresholds=(above,))
    assert quiet.notes == ()


def test_each_channel_and_all_channels_together():
    training, holdout = subjects(5, 4, 6, 0, channels=2), subjects(6, 6, 3, 50, channels=2)
    synthetic = subjects(7, 3, 3, 90, channels=2).images
    reports = memorization_reports(synthetic, training, holdout, k=2)
    assert list(reports) == ["c0", "c1", "all"]
    for name, report in reports.items():
        c = slice(None) if name == "all" else slice(int(name[1]), int(name[1]) + 1)
        one = ImageSet(training.images[:, c], training.names, training.groups, training.channels[c])
        expected, _, margin = reference_max_and_margin(synthetic[:, c], one)
        np.testing.assert_allclose(report.max_r, expected, rtol=0, atol=R_TOL)
        np.testing.assert_allclose(report.margin, margin, rtol=0, atol=2 * R_TOL)
        assert report.channel == name and report.summary()["channel"] == name


@pytest.mark.parametrize(
    "change, message",
    [
        ("shape", "shape"),
        ("shared", "shares 1 subject"),
        ("k", "k=97"),
        ("channel", "channel='t2'"),
    ],
)
def test_bad_input_is_a_clear_error(sets, change, message):
    training, holdout = sets["training"], sets["holdout"]
    synthetic, options = sets["unseen"].images[:4], {}
    if change == "shape":
        synthetic = synthetic[:, :, :16, :16]
    elif change == "shared":
        holdout = ImageSet(
            holdout.images, holdout.names, np.where(holdout.groups == 100, 3, holdout.groups), ("c0",)
        )
    elif change == "k":
        options["k"] = 97
    elif change == "channel":
        options["channel"] = "t2"
    with pytest.raises(ValueError, match=message):
        memorization_report(synthetic, training, holdout, **options)


def test_one_training_subject_calls_on_max_r_alone_and_says_so(sets):
    """Slices of one subject: no other subject exists, so margins are undefined and max r decides."""
    training = sets["training"].subset(np.flatnonzero(sets["training"].groups == 0))
    holdout = sets["holdout"]
    synthetic = np.concatenate([training.images[[2, 7]], sets["unseen"].images[:20]])
    report = memorization_report(synthetic, training, holdout, k=2)
    expected, _, _ = reference_max_and_margin(synthetic, training)
    np.testing.assert_allclose(report.max_r, expected, rtol=0, atol=R_TOL)
    assert np.isnan(report.margin).all() and np.isnan(report.train_max_r).all()
    held, _, _ = reference_max_and_margin(holdout.images, training)
    threshold = np.quantile(held, QUANTILE)
    np.testing.assert_array_equal(report.likely_copies, np.flatnonzero(expected > threshold))
    assert {0, 1} <= set(report.likely_copies.tolist())
    assert any("one subject" in note for note in report.notes)
    row = report.summary(dataset="d", model="m", seed=0, step=1, sampler="s")
    assert row["n_train_subjects"] == 1 and np.isnan(row["train_train_median_max_r"])
