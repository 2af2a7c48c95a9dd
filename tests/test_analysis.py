"""Training near-duplicates, dedup, and the cross-run comparison table, against plain-numpy references."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import float64_pearson
from test_memorization import reference_max_and_margin, subjects

import memstudy.analysis as analysis
from memstudy.analysis import (
    comparison_table,
    deduplicate,
    memorization_report,
    near_duplicates,
    save_comparison,
)
from memstudy.data import ImageSet

# The run-folder contract's columns of comparison.csv, in order (written out here, not imported).
CONTRACT = [
    "dataset", "model", "n_train_subjects", "n_train_images", "seed", "step", "n_samples", "sampler",
    "median_max_r", "p95_max_r", "frac_above_0.95", "holdout_p99", "frac_above_holdout_p99",
    "frac_likely_copies", "train_train_median_max_r",
]  # fmt: skip


def test_existing_analysis_names_stay_importable():
    for name in ("slice_positions", "standardized", "dataset_summary", "correlation_by_slice_distance",
                 "nearest_other_subject", "nan_median", "neighbour_statistics"):  # fmt: skip
        assert callable(getattr(analysis, name))


def duplicated_set() -> ImageSet:
    """Slices of smooth volumes, plus 12 near-identical images (more than the first search's k)."""
    base = subjects(0, 4, 10, 0)
    rng = np.random.default_rng(1)
    crowd = np.clip(base.images[:1].astype(float) + rng.normal(0, 1, (12, *base.image_shape)), 0, 255)
    images = np.concatenate([base.images, np.rint(crowd).astype(np.uint8)])
    names = base.names + tuple(f"S009/z{z:03d}" for z in range(12))
    return ImageSet(images, names, np.concatenate([base.groups, np.full(12, 9)]), base.channels)


def reference_pairs(images: np.ndarray, threshold: float) -> tuple[set, np.ndarray]:
    r = float64_pearson(images, images)
    np.fill_diagonal(r, -np.inf)
    # Pairs within float32 rounding of the threshold could go either way; there are none here.
    assert not np.any(np.abs(r - threshold) < 1e-6)
    i, j = np.nonzero(np.triu(r > threshold, k=1))
    return set(zip(i.tolist(), j.tolist(), strict=True)), r


def test_near_duplicates_are_every_pair_above_the_threshold_with_provenance():
    imageset = duplicated_set()
    expected, r = reference_pairs(imageset.images, 0.95)
    table = near_duplicates(imageset, threshold=0.95)
    assert set(zip(table["first"], table["second"], strict=True)) == expected
    assert len(expected) > 12 * 11 // 2  # the crowd alone gives 66 pairs: the search had to widen
    np.testing.assert_allclose(table["r"], r[table["first"], table["second"]], rtol=0, atol=1e-7)
    assert list(table["r"]) == sorted(table["r"], reverse=True)
    row = table.iloc[0]
    assert row["first_name"] == imageset.names[row["first"]]
    same = imageset.groups[table["first"]] == imageset.groups[table["second"]]
    np.testing.assert_array_equal(table["same_subject"], same)
    z = np.array([int(n[-3:]) for n in imageset.names])
    np.testing.assert_array_equal(
        table["slice_distance"], np.where(same, np.abs(z[table["first"]] - z[table["second"]]), -1)
    )


def test_dedup_keeps_the_first_of_each_run_of_duplicates_and_reports_the_count():
    imageset = duplicated_set()
    _, r = reference_pairs(imageset.images, 0.95)
    kept = []
    for j in range(len(imageset)):
        if not any(r[i, j] > 0.95 for i in kept):
            kept.append(j)
    removed = np.setdiff1d(np.arange(len(imageset)), kept)
    deduped, dropped = deduplicate(imageset, threshold=0.95)
    np.testing.assert_array_equal(dropped, removed)
    assert deduped.names == tuple(imageset.names[i] for i in kept)

    holdout = subjects(2, 5, 4, 100)
    report = memorization_report(imageset.images[removed[:3]], imageset, holdout, k=2, dedup_threshold=0.95)
    np.testing.assert_array_equal(report.removed_duplicates, removed)
    assert report.summary()["removed_duplicates"] == removed.size
    # Matches index the training set as passed, and only kept images can be matched.
    assert set(report.match_indices.ravel()) <= set(kept)
    best = reference_max_and_margin(imageset.images[removed[:3]], deduped)[1]
    np.testing.assert_array_equal(report.match_indices[:, 0], np.array(kept)[best])


@pytest.fixture(scope="module")
def two_runs() -> list:
    training, holdout = subjects(0, 6, 8, 0), subjects(1, 20, 3, 100)
    rng = np.random.default_rng(2)
    copies = training.images[rng.choice(len(training), 5)]
    runs = []
    for step, synthetic in ((100, subjects(2, 10, 3, 200).images), (200, np.concatenate([copies, copies]))):
        report = memorization_report(
            synthetic, training, holdout, metadata={"dataset": "toy", "model": "ddpm"}
        )
        runs.append((report, synthetic, training, holdout, step))
    return runs


def test_comparison_table_has_the_contract_columns_with_values_from_the_runs(two_runs, tmp_path):
    rows = [r.summary(seed=0, step=step, sampler="ancestral-1000") for r, *_, step in two_runs]
    table = comparison_table([*rows, {**rows[0], "model_size": 64}])
    assert list(table.columns[: len(CONTRACT)]) == CONTRACT
    assert "model_size" in table.columns and np.isnan(table["model_size"][0])
    records = table.to_dict("records")[:2]
    for row, (report, synthetic, training, holdout, step) in zip(records, two_runs, strict=True):
        max_r = reference_max_and_margin(synthetic, training)[0]
        held = reference_max_and_margin(holdout.images, training)[0]
        rt = float64_pearson(training.images, training.images)
        rt[training.groups[:, None] == training.groups[None, :]] = -np.inf
        p99 = np.quantile(held, 0.99)
        assert (row["dataset"], row["model"], row["step"], row["seed"]) == ("toy", "ddpm", step, 0)
        assert (row["n_train_images"], row["n_train_subjects"], row["n_samples"]) == (48, 6, len(synthetic))
        # Each r is within 1e-7 of the reference; medians, quantiles and interpolations keep that.
        assert row["median_max_r"] == pytest.approx(np.median(max_r), abs=1e-7)
        assert row["p95_max_r"] == pytest.approx(np.quantile(max_r, 0.95), abs=1e-7)
        assert row["holdout_p99"] == pytest.approx(p99, abs=1e-7)
        assert row["train_train_median_max_r"] == pytest.approx(np.median(rt.max(axis=1)), abs=1e-7)
        assert row["frac_above_0.95"] == np.mean(max_r > 0.95)
        assert row["frac_above_holdout_p99"] == np.mean(max_r > p99)
        assert row["frac_likely_copies"] == len(report.likely_copies) / len(synthetic)
    assert table["frac_likely_copies"][1] == 1.0 and table["frac_likely_copies"][0] < 1.0

    save_comparison(table, tmp_path / "comparison.csv")
    back = pd.read_csv(tmp_path / "comparison.csv")
    assert list(back.columns) == list(table.columns) and len(back) == 3


def test_comparison_row_without_run_fields_is_an_error_naming_them(two_runs):
    with pytest.raises(ValueError, match="row 0 lacks seed, step, sampler"):
        comparison_table([two_runs[0][0]])
    with pytest.raises(ValueError, match="n_train_images=5"):
        two_runs[0][0].summary(n_train_images=5)


def comparison_rows(**changes):
    """Rows of a comparison table: two runs (8 and 16 subjects), each at steps 10 and 20."""
    rows = []
    for n, fracs in ((8, (0.25, 0.5)), (16, (0.0, 0.125))):
        for step, frac in zip((10, 20), fracs, strict=True):
            rows.append(
                {
                    "dataset": "cxr",
                    "model": "ddpm",
                    "n_train_subjects": n,
                    "seed": 0,
                    "step": step,
                    "channel": "all",
                    "frac_likely_copies": frac,
                    "median_max_r": 0.5 + frac,
                    "run_dir": f"cxr/ddpm/n{n}-s0",
                }
                | changes
            )
    return pd.DataFrame(rows)


def test_curves_against_size_take_each_runs_last_step():
    rows = analysis.curve_rows(comparison_rows(), "n_train_subjects")
    assert rows[["n_train_subjects", "step", "dataset"]].values.tolist() == [[8, 20, "cxr"], [16, 20, "cxr"]]


def test_curves_against_step_give_each_run_its_own_line():
    rows = analysis.curve_rows(comparison_rows(), "step")
    assert len(rows) == 4
    assert sorted(set(rows["dataset"])) == ["cxr, 16 subjects", "cxr, 8 subjects"]
    seeds = pd.concat([comparison_rows(), comparison_rows(seed=1, run_dir="other")])
    labels = analysis.curve_rows(seeds, "n_train_subjects")["dataset"]
    assert sorted(set(labels)) == ["cxr, seed 0", "cxr, seed 1"]


def test_size_statements_compare_the_smallest_and_largest_set_at_the_last_step():
    assert analysis.size_statements(comparison_rows()) == [
        "ddpm on cxr (all): 50 % likely copies (median max r 1.000) with 8 training subjects vs "
        "12 % (0.625) with 16."
    ]
    one_size = comparison_rows()
    assert analysis.size_statements(one_size[one_size["n_train_subjects"] == 8]) == []
