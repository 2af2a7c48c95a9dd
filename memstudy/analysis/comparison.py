"""The cross-run table: one tidy row per run × checkpoint, saved as ``comparison.csv``."""

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
