"""Pairs left out of a search: self-matches and same-subject neighbours, for train→train baselines."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from memstudy.correlate.sources import Source

#: The one rule for slice positions in image names: ``<subject>/z<number>``, as the BraTS loader
#: writes them (``BraTS20_Training_001/z078`` → 78).
SLICE_NAME = re.compile(r"/z(\d+)$")


@dataclass(frozen=True)
class Exclude:
    """Which (synthetic i, training j) pairs a search must skip.

    Meant for a set searched against itself (the train→train baseline), so that a leave-one-out
    nearest neighbour is one call: ``topk_pearson(train, train, exclude="self")``.

    Attributes
    ----------
    self_match : bool
        Skip i == j (both sets must have the same length).
    same_group : bool
        Skip every pair from the same group (subject): the nearest *other subject*.
    slice_distance : int or None
        Skip pairs of the same group whose slice positions differ by at most this much
        (``0`` skips only the same slice; ``2`` also the two neighbours on either side).
    groups : array_like, or a pair (synthetic_groups, training_groups), optional
        Group (subject id) per image. Default: ``ImageSet.groups`` of each input. A single array is
        used for both sides.
    positions : array_like, or a pair, optional
        Slice position per image. Default: from names like ``"BraTS20_Training_001/z078"`` (→ 78,
        :func:`slice_positions`) when every name has that form, else the order of the image within
        its group.
    """

    self_match: bool = True
    same_group: bool = False
    slice_distance: int | None = None
    groups: Any = None
    positions: Any = None

    @classmethod
    def parse(cls, exclude: Exclude | str | dict | None) -> Exclude | None:
        """Accept ``None``, ``"self"``, ``"group"``, a dict of fields, or an :class:`Exclude`."""
        if exclude is None or isinstance(exclude, Exclude):
            return exclude
        if isinstance(exclude, dict):
            return cls(**exclude)
        if exclude == "self":
            return cls()
        if exclude in ("group", "same_group"):
            return cls(same_group=True)
        raise ValueError(
            f"exclude={exclude!r}: expected None, 'self', 'group', a dict of Exclude fields or an Exclude"
        )


@dataclass(frozen=True)
class Exclusion:
    """An :class:`Exclude` resolved into per-image arrays; small and picklable (sent to Dask workers)."""

    self_match: bool
    same_group: bool
    slice_distance: int | None
    synthetic_groups: np.ndarray | None
    training_groups: np.ndarray | None
    synthetic_positions: np.ndarray | None
    training_positions: np.ndarray | None

    def describe(self) -> str:
        """What this exclusion leaves out, in words (for messages)."""
        parts = ["the image itself"] if self.self_match else []
        if self.same_group:
            parts.append("every image of its group")
        elif self.slice_distance is not None:
            parts.append(f"slices of its group at most {self.slice_distance} apart")
        return ", ".join(parts) or "nothing"

    def pairs(self, s0: int, s1: int, t0: int, t1: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Excluded pairs between synthetic rows ``s0:s1`` and training rows ``t0:t1``.

        Returns local (row, column) index arrays into the ``(s1 - s0, t1 - t0)`` score block, or None.
        """
        mask = None
        if self.synthetic_groups is not None:
            gs = self.synthetic_groups[s0:s1]
            gt = self.training_groups[t0:t1]
            # Slices of a subject are usually contiguous: most blocks share no group at all.
            if gs.min() <= gt.max() and gt.min() <= gs.max():
                mask = gs[:, None] == gt[None, :]
                if not self.same_group:
                    ps = self.synthetic_positions[s0:s1]
                    pt = self.training_positions[t0:t1]
                    mask &= np.abs(ps[:, None] - pt[None, :]) <= self.slice_distance
        rows = cols = np.zeros(0, dtype=np.int64)
        if mask is not None:
            rows, cols = np.nonzero(mask)
        if self.self_match and max(s0, t0) < min(s1, t1):
            diagonal = np.arange(max(s0, t0), min(s1, t1))
            rows = np.concatenate([rows, diagonal - s0])
            cols = np.concatenate([cols, diagonal - t0])
        return (rows, cols) if rows.size else None


def _per_side(value: Any, synthetic: Source, training: Source, what: str) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(value, tuple | list) and len(value) == 2 and not np.isscalar(value[0]):
        a, b = (np.asarray(v, dtype=np.int64).reshape(-1) for v in value)
    else:
        a = b = np.asarray(value, dtype=np.int64).reshape(-1)
    for side, array, source in (("synthetic", a, synthetic), ("training", b, training)):
        if array.shape[0] != source.n:
            raise ValueError(
                f"exclude: {what} for the {side} side has {array.shape[0]} entries, expected {source.n}"
            )
    return a, b


def slice_positions(names: tuple[str, ...] | list[str] | None) -> np.ndarray | None:
    """Slice position of every image from names like ``subject/z078``; None unless every name has one."""
    if names is None:
        return None
    found = [SLICE_NAME.search(name) for name in names]
    if not all(found):
        return None
    return np.array([int(m.group(1)) for m in found], dtype=np.int64)


def _order_within_group(groups: np.ndarray) -> np.ndarray:
    positions = np.empty(groups.shape[0], dtype=np.int64)
    for group in np.unique(groups):
        members = np.flatnonzero(groups == group)
        positions[members] = np.arange(members.size)
    return positions


def resolve_exclude(
    exclude: Exclude | str | dict | None, synthetic: Source, training: Source
) -> Exclusion | None:
    """Turn an ``exclude=`` argument into per-image arrays for ``synthetic`` × ``training``."""
    spec = Exclude.parse(exclude)
    if spec is None:
        return None
    if spec.self_match and synthetic.n != training.n:
        raise ValueError(
            f"exclude self_match needs a set searched against itself, but there are {synthetic.n} "
            f"synthetic and {training.n} training images"
        )
    if spec.slice_distance is not None and spec.slice_distance < 0:
        raise ValueError(f"exclude slice_distance must be >= 0, got {spec.slice_distance}")
    if not spec.same_group and spec.slice_distance is None:
        return Exclusion(spec.self_match, False, None, None, None, None, None)
    if spec.groups is not None:
        gs, gt = _per_side(spec.groups, synthetic, training, "groups")
    elif synthetic.groups is not None and training.groups is not None:
        gs, gt = synthetic.groups, training.groups
    else:
        raise ValueError("exclude by group needs groups: pass ImageSets or Exclude(groups=...)")
    ps = pt = None
    if not spec.same_group:
        if spec.positions is not None:
            ps, pt = _per_side(spec.positions, synthetic, training, "positions")
        else:
            ps, pt = (
                p if (p := slice_positions(source.names)) is not None else _order_within_group(g)
                for source, g in ((synthetic, gs), (training, gt))
            )
    return Exclusion(spec.self_match, spec.same_group, spec.slice_distance, gs, gt, ps, pt)
