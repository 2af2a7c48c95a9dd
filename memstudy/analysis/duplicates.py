"""Near-duplicates within a training set (adjacent slices of a volume) and removing them."""

from __future__ import annotations

import numpy as np
import pandas as pd

from memstudy.correlate import Exclude, topk_pearson
from memstudy.correlate.exclude import slice_positions
from memstudy.data import ImageSet

#: Matches kept per image in the first pass; rows with more near-duplicates are searched again.
_FIRST_K = 8


def near_duplicate_pairs(images: np.ndarray, *, threshold: float = 0.95) -> tuple:
    """Every pair of images whose Pearson r exceeds ``threshold``, found with the exact engine.

    Parameters
    ----------
    images : ndarray, shape (N, ...)
        One image per entry of axis 0, flattened whole.
    threshold : float
        Pairs with r strictly above it are returned.

    Returns
    -------
    (ndarray, ndarray, ndarray)
        ``first`` < ``second`` (int64 indices) and ``r`` (float32), ordered by ``first``, then
        ``second``.

    Notes
    -----
    A leave-one-out top-k search; a row whose k-th match still exceeds the threshold may have more
    near-duplicates, so it is searched again with four times the k until it has none left over.
    No pair above the threshold is missed.
    """
    if not -1 <= threshold < 1:
        raise ValueError(f"threshold must be a Pearson r in [-1, 1), got {threshold}")
    n = len(images)
    found: dict[tuple[int, int], float] = {}
    if n < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    ids = np.arange(n)
    rows, k = ids, min(_FIRST_K, n - 1)
    while rows.size:
        # Each image its own group: leave-one-out for any subset of rows.
        exclude = Exclude(self_match=False, same_group=True, groups=(ids[rows], ids))
        matches = topk_pearson(images[rows], images, k, exclude=exclude, progress=False)
        above = matches.values > threshold
        for row, col in zip(*np.nonzero(above), strict=True):
            i, j = sorted((int(rows[row]), int(matches.indices[row, col])))
            found[(i, j)] = max(found.get((i, j), -1.0), float(matches.values[row, col]))
        if k == n - 1:
            break
        rows = rows[above[:, -1]]
        k = min(4 * k, n - 1)
    pairs = sorted(found)
    first = np.array([p[0] for p in pairs], dtype=np.int64)
    second = np.array([p[1] for p in pairs], dtype=np.int64)
    return first, second, np.array([found[p] for p in pairs], dtype=np.float32)


def _select(imageset: ImageSet, channel: int | str | None) -> np.ndarray:
    if channel is None:
        return imageset.images
    if isinstance(channel, str):
        return imageset.channel(channel)
    return imageset.images[:, channel]


def near_duplicates(
    imageset: ImageSet, *, threshold: float = 0.95, channel: int | str | None = None
) -> pd.DataFrame:
    """Pairs of images of a set with Pearson r above ``threshold``, with their provenance.

    Parameters
    ----------
    imageset : ImageSet
    threshold : float
        Pairs with r strictly above it are reported (0.95: the level related work deduplicates at).
    channel : int, str or None
        One channel, or None for all channels together.

    Returns
    -------
    pandas.DataFrame
        One row per pair, highest r first: ``first``, ``second`` (indices, first < second),
        ``first_name``, ``second_name``, ``r``, ``same_subject`` and ``slice_distance`` (axial
        distance for slices of one subject, else -1). Slices of one volume next to each other are
        the usual near-duplicates.
    """
    first, second, r = near_duplicate_pairs(_select(imageset, channel), threshold=threshold)
    positions = slice_positions(imageset.names)
    same = imageset.groups[first] == imageset.groups[second]
    distance = np.full(first.size, -1, dtype=np.int64)
    if positions is not None:
        distance[same] = np.abs(positions[first] - positions[second])[same]
    table = pd.DataFrame(
        {
            "first": first,
            "second": second,
            "first_name": [imageset.names[i] for i in first],
            "second_name": [imageset.names[i] for i in second],
            "r": r,
            "same_subject": same,
            "slice_distance": distance,
        }
    )
    return table.sort_values(["r", "first", "second"], ascending=[False, True, True], ignore_index=True)


def kept_after_dedup(n: int, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Indices kept when, in index order, each image that duplicates a kept earlier one is dropped.

    Greedy and deterministic: image j is removed if some i < j with a near-duplicate pair (i, j) was
    kept. A run of adjacent near-identical slices keeps its first slice, and every other image whose
    only near-duplicates were removed stays.
    """
    kept = np.ones(n, dtype=bool)
    order = np.lexsort((first, second))
    for i, j in zip(first[order], second[order], strict=True):
        if kept[i]:
            kept[j] = False
    return np.flatnonzero(kept)


def deduplicate(
    imageset: ImageSet, *, threshold: float = 0.95, channel: int | str | None = None
) -> tuple[ImageSet, np.ndarray]:
    """Drop near-duplicates (r > ``threshold``) from a set before analysing it.

    Parameters
    ----------
    imageset : ImageSet
    threshold : float
        Images correlating above it with an earlier kept image are removed (see
        :func:`kept_after_dedup`).
    channel : int, str or None
        The channel whose r decides (None: all channels together).

    Returns
    -------
    (ImageSet, ndarray)
        The images kept (a copy) and the indices of the removed ones (int64, ascending).
    """
    first, second, _ = near_duplicate_pairs(_select(imageset, channel), threshold=threshold)
    kept = kept_after_dedup(len(imageset), first, second)
    return imageset.subset(kept), np.setdiff1d(np.arange(len(imageset)), kept)
