"""Exact top-k Pearson search: plan blocks within a memory budget, stream training chunks, merge."""

from __future__ import annotations

import logging
from contextlib import closing
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from memstudy.correlate.backends import get_backend, resolve_backend
from memstudy.correlate.exclude import Exclude, Exclusion, resolve_exclude
from memstudy.correlate.matches import Matches
from memstudy.correlate.rescore import finalize, overflowing, slots_for
from memstudy.correlate.sources import Channel, Source, check_compatible, image_size, iter_chunks, open_pair

logger = logging.getLogger(__name__)

#: Larger training chunks do not make the products faster (1024 × 65,536 float32 rows already
#: run at the full SGEMM rate); they only cost memory and first-touch page faults.
_MAX_TRAINING_ROWS = 2048
_MAX_TRAINING_CHUNK_BYTES = 256 * 2**20
#: Rows of per-thread scratch the backends use while standardizing (cache-sized, but counted).
_SCRATCH_ROWS = 32


@dataclass(frozen=True)
class Plan:
    """Rows per synthetic block and per training chunk, and the working memory they need."""

    synthetic_rows: int
    training_rows: int
    bytes: int


def plan_blocks(
    n_synthetic: int,
    n_training: int,
    d: int,
    k: int,
    chunk_mb: float,
    *,
    synthetic_itemsize: int = 1,
    training_itemsize: int = 1,
    prepared_itemsize: int = 4,
    score_bytes: int = 12,
) -> Plan:
    """Choose block sizes so that the search's working memory stays within ``chunk_mb`` MiB.

    A training chunk (prepared rows plus two raw read buffers for read-ahead) gets at most half
    the budget and at most what the matrix product needs to run at full speed; the rest goes to a
    block of synthetic rows (raw and prepared) with its rows of the score block, as large as
    possible, since every synthetic block costs one more pass over the training set.
    ``*_itemsize`` are bytes per pixel (raw uint8: 1; prepared float32: 4, int8: 1);
    ``score_bytes`` is the backend's memory per score while a block is scored and merged.
    """
    budget = chunk_mb * 2**20
    if budget <= 0:
        raise ValueError(f"chunk_mb must be positive, got {chunk_mb}")
    scratch = _SCRATCH_ROWS * 4 * d
    training_row = (prepared_itemsize + 2 * training_itemsize) * d
    training_rows = int(
        min(
            n_training,
            _MAX_TRAINING_ROWS,
            _MAX_TRAINING_CHUNK_BYTES // (prepared_itemsize * d),
            budget / 2 // training_row,
        )
    )
    training_rows = max(1, training_rows)
    synthetic_row = (prepared_itemsize + synthetic_itemsize) * d + 24 * k + score_bytes * training_rows
    synthetic_rows = int(
        min(n_synthetic, max(1, (budget - scratch - training_rows * training_row) // synthetic_row))
    )
    synthetic_rows = _equal_parts(n_synthetic, synthetic_rows)
    training_rows = _equal_parts(n_training, training_rows)
    used = scratch + training_rows * training_row + synthetic_rows * synthetic_row
    if used > budget:
        logger.warning(
            "chunk_mb=%s is too small for one %d-pixel image per block; using %.2f MiB",
            chunk_mb,
            d,
            used / 2**20,
        )
    return Plan(synthetic_rows, training_rows, used)


def _equal_parts(n: int, at_most: int) -> int:
    """The size of the fewest equal parts of ``n`` that are at most ``at_most`` each."""
    parts = -(-n // at_most)
    return -(-n // parts)


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _rows_pairs(
    excluded: tuple[np.ndarray, np.ndarray] | None, rows: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray] | None:
    """Excluded (row, column) pairs of a block restricted to ``rows`` of it, renumbered."""
    if excluded is None or rows is None:
        return excluded
    where = np.full(max(int(rows.max()), int(excluded[0].max(initial=0))) + 1, -1)
    where[rows] = np.arange(rows.size)
    local = where[excluded[0]]
    keep = local >= 0
    return (local[keep], excluded[1][keep]) if keep.any() else None


def search(
    synthetic: Source,
    training: Source,
    k: int,
    *,
    backend: str = "auto",
    chunk_mb: float | None = None,
    exclusion: Exclusion | None = None,
    training_offset: int = 0,
    progress: bool | None = None,
    device: str | None = None,
) -> Matches:
    """Search ``synthetic`` against ``training`` (sources); indices are reported + ``training_offset``.

    ``exclusion`` works in global indices: synthetic rows from 0, training rows from
    ``training_offset``. This is the worker function of both :func:`topk_pearson` and the Dask
    search, which gives each worker a contiguous shard of the training set.

    Per block of synthetic rows the backend streams the training set and keeps the best
    :func:`~memstudy.correlate.rescore.slots_for` ``(k)`` fast scores per row; then every
    candidate within the error bound of the k-th is re-scored exactly and the rows are ordered
    (:func:`~memstudy.correlate.rescore.finalize`). A row whose candidate buffer filled up within
    the bound is searched again with four times the slots, until nothing can have been dropped.
    """
    check_compatible(synthetic, training)
    d = image_size(synthetic)
    engine = get_backend(backend, device=device, dtypes=(synthetic.dtype, training.dtype), d=d)
    if chunk_mb is None:
        chunk_mb = engine.default_chunk_mb()
    plan = plan_blocks(
        synthetic.n,
        training.n,
        d,
        slots_for(k),
        chunk_mb,
        synthetic_itemsize=np.dtype(synthetic.dtype).itemsize,
        training_itemsize=np.dtype(training.dtype).itemsize,
        prepared_itemsize=engine.prepared_itemsize,
        score_bytes=engine.score_bytes,
    )
    logger.debug(
        "search %d × %d images of %d pixels, k=%d, backend %s: %d synthetic rows × %d training rows "
        "per block, ~%.0f MiB",
        synthetic.n,
        training.n,
        d,
        k,
        engine.name,
        plan.synthetic_rows,
        plan.training_rows,
        plan.bytes / 2**20,
    )
    values = np.full((synthetic.n, k), np.nan, dtype=np.float32)
    indices = np.full((synthetic.n, k), -1, dtype=np.int64)
    constant_synthetic: list[np.ndarray] = []
    constant_training: list[np.ndarray] = []
    # The exact statistics of 8-bit training images (16 bytes each), where the backend has them.
    training_stats: list[np.ndarray | None] = []
    ranges = [(a, min(a + plan.training_rows, training.n)) for a in range(0, training.n, plan.training_rows)]
    cached: list[tuple[int, int, Any]] = []
    first_pass = [True]

    def training_chunks():
        if cached:
            yield from cached
            return
        for t0, t1, raw in iter_chunks(training, ranges):
            yield t0, t1, engine.prepare_training(raw)

    def scan(block: Any, s0: int, s1: int, rows: np.ndarray | None, slots: int, bar: Any) -> tuple:
        """Stream the training set past ``block``; candidates and the training centring term."""
        state = engine.new_state(block.constant.shape[0], slots)
        offset2 = 0.0
        for t0, t1, chunk in training_chunks():
            if first_pass[0]:
                if chunk.nonfinite.any():
                    index = training_offset + t0 + _first(chunk.nonfinite)
                    raise ValueError(f"training image {index} contains NaN or Inf")
                constant_training.append(np.flatnonzero(chunk.constant) + training_offset + t0)
                training_stats.append(chunk.exact_stats)
                if len(ranges) == 1:
                    # One chunk holds the whole training set: standardize it once for all blocks.
                    cached.append((t0, t1, chunk))
            if chunk.offset2 is not None and chunk.offset2.size:
                offset2 = max(offset2, float(chunk.offset2.max()))
            excluded = None
            if exclusion is not None:
                excluded = exclusion.pairs(s0, s1, training_offset + t0, training_offset + t1)
                excluded = _rows_pairs(excluded, rows)
            engine.update(state, block, chunk, training_offset + t0, excluded)
            if bar is not None:
                bar.update(block.constant.shape[0] * (t1 - t0))
        first_pass[0] = False
        cand_values, cand_indices = engine.result(state)
        return np.array(cand_values, dtype=np.float64), np.array(cand_indices, dtype=np.int64), offset2

    # closing(): the backend gives its work buffers back however the search ends.
    with (
        closing(engine),
        tqdm(
            total=synthetic.n * training.n,
            unit="pair",
            unit_scale=True,
            desc="correlate",
            leave=False,
            disable=None if progress is None else not progress,
        ) as bar,
    ):
        for s0 in range(0, synthetic.n, plan.synthetic_rows):
            s1 = min(s0 + plan.synthetic_rows, synthetic.n)
            raw = synthetic.read(s0, s1)  # kept for the re-score
            block = engine.prepare_synthetic(raw)
            if block.nonfinite.any():
                raise ValueError(f"synthetic image {s0 + _first(block.nonfinite)} contains NaN or Inf")
            constant_synthetic.append(np.flatnonzero(block.constant) + s0)
            synthetic_offset2 = np.zeros(s1 - s0) if block.offset2 is None else block.offset2
            slots = min(slots_for(k), training.n)
            cand_values, cand_indices, training_offset2 = scan(block, s0, s1, None, slots, bar)
            cand_values[block.constant] = -np.inf
            cand_indices[block.constant] = -1
            bounds = engine.score_bound(d) + synthetic_offset2 + training_offset2
            again = np.flatnonzero(overflowing(cand_values, cand_indices, k, bounds))
            while again.size and slots < training.n:
                slots = min(4 * slots, training.n)
                logger.debug("%d synthetic rows have more near-ties than slots; now %d", again.size, slots)
                sub = engine.prepare_synthetic(raw[again])
                more_values, more_indices, _ = scan(sub, s0, s1, again, slots, None)
                cand_values = _widen(cand_values, slots, -np.inf)
                cand_indices = _widen(cand_indices, slots, -1)
                cand_values[again], cand_indices[again] = more_values, more_indices
                again = again[overflowing(more_values, more_indices, k, bounds[again])]
            if s0 == 0:  # the first scan has seen every training chunk
                known = all(stats is not None for stats in training_stats)
                all_training_stats = np.concatenate(training_stats, axis=1) if known else None
            block_values, block_indices = finalize(
                raw,
                cand_values,
                cand_indices,
                k,
                bounds,
                training=None if engine.exact else training,
                offset=training_offset,
                batch_rows=max(plan.training_rows, 16),
                training_stats=all_training_stats,
            )
            values[s0:s1] = block_values
            indices[s0:s1] = block_indices
    return Matches(values, indices, np.concatenate(constant_synthetic), np.concatenate(constant_training))


def _widen(array: np.ndarray, width: int, fill: float) -> np.ndarray:
    """``array`` padded on the right to ``width`` columns with ``fill``."""
    if array.shape[1] >= width:
        return array
    return np.pad(array, ((0, 0), (0, width - array.shape[1])), constant_values=fill)


def backend_for(synthetic: Any, training: Any, backend: str = "auto", channel: Channel = None) -> str:
    """The backend a search of these inputs runs on (``auto`` resolved for their dtypes here)."""
    syn, train = open_pair(synthetic, training, channel)
    return resolve_backend(backend, (syn.dtype, train.dtype), image_size(syn))


def report_constants(matches: Matches, exclusion: Exclusion | None = None) -> None:
    """Log warnings naming constant images (r undefined) and rows left without k matches."""
    for side, found in (("synthetic", matches.constant_synthetic), ("training", matches.constant_training)):
        if found.size:
            shown = ", ".join(str(i) for i in found[:10]) + (", ..." if found.size > 10 else "")
            logger.warning(
                "%d constant %s image(s) (r undefined; %s): %s",
                found.size,
                side,
                "rows of NaN and index -1" if side == "synthetic" else "never matched",
                shown,
            )
    missing = (matches.indices < 0).sum(axis=1)
    missing[matches.constant_synthetic] = 0
    if missing.any():
        why = "constant training images"
        if exclusion is not None:
            why = f"{exclusion.describe()} and " + why
        empty = int(np.count_nonzero(missing == matches.k))
        logger.warning(
            "%d of %d synthetic image(s) got no eligible training image and %d fewer than k=%d "
            "(excluded: %s); their missing matches are NaN / -1",
            empty,
            len(matches),
            int(np.count_nonzero((missing > 0) & (missing < matches.k))),
            matches.k,
            why,
        )


def topk_pearson(
    synthetic: Any,
    training: Any,
    k: int = 1,
    *,
    backend: str = "auto",
    chunk_mb: float | None = None,
    exclude: Exclude | str | dict | None = None,
    channel: Channel = None,
    progress: bool | None = None,
    device: str | None = None,
) -> Matches:
    """Find, for every synthetic image, the k training images it correlates with most.

    Parameters
    ----------
    synthetic, training : ndarray, memmap, ImageSet, or path to a ``.npy`` file / saved ImageSet
        One image per entry of axis 0, any per-image shape (2D, 3D, multi-channel), flattened per
        image; uint8 or any real dtype. Per-image shapes must match (singleton axes aside). Files
        and memmaps are streamed in chunks, never loaded whole.
    k : int
        Matches kept per synthetic image (at most the number of training images).
    backend : {"auto", "numpy", "int8", "torch", "cupy"}
        ``auto``: CuPy when ``cupy.is_available()``, else torch on CUDA, else on the CPU ``int8``
        for uint8/int8/bool images where ``torch._int_mm`` is exact (the fastest CPU path), else
        ``numpy`` (float32 BLAS). Every backend gives the same indices and values: backends only
        select candidates, which are then re-scored exactly.
    chunk_mb : float or None
        Working-memory budget in MiB (standardized synthetic block, training chunk, read buffers,
        score block). Default: 1024 on the CPU; on a GPU half the free device memory, at most
        16 GiB. Peak memory does not grow with the number of training images; the inputs themselves
        (if in memory) and the ``(N_syn, k)`` result are not counted.
    exclude : None, "self", "group", dict or :class:`Exclude`
        Pairs to skip when a set is searched against itself: ``"self"`` leaves each image out of its
        own search; ``Exclude(same_group=True)`` leaves out its whole subject;
        ``Exclude(slice_distance=s)`` leaves out slices of its subject at most ``s`` apart.
        Groups come from ``ImageSet.groups`` unless given; see :class:`Exclude`.
    channel : int, str or None
        None correlates all channels together (each image flattened whole); an int picks one entry
        of axis 1 (``(N, C, ...)`` layout); a name picks a channel by ``ImageSet.channels`` (of
        either input, so a plain array in the same layout can be paired with an ImageSet). One
        channel at a time is the paper's way.
    progress : bool or None
        Show a progress bar; None shows it only on a terminal.
    device : str or None
        Torch device for ``backend="torch"`` (default: CUDA if available, else CPU).

    Returns
    -------
    Matches
        ``values`` (float32, descending: the exact r rounded to float32) and ``indices`` (int64 into
        ``training``; values equal in float32 by ascending index), shape (N_syn, k),
        plus the indices of constant images. A constant image has undefined r: a constant training
        image never matches; a constant synthetic image gets a row of NaN with index -1; both are
        listed in ``Matches.constant_*`` and logged as a warning. Slots left empty because of
        ``exclude`` are NaN / -1 as well, and a warning says how many rows have them.

    Raises
    ------
    ValueError
        On NaN/Inf in an image (naming it), mismatched per-image shapes, or ``k`` out of range.

    Notes
    -----
    Pearson r of two images equals the dot product of their centred, unit-norm vectors, so the
    search is a matrix product streamed over training chunks with a running top candidates. Every
    candidate whose fast (float32) score lies within a proven error bound of the k-th best is
    then re-scored from the raw pixels: exactly from integer sums for uint8/int8/bool images, in
    float64 otherwise. So no member of the true top k is lost to rounding, values equal
    ``scipy.stats.pearsonr`` rounded to float32, and the answer is the same on every backend,
    ``chunk_mb``, Dask split and machine.
    """
    syn, train = open_pair(synthetic, training, channel)
    if not 1 <= k <= train.n:
        raise ValueError(f"k must be between 1 and the number of training images ({train.n}), got {k}")
    exclusion = resolve_exclude(exclude, syn, train)
    matches = search(
        syn,
        train,
        k,
        backend=backend,
        chunk_mb=chunk_mb,
        exclusion=exclusion,
        progress=progress,
        device=device,
    )
    report_constants(matches, exclusion)
    return matches
