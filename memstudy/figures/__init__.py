"""Plotly figures for the book; every one renders without a kernel.

``data``: the data chapter (examples, images per subject, neighbour correlations); ``memorization``:
max r against its baselines and memorization across runs; ``pairs``: the paper's top-pairs figure;
``images``: what the figures and :mod:`memstudy.browser` show of an image.
"""

from memstudy.figures.data import (
    correlation_by_distance,
    correlation_histogram,
    example_images,
    images_per_subject,
    neighbour_correlations,
)
from memstudy.figures.images import middle_slice
from memstudy.figures.memorization import (
    CURVE_METRICS,
    bootstrap_interval,
    ecdf,
    max_r_ecdf,
    memorization_curves,
    per_sample_values,
)
from memstudy.figures.pairs import top_pair_order, top_pairs

__all__ = [
    "CURVE_METRICS",
    "bootstrap_interval",
    "correlation_by_distance",
    "correlation_histogram",
    "ecdf",
    "example_images",
    "images_per_subject",
    "max_r_ecdf",
    "memorization_curves",
    "middle_slice",
    "neighbour_correlations",
    "per_sample_values",
    "top_pair_order",
    "top_pairs",
]
