"""Memorization measured against real baselines: calibrated copy calls, margins and a rank test.

The paper's number, each synthetic image's maximum Pearson r with the training set, cannot tell a
copy from a look-alike on homogeneous data. Here every synthetic number has a held-out counterpart
(real images of unseen subjects scored the same way), the call of a copy is calibrated on it, and a
copy must be close to *one* training subject rather than to everybody (averaging is not copying).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import mannwhitneyu

from memstudy.analysis.duplicates import kept_after_dedup, near_duplicate_pairs
from memstudy.analysis.transforms import Transform, apply_transform, check_shift, transform_list
from memstudy.correlate import Exclude, topk_pearson
from memstudy.correlate.exclude import slice_positions
from memstudy.data import ImageSet

logger = logging.getLogger(__name__)

FIXED_THRESHOLDS = (0.90, 0.95, 0.99)

#: The run fields of ``comparison.csv`` that the images alone cannot tell.
RUN_FIELDS = ("dataset", "model", "seed", "step", "sampler")


@dataclass(frozen=True)
class SetMatches:
    """The matches of one query set (synthetic or held-out) against the training set.

    Attributes
    ----------
    values, indices : ndarray, shape (N, k)
        Top-k r (float32, descending) and training indices of the best transform (-1 / NaN: none).
    max_r : ndarray of float64, shape (N,)
        Best r over all transforms (NaN for a constant image).
    other_subject_r : ndarray of float64, shape (N,)
        Best r with any image of a subject other than that of the best match, over all transforms.
    margin : ndarray of float64, shape (N,)
        ``max_r - other_subject_r``.
    transform : ndarray of str, shape (N,)
        Name of the transform that gave ``max_r`` (``identity`` without transforms).
    """

    values: np.ndarray
    indices: np.ndarray
    max_r: np.ndarray
    other_subject_r: np.ndarray
    margin: np.ndarray
    transform: np.ndarray


@dataclass(frozen=True)
class MemorizationReport:
    """Everything :func:`memorization_report` measured; ``summary()`` gives the comparison row.

    Per synthetic image (arrays of length N_syn): ``max_r``, ``margin``, ``other_subject_r``,
    ``transform`` and the top-k ``match_values`` / ``match_indices`` (into the training set as
    passed, even after dedup) with provenance ``match_names``, ``match_subjects`` (groups) and
    ``match_slices`` (-1 where names carry no slice). Held-out counterparts: ``holdout_values`` /
    ``holdout_indices`` (top-k), ``holdout_max_r``, ``holdout_margin``, ``holdout_transform``.
    Baseline: ``train_values`` / ``train_indices`` (each kept training image's top-k among other
    subjects' images, zero lag; NaN / -1 with one subject) and ``train_max_r`` (their first
    column). Calls: ``threshold`` and ``margin_threshold`` (the ``quantile`` of held-out ``max_r``
    and ``margin``), ``likely_copies`` (indices), ``fixed_thresholds``.
    Test: ``mann_whitney_u``, ``mann_whitney_p``. Recurrence: ``best_match_counts`` (per training
    image, how many synthetic images have it as best match). Bookkeeping: ``channel``,
    ``transforms``, ``searches`` (engine calls) and ``pairs`` (image pairs they scored),
    ``removed_duplicates`` (training indices dropped by dedup), ``n_train_images``,
    ``n_train_subjects``, ``notes`` and ``metadata`` (run fields passed in).
    """

    max_r: np.ndarray
    margin: np.ndarray
    other_subject_r: np.ndarray
    transform: np.ndarray
    match_values: np.ndarray
    match_indices: np.ndarray
    match_names: np.ndarray
    match_subjects: np.ndarray
    match_slices: np.ndarray
    holdout_values: np.ndarray
    holdout_indices: np.ndarray
    holdout_max_r: np.ndarray
    holdout_margin: np.ndarray
    holdout_transform: np.ndarray
    train_values: np.ndarray
    train_indices: np.ndarray
    train_max_r: np.ndarray
    quantile: float
    threshold: float
    margin_threshold: float
    fixed_thresholds: tuple[float, ...]
    likely_copies: np.ndarray
    mann_whitney_u: float
    mann_whitney_p: float
    best_match_counts: np.ndarray
    best_match_subjects: np.ndarray
    channel: str
    transforms: tuple[str, ...]
    searches: int
    pairs: int
    removed_duplicates: np.ndarray
    n_train_images: int
    n_train_subjects: int
    notes: tuple[str, ...]
    metadata: dict[str, Any] = field(default_factory=dict)

    def summary(self, **metadata: Any) -> dict[str, Any]:
        """The ``comparison.csv`` fields this report knows, plus ``metadata`` (run fields).

        Parameters
        ----------
        **metadata
            Run fields (``dataset``, ``model``, ``seed``, ``step``, ``sampler``, or any other column
            such as ``model_size``); they override those given to :func:`memorization_report`.

        Returns
        -------
        dict
            The contract's fields (``n_samples``, ``median_max_r``, ``p95_max_r``,
            ``frac_above_0.95``, ``holdout_p99``, ``frac_above_holdout_p99``, ``frac_likely_copies``,
            ``train_train_median_max_r``, the training-set sizes and the run fields given), then the
            calibrated call, the test and the recurrence counts. Medians and percentiles leave out
            constant images (NaN r); fractions are of all samples.
        """
        row: dict[str, Any] = {**self.metadata, **metadata}
        for name in ("n_train_images", "n_train_subjects"):
            given = row.get(name)
            if given is not None and int(given) != getattr(self, name):
                raise ValueError(
                    f"summary: {name}={given} was given, but the training set has {getattr(self, name)}"
                )
        n, n_holdout = self.max_r.size, self.holdout_max_r.size
        finite = self.max_r[np.isfinite(self.max_r)]
        holdout_p99 = _quantile(self.holdout_max_r, 0.99)
        copies = self.likely_copies
        row.update(
            {
                "n_train_images": self.n_train_images,
                "n_train_subjects": self.n_train_subjects,
                "n_samples": n,
                "median_max_r": float(np.median(finite)) if finite.size else np.nan,
                "p95_max_r": float(np.quantile(finite, 0.95)) if finite.size else np.nan,
                **{f"frac_above_{t:.2f}": _fraction(_above(self.max_r, t), n) for t in self.fixed_thresholds},
                "holdout_p99": holdout_p99,
                "frac_above_holdout_p99": _fraction(_above(self.max_r, holdout_p99), n),
                "frac_likely_copies": _fraction(copies.size, n),
                "train_train_median_max_r": _median(self.train_max_r),
                "channel": self.channel,
                "quantile": self.quantile,
                "threshold": self.threshold,
                "margin_threshold": self.margin_threshold,
                "n_likely_copies": int(copies.size),
                "median_margin": _median(self.margin),
                "holdout_median_max_r": _median(self.holdout_max_r),
                "n_holdout": n_holdout,
                **{
                    f"holdout_frac_above_{t:.2f}": _fraction(
                        _above(self.holdout_max_r, t), self.holdout_max_r.size
                    )
                    for t in self.fixed_thresholds
                },
                "mann_whitney_u": self.mann_whitney_u,
                "mann_whitney_p": self.mann_whitney_p,
                "distinct_training_images": int(np.count_nonzero(self.best_match_counts)),
                "distinct_subjects": int(np.unique(self.best_match_subjects).size),
                "max_recurrence": int(self.best_match_counts.max(initial=0)),
                "frac_recurring": _fraction(int(self.best_match_counts[self.best_match_counts > 1].sum()), n),
                "copies_distinct_training_images": int(np.unique(self.match_indices[copies, 0]).size),
                "transforms": len(self.transforms),
                "searches": self.searches,
                "removed_duplicates": int(self.removed_duplicates.size),
                "notes": " ".join(self.notes),
            }
        )
        return row

    def top_matches(self) -> pd.DataFrame:
        """The top-k matches of every synthetic image as a tidy table, one row per (image, rank).

        Columns ``synthetic``, ``rank`` (0 = best), ``r``, ``training`` (index), ``name``,
        ``subject``, ``slice``, ``transform``, ``margin`` (of the image) and ``likely_copy``.
        """
        n, k = self.match_values.shape
        copy = np.zeros(n, dtype=bool)
        copy[self.likely_copies] = True
        return pd.DataFrame(
            {
                "synthetic": np.repeat(np.arange(n), k),
                "rank": np.tile(np.arange(k), n),
                "r": self.match_values.ravel(),
                "training": self.match_indices.ravel(),
                "name": self.match_names.ravel(),
                "subject": self.match_subjects.ravel(),
                "slice": self.match_slices.ravel(),
                "transform": np.repeat(self.transform, k),
                "margin": np.repeat(self.margin, k),
                "likely_copy": np.repeat(copy, k),
            }
        )


def _fraction(count: int, n: int) -> float:
    return count / n if n else np.nan


def _above(values: np.ndarray, threshold: float) -> int:
    return int(np.count_nonzero(values > threshold))


def _median(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(np.median(finite)) if finite.size else np.nan


def _quantile(values: np.ndarray, q: float) -> float:
    finite = values[np.isfinite(values)]
    return float(np.quantile(finite, q)) if finite.size else np.nan


class SearchCost:
    """Counts engine calls and the image pairs they score (the price of transforms, stated)."""

    def __init__(self) -> None:
        self.searches = 0
        self.pairs = 0

    def topk(self, query: np.ndarray, training: np.ndarray, k: int, **options: Any) -> Any:
        self.searches += 1
        self.pairs += len(query) * len(training)
        return topk_pearson(query, training, k, progress=False, **options)


def match_set(
    query: np.ndarray,
    training: np.ndarray,
    training_groups: np.ndarray,
    k: int,
    transforms: tuple[Transform, ...],
    cost: SearchCost,
) -> SetMatches:
    """Top-k matches, best r over transforms and the margin to the best other-subject match.

    The other-subject r of an image is taken from its top-k where one of them belongs to another
    subject than the best match (they are exact and sorted, so the first such is the best); only
    the rows whose top-k all belong to the best match's subject are searched again, leaving that
    subject out. Every r comes from :func:`memstudy.correlate.topk_pearson`.
    """
    n = len(query)
    found = []
    for transform in transforms:
        q, t = apply_transform(query, training, transform)
        found.append((q, t, cost.topk(q, t, k)))
    values = np.stack([m.values for _, _, m in found])  # (T, N, k)
    indices = np.stack([m.indices for _, _, m in found])
    best = np.where(np.isnan(values[:, :, 0]), -np.inf, values[:, :, 0]).argmax(axis=0)
    rows = np.arange(n)
    top_values, top_indices = values[best, rows], indices[best, rows]
    max_r = top_values[:, 0].astype(np.float64)
    # A group no training image has, for images without a match (constant ones).
    nowhere = training_groups.min() - 1
    best_group = np.where(top_indices[:, 0] >= 0, training_groups[top_indices[:, 0]], nowhere)
    other = np.full((len(transforms), n), np.nan)
    if np.unique(training_groups).size < 2:  # no other subject: the margin is undefined (NaN)
        found = []
    for t, (q, cropped, matches) in enumerate(found):
        groups = np.where(matches.indices >= 0, training_groups[matches.indices], nowhere)
        elsewhere = (matches.indices >= 0) & (groups != best_group[:, None])
        has = elsewhere.any(axis=1)
        first = elsewhere.argmax(axis=1)
        other[t, has] = matches.values[has, first[has]]
        again = np.flatnonzero(~has & (best_group != nowhere))
        if again.size:
            exclude = Exclude(self_match=False, same_group=True, groups=(best_group[again], training_groups))
            other[t, again] = cost.topk(q[again], cropped, 1, exclude=exclude).values[:, 0]
    other_r = np.fmax.reduce(other, axis=0)
    names = np.array([tr.name for tr in transforms])
    return SetMatches(top_values, top_indices, max_r, other_r, max_r - other_r, names[best])


def _as_images(images: Any, role: str) -> tuple[np.ndarray, ImageSet | None]:
    if isinstance(images, ImageSet):
        return images.images, images
    if isinstance(images, np.ndarray) and images.ndim in (4, 5):
        return images, None
    raise TypeError(
        f"{role} must be an ImageSet or an array of shape (N, C, H, W) or (N, C, D, H, W), "
        f"got {type(images).__name__}"
    )


def _channel_index(channel: int | str | None, training: ImageSet) -> int | None:
    if channel is None:
        return None
    if isinstance(channel, str):
        if channel not in training.channels:
            raise ValueError(f"channel={channel!r}: the training set has channels {training.channels}")
        return training.channels.index(channel)
    if not 0 <= channel < len(training.channels):
        raise ValueError(f"channel={channel}: the training set has {len(training.channels)} channels")
    return int(channel)


def _check_inputs(
    synthetic: np.ndarray, syn_set: ImageSet | None, training: ImageSet, holdout: ImageSet
) -> None:
    for role, shape in (("synthetic", synthetic.shape[1:]), ("holdout", holdout.image_shape)):
        if tuple(shape) != training.image_shape:
            raise ValueError(
                f"{role} images have shape {tuple(shape)} but training images {training.image_shape}; "
                "every set must have the same image shape and channels"
            )
    for role, imageset in (("synthetic", syn_set), ("holdout", holdout)):
        if imageset is not None and imageset.channels != training.channels:
            raise ValueError(
                f"{role} channels {imageset.channels} differ from training's {training.channels}"
            )
    shared = np.intersect1d(training.groups, holdout.groups)
    if shared.size:
        raise ValueError(
            f"holdout shares {shared.size} subject(s) with training (groups {shared[:5].tolist()}); "
            "held-out images must come from unseen subjects"
        )
    if len(synthetic) == 0 or len(holdout) == 0:
        raise ValueError(f"need synthetic and holdout images, got {len(synthetic)} and {len(holdout)}")


def memorization_report(
    synthetic: ImageSet | np.ndarray,
    training: ImageSet,
    holdout: ImageSet,
    *,
    channel: int | str | None = None,
    k: int = 5,
    quantile: float = 0.99,
    fixed_thresholds: tuple[float, ...] = FIXED_THRESHOLDS,
    mirror: bool = False,
    max_shift: int = 0,
    dedup_threshold: float | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> MemorizationReport:
    """Measure how close synthetic images are to training images, against held-out real images.

    Parameters
    ----------
    synthetic : ImageSet or ndarray of shape (N, C, H, W) / (N, C, D, H, W)
        The model's samples.
    training : ImageSet
        The model's training images; ``groups`` tell subjects apart.
    holdout : ImageSet
        Real images of subjects not in ``training`` (same kind, same shape and channels): the
        baseline every synthetic number is calibrated against.
    channel : int, str or None
        Correlate one channel (the paper's way) or all channels together (None). See
        :func:`memorization_reports` for one report per channel.
    k : int
        Matches kept per synthetic image (with provenance).
    quantile : float
        Quantile of the held-out values that calibrates the copy call (0.99: about 1 % of real
        unseen images would be called copies by ``max_r`` alone).
    fixed_thresholds : tuple of float
        The fixed r thresholds reported beside the calibrated one.
    mirror, max_shift : bool, int
        Also score each image mirrored and shifted by up to ``max_shift`` pixels (see
        :mod:`memstudy.analysis.transforms`); synthetic *and* held-out images are scored with the
        same transforms, so the calibration holds. Costs ``(1 + mirror)(2·max_shift + 1)²`` searches
        per set instead of one (``searches`` and ``pairs`` in the report).
    dedup_threshold : float or None
        Remove training near-duplicates above this r first (:func:`~memstudy.analysis.deduplicate`);
        ``removed_duplicates`` lists them.
    metadata : mapping, optional
        Run fields for :meth:`MemorizationReport.summary` (``dataset``, ``model``, ``seed``,
        ``step``, ``sampler``...).

    Returns
    -------
    MemorizationReport

    Raises
    ------
    ValueError
        Different image shapes or channels, held-out subjects that are also training subjects,
        ``k`` larger than the training set, or a bad option.

    Notes
    -----
    **The call.** Image i is a likely copy when ``max_r[i] > threshold`` *and*
    ``margin[i] > margin_threshold``, both the ``quantile`` of the held-out values. ``margin`` is
    the best r minus the best r with any image of *another* subject than the best match's (slices
    next to a copied one do not shrink it). A copy is close to one training image and clearly less
    close to other people's; an average image (a blurred image, the mean training image, a smooth
    sample) is close to many subjects at once, so its margin stays at the held-out level however
    high its r. Each condition alone passes a fraction of about ``1 - quantile`` of real unseen
    images, so the joint call passes at most that. The margin is in r on purpose: near r = 1 a
    difference of r shrinks (r = 1 - d²/2 for the distance d of standardized images), which keeps
    smoothed images, whose r crowd towards 1, from passing; scale-free alternatives (differences of
    distance, Lowe's distance ratio) called many more blurred unseen images copies. The price: an
    exact copy of a training image with a near-identical image in another subject (r above
    ``1 - margin_threshold``) is not called, though its ``max_r`` still shows it. A training set of
    one subject has no other subject: margins are NaN, the call is ``max_r > threshold`` alone and
    ``notes`` says so.

    **The test.** One-sided Mann–Whitney U (``scipy.stats.mannwhitneyu``, ``alternative="greater"``)
    of synthetic against held-out ``max_r`` (Meehan et al. 2020's data-copying test): a small
    p-value means samples sit closer to the training set than unseen real images do. Constant
    images (r undefined) are left out. The test takes images as independent; slices of one held-out
    subject are not, so with few held-out subjects its p-value is too small.
    """
    syn_images, syn_set = _as_images(synthetic, "synthetic")
    if not isinstance(training, ImageSet) or not isinstance(holdout, ImageSet):
        raise TypeError("training and holdout must be ImageSets (their groups tell subjects apart)")
    _check_inputs(syn_images, syn_set, training, holdout)
    if not 0 < quantile < 1:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    check_shift(max_shift, training.image_shape)
    transforms = transform_list(mirror=mirror, max_shift=max_shift)
    c = _channel_index(channel, training)

    def pick(images: np.ndarray) -> np.ndarray:
        return images if c is None else images[:, c]

    cost = SearchCost()
    kept = np.arange(len(training))
    if dedup_threshold is not None:
        first, second, _ = near_duplicate_pairs(pick(training.images), threshold=dedup_threshold)
        kept = kept_after_dedup(len(training), first, second)
    removed = np.setdiff1d(np.arange(len(training)), kept)
    train_images = pick(training.images)[kept] if removed.size else pick(training.images)
    groups = training.groups[kept]
    if not 1 <= k <= len(kept):
        raise ValueError(f"k={k} must be between 1 and the number of training images ({len(kept)})")

    syn = match_set(pick(syn_images), train_images, groups, k, transforms, cost)
    held = match_set(pick(holdout.images), train_images, groups, k, transforms, cost)
    one_subject = np.unique(groups).size < 2
    if one_subject:  # no image of another subject to match
        train_values, train_indices = np.full((len(kept), k), np.nan, np.float32), np.full((len(kept), k), -1)
    else:
        train = cost.topk(train_images, train_images, k, exclude=Exclude(same_group=True, groups=groups))
        train_values, train_indices = train.values, train.indices
    train_max_r = train_values[:, 0].astype(np.float64)

    threshold = _quantile(held.max_r, quantile)
    margin_threshold = _quantile(held.margin, quantile)
    # With one training subject there is no other subject to be less close to: max r alone decides.
    distinct = True if one_subject else syn.margin > margin_threshold
    likely = np.flatnonzero((syn.max_r > threshold) & distinct)
    syn_finite, held_finite = syn.max_r[np.isfinite(syn.max_r)], held.max_r[np.isfinite(held.max_r)]
    u, p = np.nan, np.nan
    if syn_finite.size and held_finite.size:
        test = mannwhitneyu(syn_finite, held_finite, alternative="greater")
        u, p = float(test.statistic), float(test.pvalue)

    def original(indices: np.ndarray) -> np.ndarray:  # indices into the training set as passed
        return np.where(indices >= 0, kept[np.maximum(indices, 0)], -1)

    match_indices = original(syn.indices)
    valid = match_indices >= 0
    names = np.array(training.names, dtype=object)
    positions = slice_positions(training.names)
    best = match_indices[:, 0][valid[:, 0]]
    notes = _notes(_quantile(held.max_r, 0.99), held_finite.size, quantile, fixed_thresholds, one_subject)
    for note in notes:
        logger.warning("%s", note)
    return MemorizationReport(
        max_r=syn.max_r,
        margin=syn.margin,
        other_subject_r=syn.other_subject_r,
        transform=syn.transform,
        match_values=syn.values,
        match_indices=match_indices,
        match_names=np.where(valid, names[np.maximum(match_indices, 0)], None),
        match_subjects=np.where(valid, training.groups[np.maximum(match_indices, 0)], -1),
        match_slices=(
            np.where(valid, positions[np.maximum(match_indices, 0)], -1)
            if positions is not None
            else np.full(match_indices.shape, -1)
        ),
        holdout_values=held.values,
        holdout_indices=original(held.indices),
        holdout_max_r=held.max_r,
        holdout_margin=held.margin,
        holdout_transform=held.transform,
        train_values=train_values,
        train_indices=original(train_indices),
        train_max_r=train_max_r,
        quantile=float(quantile),
        threshold=threshold,
        margin_threshold=margin_threshold,
        fixed_thresholds=tuple(float(t) for t in fixed_thresholds),
        likely_copies=likely,
        mann_whitney_u=u,
        mann_whitney_p=p,
        best_match_counts=np.bincount(best, minlength=len(training)),
        best_match_subjects=training.groups[best],
        channel="all" if c is None else training.channels[c],
        transforms=tuple(t.name for t in transforms),
        searches=cost.searches,
        pairs=cost.pairs,
        removed_duplicates=removed,
        n_train_images=len(training),
        n_train_subjects=int(np.unique(training.groups).size),
        notes=notes,
        metadata=dict(metadata or {}),
    )


def _notes(
    holdout_p99: float, n_holdout: int, quantile: float, fixed: tuple[float, ...], one_subject: bool
) -> tuple[str, ...]:
    """Warnings a reader of the numbers needs: fixed thresholds below real images, thin calibration,
    a training set of one subject."""
    notes = []
    if one_subject:
        notes.append(
            "The training set has one subject: there is no other subject to measure a margin against, "
            "so the call uses max r alone, and the train → train baseline is undefined. An average of "
            "the subject's slices can pass such a call; read the top pairs."
        )
    below = [t for t in fixed if holdout_p99 > t]
    if below:
        shown = ", ".join(f"{t:.2f}" for t in below)
        notes.append(
            f"Held-out p99 of max r is {holdout_p99:.3f}, above the fixed threshold(s) "
            f"{shown}: the data are so homogeneous that a fixed threshold flags real unseen images; "
            "use the calibrated call."
        )
    if n_holdout * (1 - quantile) < 1:
        notes.append(
            f"Only {n_holdout} held-out images with an r, fewer than 1 / (1 - quantile): their "
            f"p{100 * quantile:g} rests on their largest two values, so the calibrated call is coarse; "
            "use more held-out images or a lower quantile."
        )
    return tuple(notes)


def memorization_reports(
    synthetic: ImageSet | np.ndarray,
    training: ImageSet,
    holdout: ImageSet,
    **options: Any,
) -> dict[str, MemorizationReport]:
    """One :func:`memorization_report` per channel, and one of all channels together.

    Returns
    -------
    dict
        ``{channel name: report}`` in the training set's channel order, then ``"all"`` (omitted for
        single-channel images, where it would repeat the channel's report).
    """
    if "channel" in options:
        raise TypeError("memorization_reports makes one report per channel; do not pass channel=")
    reports = {
        name: memorization_report(synthetic, training, holdout, channel=i, **options)
        for i, name in enumerate(training.channels)
    }
    if len(training.channels) > 1:
        reports["all"] = memorization_report(synthetic, training, holdout, channel=None, **options)
    return reports
