"""Mirror images and small shifts: copies that zero-lag pixel correlation misses.

A model trained with random flips (the authors' StyleGAN, ``--mirror=1``) can reproduce a training
image mirrored, and a convolutional generator can reproduce it a few pixels off. Each transform here
is scored with the same exact engine by searching the transformed query images against the training
images cropped to match.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Transform:
    """The query image mirrored left–right (``mirror``), then taken as moved by ``(dy, dx)`` pixels.

    ``dy > 0`` means the query's content sits ``dy`` rows lower than in the training image it copies,
    ``dx > 0`` that many columns further right.
    """

    mirror: bool = False
    dy: int = 0
    dx: int = 0

    @property
    def name(self) -> str:
        """``identity``, ``mirror``, ``shift(+2,-1)`` or ``mirror shift(+2,-1)``."""
        parts = ["mirror"] if self.mirror else []
        if self.dy or self.dx:
            parts.append(f"shift({self.dy:+d},{self.dx:+d})")
        return " ".join(parts) or "identity"


def transform_list(*, mirror: bool = False, max_shift: int = 0) -> tuple[Transform, ...]:
    """Every transform to score: identity first, then shifts, then the mirrored ones.

    Parameters
    ----------
    mirror : bool
        Also score the mirrored query (left–right, the last image axis), with every shift.
    max_shift : int
        Shifts of ``-max_shift..max_shift`` pixels along each of the last two image axes.

    Returns
    -------
    tuple of Transform
        ``(1 + mirror) · (2·max_shift + 1)²`` transforms; the identity is first, so when two
        transforms give equal r the untransformed match is reported.
    """
    if isinstance(max_shift, bool) or not isinstance(max_shift, int | np.integer) or max_shift < 0:
        raise ValueError(f"max_shift must be a whole number of pixels >= 0, got {max_shift!r}")
    shifts = [(dy, dx) for dy in range(-max_shift, max_shift + 1) for dx in range(-max_shift, max_shift + 1)]
    shifts.sort(key=lambda s: (s != (0, 0), abs(s[0]) + abs(s[1]), s))
    flips = (False, True) if mirror else (False,)
    return tuple(Transform(flip, dy, dx) for flip in flips for dy, dx in shifts)


def check_shift(max_shift: int, image_shape: tuple[int, ...]) -> None:
    """Refuse shifts that leave half an image or less to compare."""
    height, width = image_shape[-2:]
    if 2 * max_shift >= min(height, width):
        raise ValueError(
            f"max_shift={max_shift} leaves half the image or less to compare for {height}×{width} "
            f"images; use max_shift < {min(height, width) // 2}"
        )


def _window(shift: int, size: int) -> tuple[slice, slice]:
    """Rows (or columns) of the query and of the training image that overlap after a shift."""
    query = slice(max(0, shift), size + min(0, shift))
    training = slice(max(0, -shift), size - max(0, shift))
    return query, training


def apply_transform(query: np.ndarray, training: np.ndarray, transform: Transform) -> tuple:
    """Query images transformed and training images cropped so that pixel i of both correspond.

    Parameters
    ----------
    query, training : ndarray, shape (N, ..., H, W)
        Images whose last two axes are rows and columns (any leading channel or depth axes).
    transform : Transform

    Returns
    -------
    (ndarray, ndarray)
        The query images (a copy) and a view of the training images, both cropped to the overlap of
        the shift: ``(H - |dy|) × (W - |dx|)`` pixels.

    Notes
    -----
    Shifts crop both sides to their overlap rather than zero-filling the query: a shifted copy then
    correlates exactly (r = 1) with its source on the pixels they share, whatever filled the strip
    that moved in, and no artificial zero border is correlated with the training images' borders
    (zero-filling would favour images with dark backgrounds). The price is that r is computed on
    slightly fewer pixels than at zero lag.
    """
    if transform.mirror:
        query = query[..., ::-1]
    q_rows, t_rows = _window(transform.dy, query.shape[-2])
    q_cols, t_cols = _window(transform.dx, query.shape[-1])
    return np.ascontiguousarray(query[..., q_rows, q_cols]), training[..., t_rows, t_cols]
