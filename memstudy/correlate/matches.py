"""The result of a top-k search: values, indices and the images whose correlation is undefined."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from memstudy.atomic import atomic_path

_EMPTY = np.zeros(0, dtype=np.int64)


@dataclass(frozen=True)
class Matches:
    """The k training images most correlated with each synthetic image.

    Attributes
    ----------
    values : ndarray of float32, shape (N_syn, k)
        Pearson r, exact to float32 rounding, descending along each row; values equal in float32
        are ordered by training index. NaN where there is no match: for a constant
        synthetic image (r undefined) and where fewer than k training images were eligible
        (constant training images, excluded pairs).
    indices : ndarray of int64, shape (N_syn, k)
        Index into the training set of each match; -1 wherever ``values`` is NaN.
    constant_synthetic, constant_training : ndarray of int64
        Indices of constant images (every pixel equal), for which r is undefined. A constant
        training image never appears in ``indices``; a constant synthetic image has a row of NaN
        and -1.
    """

    values: np.ndarray
    indices: np.ndarray
    constant_synthetic: np.ndarray = field(default_factory=lambda: _EMPTY.copy())
    constant_training: np.ndarray = field(default_factory=lambda: _EMPTY.copy())

    def __post_init__(self) -> None:
        object.__setattr__(self, "values", np.asarray(self.values, dtype=np.float32))
        object.__setattr__(self, "indices", np.asarray(self.indices, dtype=np.int64))
        for name in ("constant_synthetic", "constant_training"):
            object.__setattr__(self, name, np.asarray(getattr(self, name), dtype=np.int64).reshape(-1))
        if self.values.ndim != 2 or self.values.shape != self.indices.shape:
            raise ValueError(
                f"Matches.values {self.values.shape} and indices {self.indices.shape} must be equal (N, k)"
            )

    def __len__(self) -> int:
        return self.values.shape[0]

    @property
    def k(self) -> int:
        """Number of matches kept per synthetic image."""
        return self.values.shape[1]

    def save(self, path: str | os.PathLike) -> None:
        """Write the matches as a ``.npz`` file (atomically)."""
        with atomic_path(path) as tmp:
            np.savez(
                tmp,
                values=self.values,
                indices=self.indices,
                constant_synthetic=self.constant_synthetic,
                constant_training=self.constant_training,
            )

    @classmethod
    def load(cls, path: str | os.PathLike) -> Matches:
        """Read matches written by :meth:`save`."""
        with np.load(path) as data:
            return cls(data["values"], data["indices"], data["constant_synthetic"], data["constant_training"])


def sort_rows(values: np.ndarray, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Round values to float32, order each row by value descending, ties by index ascending.

    This is the one final ordering of every search and merge: values equal after rounding to
    float32 are ties. Slots with -inf, NaN or index -1 (no candidate) go last as NaN / -1.
    """
    values = np.asarray(values).astype(np.float32)
    empty = ~np.isfinite(values) | (indices < 0)
    key = np.where(empty, np.inf, -values.astype(np.float64))
    order = np.lexsort((np.where(empty, np.iinfo(np.int64).max, indices), key), axis=1)
    values = np.take_along_axis(values, order, axis=1)
    indices = np.take_along_axis(indices, order, axis=1).astype(np.int64)
    empty = np.take_along_axis(empty, order, axis=1)
    values[empty] = np.nan
    indices[empty] = -1
    return values, indices


def merge_matches(parts: Iterable[Matches]) -> Matches:
    """Merge top-k results computed over disjoint parts of the training set.

    Every part must cover the same synthetic images with the same k and report global training
    indices. Values are exact (re-scored) in every part, so the top k of the union ordered by
    :func:`sort_rows` is what one search over the whole training set gives, ties included.
    """
    parts = list(parts)
    if not parts:
        raise ValueError("merge_matches needs at least one Matches")
    k = parts[0].k
    if any(p.values.shape != parts[0].values.shape for p in parts):
        raise ValueError(f"cannot merge Matches of shapes {[p.values.shape for p in parts]}")
    values = np.concatenate([np.nan_to_num(p.values, nan=-np.inf) for p in parts], axis=1)
    indices = np.concatenate([p.indices for p in parts], axis=1)
    values, indices = sort_rows(values, indices)
    constant_synthetic = np.unique(np.concatenate([p.constant_synthetic for p in parts]))
    constant_training = np.unique(np.concatenate([p.constant_training for p in parts]))
    # A constant synthetic image is constant in every part: its row stays NaN / -1.
    return Matches(values[:, :k], indices[:, :k], constant_synthetic, constant_training)
