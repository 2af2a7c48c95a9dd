"""Summaries of datasets: counts, and how alike slices of one volume and images of different subjects are."""

from __future__ import annotations

import numpy as np

from memstudy.correlate import topk_pearson
from memstudy.correlate.backend_numpy import standardize
from memstudy.correlate.exclude import slice_positions as names_to_slice_positions
from memstudy.data import ImageSet


def slice_positions(imageset: ImageSet) -> np.ndarray | None:
    """Axial position of every image from names like ``subject/z078``; None if images are not slices.

    The rule is the correlation engine's (:func:`memstudy.correlate.exclude.slice_positions`).
    """
    return names_to_slice_positions(imageset.names)


def standardized(images: np.ndarray) -> np.ndarray:
    """Flatten images and scale each to zero mean and unit norm (float32), so that r = a @ b.T.

    The correlation engine's standardization; a constant image (no defined r) becomes NaN.
    """
    unit, undefined = standardize(np.asarray(images).reshape(len(images), -1))
    unit[undefined] = np.nan
    return unit


def dataset_summary(imageset: ImageSet) -> dict:
    """Counts that describe an ImageSet: images, subjects, shape, images per subject."""
    _, per_subject = np.unique(imageset.groups, return_counts=True)
    return {
        "images": len(imageset),
        "subjects": int(per_subject.size),
        "image_shape": list(imageset.image_shape),
        "channels": list(imageset.channels),
        "images_per_subject_median": float(np.median(per_subject)),
        "images_per_subject_min": int(per_subject.min()),
        "images_per_subject_max": int(per_subject.max()),
    }


def correlation_by_slice_distance(
    imageset: ImageSet, *, channel: int = 0, max_distance: int = 10
) -> dict[int, np.ndarray]:
    """Pearson r between slices of the same subject, grouped by their axial distance.

    Returns ``{distance: r values}`` for distances 1..max_distance (only distances that occur).
    """
    z = slice_positions(imageset)
    if z is None:
        raise ValueError("correlation_by_slice_distance needs slice names like 'subject/z078'")
    found: dict[int, list[np.ndarray]] = {d: [] for d in range(1, max_distance + 1)}
    for group in np.unique(imageset.groups):
        members = np.flatnonzero(imageset.groups == group)
        unit = standardized(imageset.images[members, channel])
        r = unit @ unit.T
        distance = np.abs(z[members][:, None] - z[members][None, :])
        for d in found:
            upper = np.triu(distance == d, k=1)
            found[d].append(r[upper])
    return {d: np.concatenate(v) for d, v in found.items() if sum(map(len, v))}


def nearest_other_subject(
    imageset: ImageSet, *, channel: int = 0, max_images: int = 2000, seed: int = 0
) -> np.ndarray:
    """For each image, the highest Pearson r with any image of another subject.

    At most ``max_images`` images (a fixed random subset) are compared, to keep this quick.
    This is the level two *different* people's images reach; copies sit far above it. An image
    with no other-subject match (a one-subject set, or a constant image) gets NaN.
    """
    rng = np.random.default_rng(seed)
    chosen = imageset.subset(np.sort(rng.permutation(len(imageset))[:max_images]))
    matches = topk_pearson(chosen, chosen, k=1, exclude="group", channel=channel, progress=False)
    return matches.values[:, 0]


def nan_median(values: np.ndarray) -> tuple[float, int]:
    """Median of the finite values and how many NaN values were left out; NaN if none is finite."""
    values = np.asarray(values, dtype=np.float64).ravel()
    kept = values[~np.isnan(values)]
    return (float(np.median(kept)) if kept.size else float("nan")), int(values.size - kept.size)


def neighbour_statistics(imageset: ImageSet, *, channel: int = 0, max_distance: int = 10) -> dict:
    """How alike a dataset's images are: within a volume by slice distance, and across subjects.

    Returns a dict with ``other_subject`` (each image's best r with another subject's image),
    ``by_distance`` (``{d: r values}`` for slices d apart in one subject, or None when the images
    are not slices of volumes) and their medians, ready for the data notebook's summary. The
    medians leave out NaN values (constant slices, images without another subject's match) and
    count them in ``adjacent_dropped`` and ``other_subject_dropped``; a median over nothing is NaN.
    """
    by_distance = None
    if slice_positions(imageset) is not None:
        by_distance = correlation_by_slice_distance(imageset, channel=channel, max_distance=max_distance)
    other = nearest_other_subject(imageset, channel=channel)
    median_other, dropped_other = nan_median(other)
    median_adjacent, dropped_adjacent = None, 0
    if by_distance and 1 in by_distance:
        median_adjacent, dropped_adjacent = nan_median(by_distance[1])
    return {
        "by_distance": by_distance,
        "other_subject": other,
        "median_adjacent_r": median_adjacent,
        "adjacent_dropped": dropped_adjacent,
        "median_other_subject_r": median_other,
        "other_subject_dropped": dropped_other,
    }
