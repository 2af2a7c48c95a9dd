"""Summaries of datasets and of memorization measurements.

``datasets``: how alike a dataset's images are; ``memorization``: the calibrated memorization report;
``transforms``: mirrored and shifted matches; ``duplicates``: training near-duplicates and dedup;
``comparison``: the cross-run ``comparison.csv`` table, its curves and size sentences; ``paper``: that
table against the paper's findings.
"""

from memstudy.analysis.comparison import (
    COMPARISON_COLUMNS,
    comparison_table,
    curve_rows,
    save_comparison,
    size_statements,
)
from memstudy.analysis.datasets import (
    correlation_by_slice_distance,
    dataset_summary,
    nan_median,
    nearest_other_subject,
    neighbour_statistics,
    slice_positions,
    standardized,
)
from memstudy.analysis.duplicates import deduplicate, near_duplicates
from memstudy.analysis.memorization import (
    FIXED_THRESHOLDS,
    MemorizationReport,
    memorization_report,
    memorization_reports,
)
from memstudy.analysis.paper import paper_claims
from memstudy.analysis.transforms import Transform, transform_list

__all__ = [
    "COMPARISON_COLUMNS",
    "FIXED_THRESHOLDS",
    "MemorizationReport",
    "Transform",
    "comparison_table",
    "correlation_by_slice_distance",
    "curve_rows",
    "dataset_summary",
    "deduplicate",
    "memorization_report",
    "memorization_reports",
    "nan_median",
    "near_duplicates",
    "nearest_other_subject",
    "neighbour_statistics",
    "paper_claims",
    "save_comparison",
    "size_statements",
    "slice_positions",
    "standardized",
    "transform_list",
]
