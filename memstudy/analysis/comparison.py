"""The cross-run table: one tidy row per run × checkpoint, saved as ``comparison.csv``; the rows that
make its curves, and its sentences on training-set size."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import pandas as pd

from memstudy.analysis.memorization import MemorizationReport
from memstudy.atomic import atomic_path

#: The columns every ``comparison.csv`` starts with, in this order (the workflow's run-folder
#: contract); ``holdout_p99`` is the 99th percentile of held-out → train max r and
#: ``frac_likely_copies`` the fraction of samples the calibrated call calls copies.
COMPARISON_COLUMNS = (
    "dataset",
    "model",
    "n_train_subjects",
    "n_train_images",
    "seed",
    "step",
    "n_samples",
    "sampler",
    "median_max_r",
    "p95_max_r",
    "frac_above_0.95",
    "holdout_p99",
    "frac_above_holdout_p99",
    "frac_likely_copies",
    "train_train_median_max_r",
)


def comparison_table(reports_or_rows: Iterable[MemorizationReport | Mapping[str, Any]]) -> pd.DataFrame:
    """Stack reports (their :meth:`~MemorizationReport.summary`) or summary rows into one table.

    Parameters
    ----------
    reports_or_rows : iterable of MemorizationReport or mapping
        One per run × checkpoint (× channel, where a ``channel`` column tells them apart). A report
        contributes ``summary()`` with the run fields given to :func:`memorization_report`; to add
        run fields afterwards pass ``report.summary(dataset=..., model=..., ...)`` instead.

    Returns
    -------
    pandas.DataFrame
        Exactly :data:`COMPARISON_COLUMNS` first, then every other column any row has (in order of
        first appearance, e.g. ``channel``, ``threshold``, ``mann_whitney_p``, ``model_size``);
        a row without one of those extra columns gets NaN there.

    Raises
    ------
    ValueError
        When a row lacks a contract column (naming the row and the columns), or there are no rows.
    """
    rows = [
        item.summary() if isinstance(item, MemorizationReport) else dict(item) for item in reports_or_rows
    ]
    if not rows:
        raise ValueError("comparison_table needs at least one report or row")
    for i, row in enumerate(rows):
        missing = [c for c in COMPARISON_COLUMNS if c not in row]
        if missing:
            raise ValueError(
                f"comparison row {i} lacks {', '.join(missing)}; pass the run fields as "
                "report.summary(dataset=..., model=..., seed=..., step=..., sampler=...)"
            )
    extra = list(dict.fromkeys(c for row in rows for c in row if c not in COMPARISON_COLUMNS))
    return pd.DataFrame(rows, columns=[*COMPARISON_COLUMNS, *extra])


def save_comparison(table: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write a comparison table as CSV (atomically), after checking it starts with the contract's columns."""
    if tuple(table.columns[: len(COMPARISON_COLUMNS)]) != COMPARISON_COLUMNS:
        raise ValueError(f"{path}: a comparison table must start with the columns {COMPARISON_COLUMNS}")
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)


def curve_rows(table: pd.DataFrame, x: str) -> pd.DataFrame:
    """The rows of a comparison table that make curves against ``x``, one point per line and ``x``.

    Against ``"step"`` every row is a point; against anything else (the training-set size) each run
    contributes its last step. Where several runs of one model and dataset would share a point (other
    training-set sizes, other seeds), ``dataset`` is labelled with what tells them apart, e.g.
    ``"cxr-phantom, 16 subjects"``, so that each run keeps its own line.
    """
    if x != "step":
        table = table[table["step"] == table.groupby("run_dir")["step"].transform("max")]
    labels = {"n_train_subjects": "{} subjects", "seed": "seed {}"}
    varying = [c for c in labels if c != x and (table.groupby(["model", "dataset"])[c].nunique() > 1).any()]
    if varying:
        suffix = [table[c].map(labels[c].format) for c in varying]
        table = table.assign(dataset=table["dataset"].str.cat(suffix, sep=", "))
    return table.reset_index(drop=True)


def size_statements(table: pd.DataFrame) -> list[str]:
    """Plain sentences comparing each model and dataset's smallest and largest training set.

    For every model, dataset and channel with at least two training-set sizes: the likely-copy
    fraction and median max r of the smallest and the largest, each run at its last step (the mean
    over seeds where a plan has several). Empty when no model and dataset has two sizes.
    """
    last = table[table["step"] == table.groupby("run_dir")["step"].transform("max")]
    means = last.groupby(["model", "dataset", "channel", "n_train_subjects"], sort=True)[
        ["frac_likely_copies", "median_max_r", "step"]
    ].mean()
    statements = []
    for (model, dataset, channel), sizes in means.groupby(level=[0, 1, 2], sort=True):
        if len(sizes) < 2:
            continue
        small, large = sizes.iloc[0], sizes.iloc[-1]
        n_small, n_large = sizes.index[0][-1], sizes.index[-1][-1]
        subjects = "subject" if n_small == 1 else "subjects"
        statements.append(
            f"{model} on {dataset} ({channel}): {100 * small.frac_likely_copies:.0f} % likely copies "
            f"(median max r {small.median_max_r:.3f}) with {n_small} training {subjects} vs "
            f"{100 * large.frac_likely_copies:.0f} % ({large.median_max_r:.3f}) with {n_large}."
        )
    return statements
