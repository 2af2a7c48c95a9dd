"""NumPy backend: BLAS SGEMM for the scores, argpartition for the running candidates."""

from __future__ import annotations

import itertools
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from memstudy.correlate.core import (
    DEFAULT_CPU_CHUNK_MB,
    K_PIECE,
    POOL,
    U64,
    Prepared,
    exact_shift,
    float32_score_bound,
    is_exact,
    shifted_stats,
)

#: Rows centred and squared at a time while preparing a training chunk: a few rows of 256×256
#: float32 stay in the L2 cache between the passes.
_ROWS_IN_CACHE = 8
#: Pixels per float32 dot product in a row's sum of squares (see :func:`_sum_of_squares`).
_SQUARES_PIECE = 128
#: Pixels per float32 dot product in the exact Σv² of 8-bit rows: 256 · 255² < 2²⁴.
_EXACT_SQUARES_PIECE = 256
#: Up to this many pixels, constant integer images are recognised from their sum of squares.
_EXACT_CONSTANT_TEST_PIXELS = 2**20


@dataclass
class TopK:
    """Running top candidates of a block of synthetic rows (host arrays, unordered within a row)."""

    values: np.ndarray
    indices: np.ndarray


def is_wide(dtype: np.dtype) -> bool:
    """True for dtypes whose values float32 cannot hold exactly (float64, int32, ...)."""
    return dtype.itemsize > 4 or (dtype.kind in "iu" and dtype.itemsize > 2)


def _max_abs(dtype: np.dtype) -> int:
    """The largest magnitude an integer or bool ``dtype`` holds."""
    if dtype.kind == "b":
        return 1
    info = np.iinfo(dtype)
    return max(-int(info.min), int(info.max))


def _sum_of_squares(rows: np.ndarray, piece: int = _SQUARES_PIECE) -> np.ndarray:
    """Σv² per row: a float32 dot product per ``piece`` pixels, the pieces added in float64.

    Relative error ≤ γ_129 + q·2⁻⁵³ for q pieces of 128, within the γ_s that
    :func:`~memstudy.correlate.core.float32_score_bound` allows for the norms, whatever order the
    dot products sum in. One pass over the rows, where a pairwise sum needs the squares stored.
    Exact for rows of 8-bit integers with ``piece`` = ``_EXACT_SQUARES_PIECE``: every piece sum is
    an integer below 2²⁴, and their float64 sum stays below 2⁵³.
    """
    n, d = rows.shape
    whole = d - d % piece
    pieces = rows[:, :whole].reshape(n, -1, piece)
    total = np.einsum("nqp,nqp->nq", pieces, pieces).sum(axis=1, dtype=np.float64)
    if whole < d:
        total += np.einsum("nd,nd->n", rows[:, whole:], rows[:, whole:])
    return total


def _centre_block(
    raw: np.ndarray, out: np.ndarray, stats: np.ndarray, exact: np.ndarray | None, unit: bool
) -> None:
    """Centre ``raw`` rows into ``out``; write per-row statistics into ``stats``.

    ``stats`` columns: sum, centred sum of squares, constancy, and a bound on the error of the
    subtracted mean. With ``unit`` the rows are also scaled to unit norm while they are in cache
    (constant and non-finite rows become zero).

    Sums are exact for integer pixels (float32 where every partial sum stays ≤ 2²⁴, else int64) and
    accumulated in float64 otherwise, so the mean is off by its rounding to float32 only. Sums of
    squares: float32 dot products of 128 pixels added in float64 (:func:`_sum_of_squares`, relative
    error ~1e-7); one float32 dot product of a whole row would lose ~1e-4. For 8-bit rows (given
    ``exact``, shape (2, n)) Σv² is exact instead, taken before centring, and ``exact`` receives
    their exact shifted sums and spreads (:func:`~memstudy.correlate.core.shifted_stats`); the
    centred sum of squares is then spread / D. Inputs that float32 cannot hold exactly (float64,
    int32...) are centred in float64 before the cast, so a large offset does not eat the contrast.
    """
    d = raw.shape[1]
    integer = raw.dtype.kind in "biu"
    small_sums = integer and not is_wide(raw.dtype) and d * _max_abs(raw.dtype) <= 2**24
    # NumPy's error state is per thread: set it here, in the worker. Rows with NaN/Inf are flagged.
    with np.errstate(invalid="ignore"):
        for i in range(0, raw.shape[0], _ROWS_IN_CACHE):
            source = raw[i : i + _ROWS_IN_CACHE]
            rows = out[i : i + _ROWS_IN_CACHE]
            block = stats[i : i + _ROWS_IN_CACHE]
            if integer and not is_wide(source.dtype) and not small_sums:
                block[:, 0] = np.add.reduce(source, axis=1, dtype=np.int64)
            if is_wide(source.dtype):
                block[:, 0] = np.add.reduce(source, axis=1, dtype=np.float64)
                np.subtract(source, (block[:, 0] / d)[:, None], out=rows, dtype=np.float64, casting="unsafe")
                block[:, 3] = 0.0
            else:
                np.copyto(rows, source, casting="unsafe")
                if small_sums:
                    # Every partial sum is an integer of magnitude ≤ 2²⁴: exact in float32.
                    block[:, 0] = np.add.reduce(rows, axis=1)
                elif not integer:
                    block[:, 0] = np.add.reduce(rows, axis=1, dtype=np.float64)
                if exact is not None:
                    squares = _sum_of_squares(rows, _EXACT_SQUARES_PIECE)
                mean = (block[:, 0] / d).astype(np.float32)
                np.subtract(rows, mean[:, None], out=rows)
                block[:, 3] = np.abs(mean - block[:, 0] / d) * (1 + U64) + U64 * np.abs(mean)
            extremes = None
            if not integer:
                # The float64 sum itself is off by at most γ_D·Σ|x| ≤ γ_D·D·max|x|.
                extremes = source.min(axis=1), source.max(axis=1)
                absmax = np.maximum(np.abs(extremes[0]), np.abs(extremes[1]))
                block[:, 3] += d * U64 * absmax.astype(np.float64)
            if exact is not None:
                part = exact[:, i : i + _ROWS_IN_CACHE]
                part[:] = shifted_stats(block[:, 0], squares, d, exact_shift(source.dtype))
                block[:, 1] = part[1] / d
            else:
                block[:, 1] = _sum_of_squares(rows)
            if source.dtype.kind == "f" or d > _EXACT_CONSTANT_TEST_PIXELS:
                low, high = extremes if extremes is not None else (source.min(axis=1), source.max(axis=1))
                block[:, 2] = low == high
            else:
                # Integer pixels differ by at least 1, so a non-constant row has a centred sum of
                # squares >= 1 - 1/D; a constant one only rounding noise (< 0.1 up to 2^20 pixels).
                block[:, 2] = block[:, 1] < 0.5
            if unit:
                valid = (block[:, 1] > 0) & (block[:, 2] == 0) & np.isfinite(block[:, 0])
                scale = np.zeros(rows.shape[0], dtype=np.float32)
                scale[valid] = 1.0 / np.sqrt(block[valid, 1])
                rows *= scale[:, None]


def _flags(
    stats: np.ndarray, d: int, floating: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Inverse norms (0 for rows that must never match), constant rows, non-finite rows, η².

    η = (error of the subtracted mean) / (pixel standard deviation) per row; its square bounds the
    centring's effect on r (see :func:`memstudy.correlate.core.float32_score_bound`).
    """
    sums, sumsq, same, mean_error = stats.T
    nonfinite = ~np.isfinite(sums) if floating else np.zeros(sums.shape[0], dtype=bool)
    constant = (same > 0) | (~nonfinite & ~(sumsq > 0))
    valid = ~(constant | nonfinite)
    inv_norm = np.zeros(sums.shape[0], dtype=np.float32)
    inv_norm[valid] = 1.0 / np.sqrt(sumsq[valid])
    offset2 = np.zeros(sums.shape[0], dtype=np.float64)
    # σ² = Σ(x − μ)²/D from the float32 sum of squares, whose relative error is far below 1 %.
    offset2[valid] = 1.01 * mean_error[valid] ** 2 * d / sumsq[valid]
    return inv_norm, constant, nonfinite, offset2


def merge_topk(values: np.ndarray, indices: np.ndarray, scores: np.ndarray, offset: int) -> None:
    """Merge a score block into a running top-``slots`` in place (any order within a row)."""
    slots = values.shape[1]
    width = scores.shape[1]
    if width > slots:
        columns = np.argpartition(scores, width - slots, axis=1)[:, width - slots :]
        candidates = np.take_along_axis(scores, columns, axis=1)
    else:
        columns = np.broadcast_to(np.arange(width), scores.shape)
        candidates = scores
    all_values = np.concatenate([values, candidates], axis=1)
    all_indices = np.concatenate([indices, columns + offset], axis=1)
    keep = np.argpartition(all_values, all_values.shape[1] - slots, axis=1)[:, -slots:]
    values[:] = np.take_along_axis(all_values, keep, axis=1)
    indices[:] = np.take_along_axis(all_indices, keep, axis=1)


def standardize(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows (N, D) of any real dtype as centred, unit-norm float32 rows, and the constant ones.

    The standardization of the search itself (constant and non-finite rows become zero), for
    callers that want r = a @ b.T of a few images.
    """
    backend = NumpyBackend()
    try:
        prepared = backend.prepare_synthetic(np.asarray(rows).reshape(len(rows), -1))
        return prepared.data.copy(), prepared.constant | prepared.nonfinite
    finally:
        backend.close()


class NumpyBackend:
    """Search with NumPy on the CPU (OpenBLAS SGEMM).

    Standardization runs in one thread per core: NumPy's element-wise loops are single-threaded
    and release the GIL, and on 2 cores this halves the part of the search that is not GEMM.
    Products are summed over ``K_PIECE`` pixels per GEMM call, which bounds the rounding error
    whatever order the BLAS sums in (:func:`~memstudy.correlate.core.float32_score_bound`).
    """

    name = "numpy"
    prepared_itemsize = 4
    score_bytes = 20  # float32 scores and piece, argpartition columns and candidates
    exact = False

    def __init__(self) -> None:
        self._buffers = POOL.take()
        self._threads = max(
            1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        )

    def default_chunk_mb(self) -> float:
        return DEFAULT_CPU_CHUNK_MB

    def score_bound(self, d: int) -> float:
        return float32_score_bound(d)

    def close(self) -> None:
        POOL.give(self._buffers)

    def _centre(self, raw: np.ndarray, name: str, unit: bool) -> Prepared:
        n, d = raw.shape
        out = self._buffers.get(name, (n, d))
        stats = np.empty((n, 4), dtype=np.float64)
        exact = np.empty((2, n), dtype=np.int64) if is_exact(raw.dtype, d) else None
        parts = min(self._threads, -(-n // _ROWS_IN_CACHE))
        bounds = np.linspace(0, n, parts + 1).astype(int) // _ROWS_IN_CACHE * _ROWS_IN_CACHE
        bounds[-1] = n
        jobs = [
            (raw[a:b], out[a:b], stats[a:b], None if exact is None else exact[:, a:b], unit)
            for a, b in itertools.pairwise(bounds)
        ]
        if parts == 1:
            _centre_block(*jobs[0])
        else:
            with ThreadPoolExecutor(parts) as pool:
                list(pool.map(lambda job: _centre_block(*job), jobs))
        inv_norm, constant, nonfinite, offset2 = _flags(stats, d, raw.dtype.kind == "f")
        return Prepared(
            out, None if unit else inv_norm, constant, nonfinite, offset2=offset2, exact_stats=exact
        )

    def prepare_synthetic(self, raw: np.ndarray) -> Prepared:
        return self._centre(raw, "synthetic", unit=True)

    def prepare_training(self, raw: np.ndarray) -> Prepared:
        return self._centre(raw, "training", unit=False)

    def new_state(self, n_rows: int, slots: int) -> TopK:
        return TopK(
            np.full((n_rows, slots), -np.inf, dtype=np.float32), np.full((n_rows, slots), -1, dtype=np.int64)
        )

    def update(
        self,
        state: TopK,
        synthetic: Prepared,
        training: Prepared,
        offset: int,
        excluded: tuple[np.ndarray, np.ndarray] | None,
    ) -> None:
        a, b = synthetic.data, training.data
        shape = (a.shape[0], b.shape[0])
        scores = self._buffers.get("scores", shape)
        piece = self._buffers.get("piece", shape) if a.shape[1] > K_PIECE else None
        for start in range(0, a.shape[1], K_PIECE):
            stop = start + K_PIECE
            if start == 0:
                np.matmul(a[:, :stop], b[:, :stop].T, out=scores)
            else:
                scores += np.matmul(a[:, start:stop], b[:, start:stop].T, out=piece)
        scores *= training.inv_norm
        dead = training.inv_norm == 0
        if dead.any():
            scores[:, dead] = -np.inf
        if excluded is not None:
            scores[excluded] = -np.inf
        merge_topk(state.values, state.indices, scores, offset)

    def result(self, state: TopK) -> tuple[np.ndarray, np.ndarray]:
        return state.values.astype(np.float64), state.indices
