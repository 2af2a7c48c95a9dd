"""Figures of the data chapter: example images, images per subject, neighbour correlations."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from memstudy.data import ImageSet
from memstudy.figures.images import middle_slice


def _mosaic(tiles: list[np.ndarray], columns: int, gap: int = 2) -> np.ndarray:
    """Tile equal-sized uint8 images into one picture, row by row, with white gaps."""
    h, w = tiles[0].shape
    rows = -(-len(tiles) // columns)
    out = np.full((rows * (h + gap) - gap, columns * (w + gap) - gap), 255, np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        out[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = tile
    return out


def example_images(imageset: ImageSet, *, n_examples: int = 4, seed: int = 0, title: str = "") -> go.Figure:
    """Show ``n_examples`` images from distinct subjects, one row per channel.

    Parameters
    ----------
    imageset : ImageSet
        Images to show (uint8, 0–255, shown on a fixed 0–255 gray scale).
    n_examples : int
        Columns: images from different subjects, chosen with ``seed``.
    """
    rng = np.random.default_rng(seed)
    subjects = rng.permutation(np.unique(imageset.groups))[:n_examples]
    picks = [int(rng.choice(np.flatnonzero(imageset.groups == s))) for s in subjects]
    tiles = [middle_slice(imageset.images[i, c]) for c in range(len(imageset.channels)) for i in picks]
    figure = go.Figure(go.Image(z=np.repeat(_mosaic(tiles, len(picks))[..., None], 3, axis=2)))
    h, w = tiles[0].shape
    for c, channel in enumerate(imageset.channels):
        figure.add_annotation(x=-4, y=c * (h + 2) + h / 2, text=channel, showarrow=False, xanchor="right")
    for j, i in enumerate(picks):
        figure.add_annotation(
            x=j * (w + 2) + w / 2,
            y=-4,
            text=imageset.names[i],
            showarrow=False,
            yanchor="bottom",
            font={"size": 10},
        )
    figure.update_xaxes(visible=False)
    figure.update_yaxes(visible=False)
    figure.update_layout(
        title=title or None,
        margin={"l": 60, "r": 10, "t": 60 if title else 30, "b": 10},
        height=min(900, 110 + 140 * len(imageset.channels)),
    )
    return figure


def images_per_subject(imageset: ImageSet) -> go.Figure:
    """Bar chart: how many images each subject contributes."""
    subjects, counts = np.unique(imageset.groups, return_counts=True)
    labels = [
        next(n.split("/")[0] for n, g in zip(imageset.names, imageset.groups, strict=True) if g == s)
        for s in subjects
    ]
    figure = go.Figure(go.Bar(x=labels, y=counts))
    figure.update_layout(
        xaxis_title="subject", yaxis_title="images kept", height=320, margin={"t": 30, "b": 80}
    )
    return figure


def correlation_by_distance(by_distance: dict[int, np.ndarray], other_subjects: np.ndarray) -> go.Figure:
    """Median and quartiles of r between slices by axial distance, beside the other-subject level."""
    distances = sorted(by_distance)
    q1, median, q3 = (
        np.array([np.nanpercentile(by_distance[d], q) for d in distances]) for q in (25, 50, 75)
    )
    figure = go.Figure(
        [
            go.Scatter(
                x=distances + distances[::-1],
                y=np.concatenate([q3, q1[::-1]]),
                fill="toself",
                line={"width": 0},
                fillcolor="rgba(31,119,180,0.2)",
                name="quartiles, same subject",
            ),
            go.Scatter(x=distances, y=median, mode="lines+markers", name="median r, same subject"),
        ]
    )
    level = float(np.nanmedian(other_subjects))
    figure.add_hline(
        y=level, line_dash="dash", annotation_text=f"median best match in another subject: {level:.2f}"
    )
    figure.update_layout(
        xaxis_title="distance between axial slices (slices)",
        yaxis_title="Pearson r",
        height=380,
        margin={"t": 30},
    )
    return figure


def correlation_histogram(values: np.ndarray, *, label: str) -> go.Figure:
    """Histogram of correlation values."""
    figure = go.Figure(go.Histogram(x=values, nbinsx=40, name=label))
    figure.update_layout(xaxis_title=label, yaxis_title="images", height=320, margin={"t": 30})
    return figure


def neighbour_correlations(stats: dict) -> go.Figure:
    """The figure for :func:`memstudy.analysis.neighbour_statistics`: r by slice distance for volumes,
    else the histogram of each image's best match in another subject."""
    if stats["by_distance"]:
        return correlation_by_distance(stats["by_distance"], stats["other_subject"])
    return correlation_histogram(stats["other_subject"], label="best Pearson r with another subject's image")
