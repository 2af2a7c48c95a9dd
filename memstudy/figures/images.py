"""What the match figures and the browser show of an image: 2D views, neighbouring slices, aligned pairs."""

from __future__ import annotations

import re

import numpy as np

from memstudy.analysis.transforms import Transform, apply_transform
from memstudy.correlate.exclude import slice_positions
from memstudy.data import ImageSet

_TRANSFORM_NAME = re.compile(r"^(mirror)?\s*(?:shift\(([+-]\d+),([+-]\d+)\))?$")


def middle_slice(image: np.ndarray) -> np.ndarray:
    """A 2D view of one channel: the image itself, or the middle axial slice of a volume."""
    return image if image.ndim == 2 else image[image.shape[0] // 2]


def display_channel(report_channel: str, channels: tuple[str, ...]) -> int:
    """The channel to show for a report: its own channel, or the first one for a report of all channels.

    Raises
    ------
    ValueError
        If ``report_channel`` is neither ``"all"`` nor one of ``channels``.
    """
    if report_channel == "all":
        return 0
    if report_channel not in channels:
        raise ValueError(
            f"the report's channel {report_channel!r} is not among the images' channels {channels}"
        )
    return channels.index(report_channel)


def view(image: np.ndarray, channel: int) -> np.ndarray:
    """The 2D uint8 picture shown of an image ``(C, H, W)`` or ``(C, D, H, W)``: one channel, middle slice."""
    return np.ascontiguousarray(middle_slice(np.asarray(image)[channel]))


def neighbour_slices(training: ImageSet, index: int, n: int) -> list[int]:
    """Training indices of the slices of ``index``'s subject within ``n`` slice positions, by position.

    The image itself is included. Positions come from names like ``subject/z078``
    (:func:`memstudy.correlate.exclude.slice_positions`); images whose names carry no slice (chest
    x-rays) have no neighbours, and the list is empty.
    """
    positions = slice_positions(training.names)
    if positions is None or index < 0 or n < 0:
        return []
    same = (training.groups == training.groups[index]) & (np.abs(positions - positions[index]) <= n)
    found = np.flatnonzero(same)
    return [int(i) for i in found[np.argsort(positions[found], kind="stable")]]


def image_class(training: ImageSet, index: int) -> str | None:
    """The class of training image ``index`` (``provenance["classes"]``, one per image), if recorded."""
    classes = training.provenance.get("classes") if training.provenance else None
    if isinstance(classes, list | tuple) and len(classes) == len(training) and index >= 0:
        return str(classes[index])
    return None


def parse_transform(name: str) -> Transform:
    """The :class:`~memstudy.analysis.transforms.Transform` named ``identity``, ``mirror shift(+2,-1)``..."""
    if name == "identity":
        return Transform()
    found = _TRANSFORM_NAME.match(str(name))
    if not found or not (found.group(1) or found.group(2)):
        raise ValueError(
            f"unknown transform name {name!r}; expected e.g. 'identity', 'mirror', 'shift(+1,-2)'"
        )
    dy, dx = (int(found.group(i)) if found.group(i) else 0 for i in (2, 3))
    return Transform(mirror=bool(found.group(1)), dy=dy, dx=dx)


def aligned_pair(
    synthetic: np.ndarray, training: np.ndarray, transform: str
) -> tuple[np.ndarray, np.ndarray]:
    """The pixels of a synthetic image and of its match that the report correlated, aligned.

    Parameters
    ----------
    synthetic, training : ndarray, shape (..., H, W)
        One image each, any leading channel or depth axes.
    transform : str
        The report's transform name for the synthetic image (``identity`` without transforms).

    Returns
    -------
    (ndarray, ndarray)
        The transformed synthetic image and the training image, cropped to their overlap
        (:func:`memstudy.analysis.transforms.apply_transform`), dtype as given.
    """
    query, target = apply_transform(synthetic[None], training[None], parse_transform(transform))
    return query[0], np.asarray(target[0])
