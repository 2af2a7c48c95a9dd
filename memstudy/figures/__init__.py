"""Plotly figures for the book; every one renders without a kernel.

``data``: the data chapter (examples, images per subject, neighbour correlations); ``memorization``:
max r against its baselines and memorization across runs; ``pairs``: the paper's top-pairs figure;
``images``: what the figures and :mod:`memstudy.browser` show of an image; ``offline``: the plotly
renderer every notebook sets, whose HTML the offline book renders.

The names below are imported on first use, so a notebook that draws one figure depends on that
figure's module only (the workflow's code stamps, :mod:`memstudy.workflow.stamps`, follow this table).
"""

import importlib

_EXPORTS = {
    "memstudy.figures.data": (
        "correlation_by_distance",
        "correlation_histogram",
        "example_images",
        "images_per_subject",
        "neighbour_correlations",
    ),
    "memstudy.figures.images": ("middle_slice",),
    "memstudy.figures.memorization": (
        "CURVE_METRICS",
        "bootstrap_interval",
        "ecdf",
        "max_r_ecdf",
        "memorization_curves",
        "per_sample_values",
    ),
    "memstudy.figures.offline": ("use_offline_plotly_renderer",),
    "memstudy.figures.pairs": ("top_pair_order", "top_pairs"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'memstudy.figures' has no attribute {name!r}")
    return getattr(importlib.import_module(_MODULE_OF[name]), name)
