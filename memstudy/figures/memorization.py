"""Figures of the memorization chapter: max r against its baselines, and memorization across runs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from memstudy.analysis.memorization import MemorizationReport

#: The metrics :func:`memorization_curves` can draw, with their axis titles.
CURVE_METRICS = {
    "frac_likely_copies": "fraction of samples called likely copies",
    "median_max_r": "median max r (synthetic → train)",
}
_AXIS_TITLES = {
    "n_train_images": "training images",
    "n_train_subjects": "training subjects",
    "step": "training step",
}


def ecdf(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Empirical CDF of the finite values: sorted values (float64) and the fraction ≤ each, (i + 1) / n."""
    finite = np.sort(np.asarray(values, dtype=np.float64)[np.isfinite(values)])
    return finite, np.arange(1, finite.size + 1) / max(finite.size, 1)


def max_r_ecdf(
    reports: MemorizationReport | Mapping[str, MemorizationReport], *, title: str = ""
) -> go.Figure:
    """ECDFs of each synthetic image's max r, beside the two real baselines and the calibrated threshold.

    Parameters
    ----------
    reports : MemorizationReport or mapping of str to MemorizationReport
        One report, or several keyed by a label (e.g. the model); a label names its synthetic curve.
    title : str
        Figure title.

    Returns
    -------
    plotly.graph_objects.Figure
        One step line per report, ``"<label>: synthetic → train"`` (``"synthetic → train"`` for a single
        report), of its finite ``max_r`` (r in [-1, 1]); the baselines ``"held-out → train"``
        (``holdout_max_r``) and ``"train → train, other subjects"`` (``train_max_r``), dashed; a
        vertical line at each distinct ``threshold`` (held-out quantile), named in its annotation.
        Reports with identical baselines share one baseline curve; otherwise each baseline is
        prefixed with its label.
    """
    if isinstance(reports, MemorizationReport):
        reports = {"": reports}
    if not reports:
        raise ValueError("max_r_ecdf needs at least one report")
    figure = go.Figure()
    for label, report in reports.items():
        x, y = ecdf(report.max_r)
        name = f"{label}: synthetic → train" if label else "synthetic → train"
        figure.add_scatter(x=x, y=y, mode="lines", line_shape="hv", name=name)
    for attribute, baseline in (
        ("holdout_max_r", "held-out → train"),
        ("train_max_r", "train → train, other subjects"),
    ):
        distinct: list[tuple[str, np.ndarray]] = []
        for label, report in reports.items():
            values = getattr(report, attribute)
            if not any(np.array_equal(values, seen, equal_nan=True) for _, seen in distinct):
                distinct.append((label, values))
        for label, values in distinct:
            x, y = ecdf(values)
            figure.add_scatter(
                x=x,
                y=y,
                mode="lines",
                line_shape="hv",
                line_dash="dash" if attribute == "holdout_max_r" else "dot",
                name=baseline if len(distinct) == 1 or not label else f"{label}: {baseline}",
            )
    for threshold, quantile in dict.fromkeys((r.threshold, r.quantile) for r in reports.values()):
        if np.isfinite(threshold):
            figure.add_vline(
                x=threshold,
                line_dash="dashdot",
                line_color="gray",
                annotation_text=f"calibrated threshold: held-out p{100 * quantile:g} = {threshold:.3f}",
                annotation_position="top left",
            )
    figure.update_layout(
        title=title or None,
        xaxis_title="max Pearson r with the training set",
        yaxis_title="fraction of images ≤ r",
        yaxis_range=[0, 1.02],
        height=420,
        margin={"t": 60 if title else 30},
    )
    return figure


def per_sample_values(report: MemorizationReport) -> dict[str, np.ndarray]:
    """The per-sample arrays :func:`memorization_curves` bootstraps, from one report.

    Returns
    -------
    dict
        ``max_r`` (float64, NaN for constant images) and ``likely_copy`` (bool), one per sample.
    """
    copy = np.zeros(report.max_r.size, dtype=bool)
    copy[report.likely_copies] = True
    return {"max_r": np.asarray(report.max_r, dtype=np.float64), "likely_copy": copy}


def bootstrap_interval(
    values: np.ndarray, statistic: str, *, n_boot: int, level: float, rng: np.random.Generator
) -> tuple[float, float]:
    """Percentile bootstrap interval of a per-sample statistic.

    ``n_boot`` resamples of the n samples with replacement, drawn as one
    ``rng.integers(0, n, size=(n_boot, n))``; ``statistic`` is ``"median_max_r"`` (the median of the
    finite values of each resample, NaN when none is) or ``"frac_likely_copies"`` (the mean of the
    booleans); the bounds are the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles (numpy's
    default linear interpolation) of the finite resampled statistics.
    """
    values = np.asarray(values)
    draws = values[rng.integers(0, values.size, size=(n_boot, values.size))]
    if statistic == "median_max_r":
        finite = np.isfinite(draws)
        stats = np.full(n_boot, np.nan)
        rows = finite.any(axis=1)
        stats[rows] = [np.median(row[ok]) for row, ok in zip(draws[rows], finite[rows], strict=True)]
    elif statistic == "frac_likely_copies":
        stats = draws.mean(axis=1, dtype=np.float64)
    else:
        raise ValueError(f"statistic must be one of {sorted(CURVE_METRICS)}, got {statistic!r}")
    stats = stats[np.isfinite(stats)]
    if not stats.size:
        return np.nan, np.nan
    low, high = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def _line_keys(table: pd.DataFrame, x: str) -> list[str]:
    """Columns that tell lines apart: model and dataset, plus channel or sampler when they vary."""
    keys = ["model", "dataset"]
    keys += [c for c in ("channel", "sampler") if c in table and table[c].nunique(dropna=False) > 1]
    if table.duplicated([*keys, x]).any():
        varying = [c for c in table.columns if c not in (*keys, x) and table[c].nunique(dropna=False) > 1]
        raise ValueError(
            f"memorization_curves: several rows share {', '.join(keys)} and {x}; choose one row each "
            f"first (columns that vary: {', '.join(map(str, varying[:6]))}), e.g. the last step of each run "
            "for curves against size"
        )
    return keys


def memorization_curves(
    table: pd.DataFrame,
    samples: Sequence[MemorizationReport | Mapping[str, np.ndarray]] | None = None,
    *,
    x: str = "n_train_images",
    metrics: Sequence[str] = tuple(CURVE_METRICS),
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    title: str = "",
) -> go.Figure:
    """Likely-copy fraction and median max r against training-set size or step, one line per model × dataset.

    Parameters
    ----------
    table : pandas.DataFrame
        A comparison table (:func:`memstudy.analysis.comparison_table`, or ``comparison.csv`` read
        back) with the columns ``model``, ``dataset``, ``x``, ``n_samples`` and each metric; one row
        per point (``channel`` or ``sampler`` tell lines apart too when they vary).
    samples : sequence of MemorizationReport or mapping, optional
        The per-sample values behind each row, in the table's row order (a comparison table keeps
        only summaries): a report, or a mapping with ``max_r`` (float, NaN for constant images) and
        ``likely_copy`` (bool) arrays of length ``n_samples`` (:func:`per_sample_values`). With them
        each point gets a percentile bootstrap interval over samples; without them, no intervals.
    x : str
        ``"n_train_images"``, ``"n_train_subjects"`` or ``"step"`` (any numeric column works).
    metrics : sequence of str
        Keys of :data:`CURVE_METRICS`, one panel each.
    n_boot, level, seed : int, float, int
        Bootstrap resamples, interval coverage, and the seed: row ``i`` (position in ``table``) draws
        from ``numpy.random.default_rng([seed, i])`` with :func:`bootstrap_interval`, so intervals do
        not depend on which other rows are drawn.
    title : str
        Figure title.

    Returns
    -------
    plotly.graph_objects.Figure
        One panel per metric; in each, one line per model × dataset named ``"<model>, <dataset>"``
        (legend shown once), points sorted by ``x`` with the table's values; with ``samples``,
        asymmetric error bars and ``customdata`` rows ``[low, high]`` (the interval bounds).

    Raises
    ------
    ValueError
        A missing column or metric, ``samples`` not one per row or not of length ``n_samples``, or two
        rows of one line at the same ``x``.
    """
    unknown = [m for m in metrics if m not in CURVE_METRICS]
    if unknown or not metrics:
        raise ValueError(f"metrics must be among {list(CURVE_METRICS)}, got {list(metrics)}")
    missing = [c for c in ("model", "dataset", x, "n_samples", *metrics) if c not in table]
    if missing:
        raise ValueError(f"memorization_curves: the table lacks the column(s) {', '.join(missing)}")
    if samples is not None and len(samples) != len(table):
        raise ValueError(
            f"samples has {len(samples)} entries but the table {len(table)} rows; give one per row"
        )
    if not 0 < level < 1 or n_boot < 1:
        raise ValueError(f"need 0 < level < 1 and n_boot >= 1, got level={level}, n_boot={n_boot}")
    table = table.reset_index(drop=True)
    keys = _line_keys(table, x)
    intervals: dict[str, np.ndarray] = {m: np.full((len(table), 2), np.nan) for m in metrics}
    if samples is not None:
        for i, item in enumerate(samples):
            arrays: Mapping[str, Any] = (
                per_sample_values(item) if isinstance(item, MemorizationReport) else item
            )
            values = {"median_max_r": arrays["max_r"], "frac_likely_copies": arrays["likely_copy"]}
            for metric in metrics:
                if len(values[metric]) != table.loc[i, "n_samples"]:
                    raise ValueError(
                        f"samples[{i}] has {len(values[metric])} values but row {i} has "
                        f"n_samples={table.loc[i, 'n_samples']}; samples must follow the table's rows"
                    )
            rng = np.random.default_rng([seed, i])
            for metric in metrics:
                intervals[metric][i] = bootstrap_interval(
                    values[metric], metric, n_boot=n_boot, level=level, rng=rng
                )
    figure = make_subplots(rows=1, cols=len(metrics), subplot_titles=[CURVE_METRICS[m] for m in metrics])
    for line, (key, rows) in enumerate(table.groupby(keys, sort=True, dropna=False)):
        rows = rows.sort_values(x)
        name = ", ".join(str(v) for v in key)
        for column, metric in enumerate(metrics, start=1):
            y = rows[metric].to_numpy(dtype=np.float64)
            bounds = intervals[metric][rows.index.to_numpy()]
            error = None
            if samples is not None:
                error = {
                    "type": "data",
                    "symmetric": False,
                    "array": bounds[:, 1] - y,
                    "arrayminus": y - bounds[:, 0],
                }
            figure.add_scatter(
                x=rows[x].to_numpy(),
                y=y,
                mode="lines+markers",
                name=name,
                legendgroup=name,
                showlegend=column == 1,
                line={"color": _COLOURS[line % len(_COLOURS)]},
                error_y=error,
                customdata=bounds if samples is not None else None,
                hovertemplate=(
                    f"{name}<br>{x}=%{{x}}<br>{metric}=%{{y:.3f}}"
                    + (
                        f"<br>{100 * level:g}% CI %{{customdata[0]:.3f}}–%{{customdata[1]:.3f}}"
                        if samples is not None
                        else ""
                    )
                    + "<extra></extra>"
                ),
                row=1,
                col=column,
            )
            figure.update_yaxes(title_text=CURVE_METRICS[metric], row=1, col=column)
            numeric = pd.to_numeric(table[x], errors="coerce")
            log = x != "step" and numeric.min() > 0 and numeric.max() >= 10 * numeric.min()
            figure.update_xaxes(
                title_text=_AXIS_TITLES.get(x, x), type="log" if log else None, row=1, col=column
            )
    figure.update_layout(title=title or None, height=420, margin={"t": 80 if title else 50})
    return figure


# plotly's default qualitative colours, so that one model × dataset has one colour in every panel.
_COLOURS = ("#636efa", "#EF553B", "#00cc96", "#ab63fa", "#FFA15A", "#19d3f3", "#FF6692", "#B6E880")
