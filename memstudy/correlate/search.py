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
from memstudy.correlate.matches import Matches, sort_rows
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
            "chunk_mb=%s is too small for one %d-pixel image per block; using %.0f MiB",
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
        k,
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
    ranges = [(a, min(a + plan.training_rows, training.n)) for a in range(0, training.n, plan.training_rows)]
    cached: list[tuple[int, int, Any]] = []

    def training_chunks():
        if cached:
            yield from cached
            return
        for t0, t1, raw in iter_chunks(training, ranges):
            yield t0, t1, engine.prepare_training(raw)

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
            block = engine.prepare_synthetic(synthetic.read(s0, s1))
            if block.nonfinite.any():
                raise ValueError(f"synthetic image {s0 + _first(block.nonfinite)} contains NaN or Inf")
            constant_synthetic.append(np.flatnonzero(block.constant) + s0)
            state = engine.new_state(s1 - s0, k)
            for t0, t1, chunk in training_chunks():
                if s0 == 0:
                    if chunk.nonfinite.any():
                        index = training_offset + t0 + _first(chunk.nonfinite)
                        raise ValueError(f"training image {index} contains NaN or Inf")
                    constant_training.append(np.flatnonzero(chunk.constant) + training_offset + t0)
                    if len(ranges) == 1:
                        # One chunk holds the whole training set: standardize it once for all blocks.
                        cached.append((t0, t1, chunk))
                excluded = None
                if exclusion is not None:
                    excluded = exclusion.pairs(s0, s1, training_offset + t0, training_offset + t1)
                engine.update(state, block, chunk, training_offset + t0, excluded)
                bar.update((s1 - s0) * (t1 - t0))
            block_values, block_indices = sort_rows(*engine.result(state))
            block_values[block.constant] = np.nan
            block_indices[block.constant] = -1
            values[s0:s1] = block_values
            indices[s0:s1] = block_indices
    return Matches(values, indices, np.concatenate(constant_synthetic), np.concatenate(constant_training))


def backend_for(synthetic: Any, training: Any, backend: str = "auto", channel: Channel = None) -> str:
    """The backend a search of these inputs runs on (``auto`` resolved for their dtypes here)."""
    syn, train = open_pair(synthetic, training, channel)
    return resolve_backend(backend, (syn.dtype, train.dtype), image_size(syn))


def report_constants(matches: Matches) -> None:
    """Log a warning naming constant images, whose correlation is undefined."""
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
        for uint8/int8/bool images (exact integer products, the fastest CPU path), else ``numpy``
        (float32 BLAS). All backends give the same answer to float32 accuracy.
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
        ``values`` (float32, descending) and ``indices`` (int64 into ``training``), shape (N_syn, k),
        plus the indices of constant images. A constant image has undefined r: a constant training
        image never matches; a constant synthetic image gets a row of NaN with index -1; both are
        listed in ``Matches.constant_*`` and logged as a warning. Slots left empty because of
        ``exclude`` are NaN / -1 as well.

    Raises
    ------
    ValueError
        On NaN/Inf in an image (naming it), mismatched per-image shapes, or ``k`` out of range.

    Notes
    -----
    Pearson r of two images equals the dot product of their centred, unit-norm vectors, so the
    search is a matrix product streamed over training chunks with a running top-k. The result
    equals ``scipy.stats.pearsonr`` to about 1e-6 (float32 products of centred data; sums by
    pairwise or float64 summation). Equal values are ordered by training index.
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
    report_constants(matches)
    return matches
