"""The paper's top-pairs figure: a synthetic image beside its best training match, compared pixel by pixel."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from memstudy.analysis.memorization import MemorizationReport
from memstudy.data import ImageSet
from memstudy.figures.data import _mosaic
from memstudy.figures.images import aligned_pair, display_channel, image_class, neighbour_slices, view


def top_pair_order(report: MemorizationReport, n_pairs: int) -> np.ndarray:
    """Indices of the ``n_pairs`` synthetic images with the highest max r (ties: lower index first)."""
    finite = np.flatnonzero(np.isfinite(report.max_r))
    return finite[np.argsort(-report.max_r[finite], kind="stable")][:n_pairs]


def _image(picture: np.ndarray, *, diverging: bool = False) -> go.Heatmap:
    if diverging:
        return go.Heatmap(z=picture, colorscale="RdBu", zmid=0, zmin=-255, zmax=255, showscale=False)
    return go.Heatmap(z=picture, colorscale="gray", zmin=0, zmax=255, showscale=False)


def _provenance(report: MemorizationReport, training: ImageSet, i: int, neighbours: list[int]) -> str:
    """The text that stands for the training images when they must not be shown."""
    j = int(report.match_indices[i, 0])
    details = [f"subject {report.match_subjects[i, 0]}"]
    if report.match_slices[i, 0] >= 0:
        details.append(f"slice {report.match_slices[i, 0]}")
    label = image_class(training, j)
    if label is not None:
        details.append(f"class {label}")
    copy = "yes" if i in set(report.likely_copies.tolist()) else "no"
    lines = [
        f"best match: {report.match_names[i, 0]} ({', '.join(details)})",
        f"r = {report.max_r[i]:.4f}; margin {report.margin[i]:.4f} (threshold {report.margin_threshold:.4f})",
        f"transform: {report.transform[i]}; likely copy: {copy}",
        "neighbouring slices: " + (", ".join(training.names[n] for n in neighbours if n != j) or "none"),
        "training images hidden (show_training_images=False)",
    ]
    return "<br>".join(lines)


def top_pairs(
    report: MemorizationReport,
    synthetic: ImageSet | np.ndarray,
    training: ImageSet,
    *,
    n_pairs: int = 4,
    neighbours: int = 2,
    show_training_images: bool = True,
    max_points: int = 4096,
    seed: int = 0,
    title: str = "",
) -> go.Figure:
    """The synthetic images with the highest max r, each beside its best training match.

    Parameters
    ----------
    report : MemorizationReport
        The report of ``synthetic`` against ``training``.
    synthetic : ImageSet or ndarray of uint8, shape (N, C, H, W) or (N, C, D, H, W)
        The synthetic images the report was computed on (0–255).
    training : ImageSet
        The training set the report was computed against (indices as in the report).
    n_pairs : int
        Rows: the ``n_pairs`` synthetic images with the highest finite max r.
    neighbours : int
        Slices on each side of the best match shown from the same subject (names like
        ``subject/z078``); none for images that are not slices.
    show_training_images : bool
        False (data under a use agreement) replaces every panel that shows training pixels (the
        match, the difference, the scatter plot, the neighbouring slices) by the match's provenance
        and r; only the synthetic images are drawn.
    max_points : int
        At most this many pixel pairs in a scatter plot (a seeded random subset when there are more).
    seed : int
        Seed of that subset.
    title : str
        Figure title.

    Returns
    -------
    plotly.graph_objects.Figure
        Per row: the synthetic image, the best match, their difference (synthetic − match, after the
        report's transform, on the pixels they share, in [-255, 255]), the scatter of the paired
        pixel intensities (all the report's channels; its r is the report's max r) and the matched
        subject's neighbouring slices side by side. Images show the report's channel (the first for a
        report of all channels), middle slice of volumes, on a fixed 0–255 gray scale.
    """
    images = synthetic.images if isinstance(synthetic, ImageSet) else np.asarray(synthetic)
    if len(images) != report.max_r.size:
        raise ValueError(f"synthetic has {len(images)} images but the report {report.max_r.size}")
    if n_pairs < 1:
        raise ValueError(f"n_pairs must be at least 1, got {n_pairs}")
    channel = display_channel(report.channel, training.channels)
    picked = top_pair_order(report, n_pairs)
    if not picked.size:
        raise ValueError("no synthetic image has a match (all are constant)")
    columns = 5 if show_training_images else 2
    titles, rows = [], []
    for i in picked:
        j = int(report.match_indices[i, 0])
        near = neighbour_slices(training, j, neighbours)
        rows.append((int(i), j, near))
        titles.append(f"synthetic #{i}")
        if show_training_images:
            positions = [
                f"[{training.names[n].split('/')[-1]}]" if n == j else training.names[n].split("/")[-1]
                for n in near
            ]
            titles += [
                f"{report.match_names[i, 0]} (r = {report.max_r[i]:.3f})",
                "difference" + ("" if report.transform[i] == "identity" else f" ({report.transform[i]})"),
                "pixel intensities",
                f"subject {report.match_subjects[i, 0]}: {' '.join(positions)}"
                if near
                else "no neighbouring slices",
            ]
        else:
            titles.append("best training match (not shown)")
    figure = make_subplots(
        rows=len(rows),
        cols=columns,
        subplot_titles=titles,
        column_widths=None if show_training_images else [0.3, 0.7],
        horizontal_spacing=0.03,
        vertical_spacing=0.08,
    )
    rng = np.random.default_rng(seed)
    for row, (i, j, near) in enumerate(rows, start=1):
        figure.add_trace(_image(view(images[i], channel)), row=row, col=1)
        if not show_training_images:
            cell = (row - 1) * columns + 2
            figure.add_annotation(
                text=_provenance(report, training, i, near),
                x=figure.layout[f"xaxis{cell}"].domain[0],
                y=sum(figure.layout[f"yaxis{cell}"].domain) / 2,
                xref="paper",
                yref="paper",
                showarrow=False,
                align="left",
                xanchor="left",
                font={"size": 11},
            )
            continue
        query, target = aligned_pair(images[i], training.images[j], report.transform[i])
        figure.add_trace(_image(view(training.images[j], channel)), row=row, col=2)
        difference = view(query, channel).astype(np.int16) - view(target, channel).astype(np.int16)
        figure.add_trace(_image(difference, diverging=True), row=row, col=3)
        pick = slice(None) if report.channel == "all" else channel
        xs, ys = target[pick].ravel(), query[pick].ravel()
        if xs.size > max_points:
            keep = np.sort(rng.choice(xs.size, max_points, replace=False))
            xs, ys = xs[keep], ys[keep]
        figure.add_trace(
            go.Scatter(x=xs, y=ys, mode="markers", marker={"size": 2, "opacity": 0.4}, showlegend=False),
            row=row,
            col=4,
        )
        figure.update_xaxes(title_text="training intensity", range=[0, 255], row=row, col=4)
        figure.update_yaxes(title_text="synthetic intensity", range=[0, 255], row=row, col=4)
        if near:
            figure.add_trace(
                _image(_mosaic([view(training.images[n], channel) for n in near], len(near))), row=row, col=5
            )
    for row in range(1, len(rows) + 1):
        for col in range(1, columns + 1):
            if show_training_images and col == 4:
                continue
            axis = (row - 1) * columns + col
            figure.update_xaxes(visible=False, row=row, col=col)
            if not show_training_images and col == 2:
                figure.update_yaxes(visible=False, row=row, col=col)
                continue
            figure.update_yaxes(
                visible=False,
                autorange="reversed",
                scaleanchor="x" if axis == 1 else f"x{axis}",
                row=row,
                col=col,
            )
    figure.update_annotations(font_size=11)
    figure.update_layout(
        title=title or None,
        height=60 + 240 * len(rows),
        margin={"t": 80 if title else 50, "l": 10, "r": 10},
        showlegend=False,
    )
    return figure
