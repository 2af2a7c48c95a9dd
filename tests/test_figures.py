"""Memorization figures: the traces hold the report's values, the threshold and seeded bootstrap intervals.

References are written here with plain numpy (float64 Pearson r, sorting, the bootstrap) and
compared with what the figure objects hold.
"""

from __future__ import annotations

import base64
import dataclasses
import re

import numpy as np
import pandas as pd
import plotly.io as pio
import pytest
from conftest import float64_pearson
from scipy.ndimage import gaussian_filter

from memstudy.analysis import memorization_report
from memstudy.book import check_offline
from memstudy.data import ImageSet
from memstudy.figures import max_r_ecdf, memorization_curves, top_pairs

SIZE = 24
SLICE = re.compile(r"^(.*)/z(\d+)$")


def volumes(seed: int, n_subjects: int, n_slices: int, first_group: int, size: int = SIZE) -> ImageSet:
    """Smooth random volumes sliced along z (adjacent slices alike), names ``S007/z003``, one channel."""
    rng = np.random.default_rng(seed)
    images, names, groups = [], [], []
    for s in range(n_subjects):
        texture = gaussian_filter(rng.standard_normal((n_slices + 6, size, size)), 1.5)[3:-3]
        texture = np.clip(np.rint(128 + 60 * texture / texture.std()), 0, 255)
        for z in range(n_slices):
            images.append(texture[z][None])
            names.append(f"S{first_group + s:03d}/z{z:03d}")
            groups.append(first_group + s)
    return ImageSet(np.stack(images).astype(np.uint8), tuple(names), np.array(groups), ("gray",))


def neighbours_by_name(names: tuple[str, ...], index: int, n: int) -> list[int]:
    """Indices of the same subject's slices within n positions of ``index``, by position (from the names)."""
    subject, z = SLICE.match(names[index]).groups()
    found = [
        (int(m.group(2)), i)
        for i, name in enumerate(names)
        if (m := SLICE.match(name)) and m.group(1) == subject and abs(int(m.group(2)) - int(z)) <= n
    ]
    return [i for _, i in sorted(found)]


@pytest.fixture(scope="module")
def study() -> dict:
    """A training set, held-out subjects and synthetic images: 4 exact copies, one mirrored, 10 unseen."""
    training = volumes(0, 6, 8, 0)
    holdout = volumes(1, 20, 3, 100)
    unseen = volumes(2, 10, 1, 200).images
    copied = np.array([3, 12, 25, 40])
    synthetic = np.concatenate([training.images[copied], training.images[[30]][..., ::-1], unseen])
    report = memorization_report(synthetic, training, holdout, k=3, mirror=True)
    return {
        "training": training,
        "holdout": holdout,
        "synthetic": synthetic,
        "report": report,
        "copied": copied,
    }


def ecdf_reference(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    finite = np.sort(values[np.isfinite(values)])
    return finite, np.arange(1, finite.size + 1) / finite.size


def test_ecdf_holds_max_r_both_baselines_and_the_threshold(study):
    report = study["report"]
    figure = max_r_ecdf(report)
    traces = {trace.name: trace for trace in figure.data}
    expected = {
        "synthetic → train": report.max_r,
        "held-out → train": report.holdout_max_r,
        "train → train, other subjects": report.train_max_r,
    }
    assert set(traces) == set(expected)
    for name, values in expected.items():
        x, y = ecdf_reference(values)
        np.testing.assert_array_equal(traces[name].x, x)
        np.testing.assert_array_equal(traces[name].y, y)
    # The threshold is the held-out p99 (numpy's linear interpolation), drawn as one vertical line.
    threshold = np.quantile(report.holdout_max_r[np.isfinite(report.holdout_max_r)], 0.99)
    assert report.threshold == pytest.approx(threshold, abs=1e-12)
    (line,) = figure.layout.shapes
    assert line.x0 == line.x1 == report.threshold


def test_ecdf_of_several_reports_shares_equal_baselines_and_labels_different_ones(study):
    report = study["report"]
    other = dataclasses.replace(report, max_r=report.max_r[:5])
    shared = max_r_ecdf({"ddpm": report, "stylegan": other})
    assert [t.name for t in shared.data] == [
        "ddpm: synthetic → train",
        "stylegan: synthetic → train",
        "held-out → train",
        "train → train, other subjects",
    ]
    thinner = dataclasses.replace(other, holdout_max_r=report.holdout_max_r[:-5], threshold=0.5)
    separate = max_r_ecdf({"ddpm": report, "stylegan": thinner})
    names = [t.name for t in separate.data]
    assert "ddpm: held-out → train" in names and "stylegan: held-out → train" in names
    assert sorted(s.x0 for s in separate.layout.shapes) == sorted([report.threshold, 0.5])


@pytest.fixture(scope="module")
def curve_inputs() -> tuple[pd.DataFrame, list[dict]]:
    """Two models × three training sizes with made-up per-sample values (some constant images: NaN)."""
    rng = np.random.default_rng(11)
    rows, samples = [], []
    for model in ("stylegan", "ddpm"):
        for size in (400, 100, 1600):  # out of order on purpose
            n = int(rng.integers(30, 60))
            max_r = rng.uniform(0.7, 1.0, n)
            max_r[rng.random(n) < 0.1] = np.nan
            copy = rng.random(n) < (0.05 if model == "ddpm" else 0.2)
            rows.append(
                {
                    "model": model,
                    "dataset": "brain-phantom",
                    "n_train_images": size,
                    "step": 1000,
                    "n_samples": n,
                    "median_max_r": float(np.nanmedian(max_r)),
                    "frac_likely_copies": float(copy.mean()),
                }
            )
            samples.append({"max_r": max_r, "likely_copy": copy})
    return pd.DataFrame(rows), samples


def reference_interval(values: np.ndarray, draws: np.ndarray, statistic: str) -> tuple[float, float]:
    """Percentile 95 % bootstrap of one statistic over resampled indices ``draws`` (n_boot, n)."""
    resampled = values[draws]
    if statistic == "median_max_r":
        stats = np.array([np.median(row[~np.isnan(row)]) for row in resampled if (~np.isnan(row)).any()])
    else:
        stats = resampled.sum(axis=1) / resampled.shape[1]
    return tuple(np.quantile(stats, [0.025, 0.975]))


def test_curves_hold_the_table_values_and_seeded_bootstrap_intervals(curve_inputs):
    table, samples = curve_inputs
    n_boot, seed = 300, 5
    figure = memorization_curves(table, samples, x="n_train_images", n_boot=n_boot, seed=seed)
    metrics = ("frac_likely_copies", "median_max_r")
    # The documented draw: row i uses default_rng([seed, i]), one integers() call per metric in order.
    expected = {}
    for i, arrays in enumerate(samples):
        rng = np.random.default_rng([seed, i])
        n = len(arrays["max_r"])
        for metric, values in zip(metrics, (arrays["likely_copy"], arrays["max_r"]), strict=True):
            expected[i, metric] = reference_interval(values, rng.integers(0, n, size=(n_boot, n)), metric)
    assert len(figure.data) == 2 * 2  # two lines in each of two panels
    for trace in figure.data:
        metric = metrics[0] if trace.xaxis == "x" else metrics[1]
        model = trace.name.split(",")[0]
        assert trace.name == f"{model}, brain-phantom"
        rows = table[table.model == model].sort_values("n_train_images")
        np.testing.assert_array_equal(trace.x, rows.n_train_images)
        np.testing.assert_array_equal(trace.y, rows[metric])
        bounds = np.array([expected[i, metric] for i in rows.index])
        # Same draws, same float64 arithmetic: equal up to the order of summation in the mean (1e-12).
        np.testing.assert_allclose(np.asarray(trace.customdata, dtype=float), bounds, rtol=0, atol=1e-12)
        np.testing.assert_allclose(trace.y - trace.error_y.arrayminus, bounds[:, 0], rtol=0, atol=1e-12)
        np.testing.assert_allclose(trace.y + trace.error_y.array, bounds[:, 1], rtol=0, atol=1e-12)
    assert sum(t.showlegend for t in figure.data) == 2


def test_curves_without_samples_draw_points_without_intervals(curve_inputs):
    table, _ = curve_inputs
    figure = memorization_curves(table, x="n_train_images", metrics=["median_max_r"])
    assert len(figure.data) == 2
    assert all(t.error_y.array is None and t.customdata is None for t in figure.data)


def test_curves_refuse_samples_that_do_not_follow_the_rows(curve_inputs):
    table, samples = curve_inputs
    with pytest.raises(ValueError, match="one per row"):
        memorization_curves(table, samples[:-1])
    with pytest.raises(ValueError, match=r"samples\[1\] has .* n_samples"):
        memorization_curves(table, [samples[0], samples[0], *samples[2:]])


def test_curves_refuse_two_points_of_one_line_at_one_x(curve_inputs):
    table, _ = curve_inputs
    doubled = pd.concat([table, table.assign(step=2000)], ignore_index=True)
    with pytest.raises(ValueError, match="step"):
        memorization_curves(doubled, x="n_train_images")
    with pytest.raises(ValueError, match="lacks the column"):
        memorization_curves(table.drop(columns="median_max_r"))


def training_view(training: ImageSet, index: int) -> np.ndarray:
    return training.images[index, 0]


def test_top_pairs_show_each_copy_beside_its_source_aligned(study):
    training, synthetic, report = study["training"], study["synthetic"], study["report"]
    figure = top_pairs(report, synthetic, training, n_pairs=5, neighbours=2)
    # Reference: the five highest max r (exact copies and the mirrored one, r = 1 up to rounding),
    # each with its best match by float64 Pearson r over the image and its mirror.
    r = np.maximum(
        float64_pearson(synthetic, training.images), float64_pearson(synthetic[..., ::-1], training.images)
    )
    per_row = 5
    order = [
        int(re.search(r"#(\d+)", figure.layout.annotations[row * per_row].text).group(1)) for row in range(5)
    ]
    assert sorted(order) == [0, 1, 2, 3, 4]  # the copies, r = 1 (ties broken by the engine's float32 r)
    assert np.all(np.diff(report.max_r[order]) <= 0)
    assert len(figure.data) == 5 * per_row
    for row, i in enumerate(order):
        image, match, difference, scatter, mosaic = figure.data[row * per_row : (row + 1) * per_row]
        j = int(r[i].argmax())
        np.testing.assert_array_equal(image.z, synthetic[i, 0])
        np.testing.assert_array_equal(match.z, training_view(training, j))
        aligned = synthetic[i, 0][:, ::-1] if i == 4 else synthetic[i, 0]
        np.testing.assert_array_equal(difference.z, aligned.astype(int) - training_view(training, j))
        # The scatter's pixel pairs are the ones correlated: their r is the report's max r, which
        # the engine rounds to float32 (|error| <= 2**-24), so 1e-6 is loose.
        assert np.corrcoef(scatter.x.astype(float), scatter.y.astype(float))[0, 1] == pytest.approx(
            report.max_r[i], abs=1e-6
        )
        near = neighbours_by_name(training.names, j, 2)
        tiles = [training_view(training, n) for n in near]
        assert mosaic.z.shape[1] == len(tiles) * SIZE + 2 * (len(tiles) - 1)
        for t, tile in enumerate(tiles):
            np.testing.assert_array_equal(mosaic.z[:, t * (SIZE + 2) : t * (SIZE + 2) + SIZE], tile)


def test_top_pairs_without_training_images_hold_no_training_pixels(study):
    training, synthetic, report = study["training"], study["synthetic"], study["report"]

    def leaks(figure: object) -> list[int]:
        text = figure.to_json()
        arrays = [np.asarray(t.z) for t in figure.data if getattr(t, "z", None) is not None]
        return [
            j
            for j in range(len(training))
            if base64.b64encode(training_view(training, j).tobytes()).decode() in text
            or any(
                a.shape == training_view(training, j).shape and np.array_equal(a, training_view(training, j))
                for a in arrays
            )
        ]

    shown = top_pairs(report, synthetic, training, n_pairs=5)
    # The check finds the training images when they are shown (the four exact copies are the
    # synthetic images themselves; the rest come from the match and neighbour panels).
    assert len(leaks(shown)) > 4
    hidden = top_pairs(report, synthetic, training, n_pairs=5, show_training_images=False)
    copies = set(study["copied"].tolist())
    assert set(leaks(hidden)) <= copies  # only the synthetic images, some of which are exact copies
    assert [t.type for t in hidden.data] == ["heatmap"] * 5
    for row, trace in enumerate(hidden.data):
        i = int(re.search(r"#(\d+)", hidden.layout.annotations[2 * row].text).group(1))
        np.testing.assert_array_equal(trace.z, synthetic[i, 0])
    provenance = " ".join(a.text for a in hidden.layout.annotations)
    for i in range(5):
        assert f"best match: {report.match_names[i, 0]}" in provenance


def test_figures_render_to_html_that_loads_nothing_from_the_network(study, curve_inputs, tmp_path):
    report, training, synthetic = study["report"], study["training"], study["synthetic"]
    figures = {
        "ecdf": max_r_ecdf(report),
        "curves": memorization_curves(*curve_inputs, n_boot=50),
        "pairs": top_pairs(report, synthetic, training),
    }
    for name, figure in figures.items():
        page = pio.to_html(figure, full_html=True, include_plotlyjs=False, include_mathjax=False)
        assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page), name
        (tmp_path / f"{name}.html").write_text(page)
    assert check_offline(tmp_path) == []
