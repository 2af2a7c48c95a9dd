"""NumPy backend: BLAS SGEMM for the scores, argpartition for the running top-k."""

from __future__ import annotations

import itertools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from memstudy.correlate.backends import DEFAULT_CPU_CHUNK_MB, Prepared

#: Rows centred and squared at a time while preparing a training chunk: a few rows of 256×256
#: float32 stay in the L2 cache between the passes.
_ROWS_IN_CACHE = 8
#: Up to this many pixels, constant integer images are recognised from their sum of squares.
_EXACT_CONSTANT_TEST_PIXELS = 2**20


@dataclass
class TopK:
    """Running top-k of a block of synthetic rows (host arrays, unordered within a row)."""

    values: np.ndarray
    indices: np.ndarray


class _Buffers:
    """Named flat work buffers, grown as needed and reused chunk after chunk."""

    def __init__(self) -> None:
        self._arrays: dict[str, np.ndarray] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: type = np.float32) -> np.ndarray:
        size = int(np.prod(shape))
        array = self._arrays.get(name)
        if array is None or array.size < size or array.dtype != dtype:
            array = self._arrays[name] = np.empty(size, dtype=dtype)
        return array[:size].reshape(shape)


class _BufferPool:
    """Work buffers kept from one search to the next in this process.

    Touching fresh memory costs page faults (~1 ms per MB on a VM): for a search's several hundred
    MB of buffers that was more than all of its standardization. A search takes a set of buffers
    and gives it back when done; concurrent searches (threads) never share one.
    """

    def __init__(self, keep: int = 2) -> None:
        self._free: list[_Buffers] = []
        self._keep = keep
        self._lock = threading.Lock()

    def take(self) -> _Buffers:
        with self._lock:
            return self._free.pop() if self._free else _Buffers()

    def give(self, buffers: _Buffers) -> None:
        with self._lock:
            if len(self._free) < self._keep:
                self._free.append(buffers)

    def clear(self) -> None:
        with self._lock:
            self._free.clear()


POOL = _BufferPool()


def release_buffers() -> None:
    """Free the work buffers the CPU backends keep for the next search (at most ~2 × ``chunk_mb``)."""
    POOL.clear()


def is_wide(dtype: np.dtype) -> bool:
    """True for dtypes whose values float32 cannot hold exactly (float64, int32, ...)."""
    return dtype.itemsize > 4 or (dtype.kind in "iu" and dtype.itemsize > 2)


def _centre_block(
    raw: np.ndarray, out: np.ndarray, scratch: np.ndarray, stats: np.ndarray, unit: bool
) -> None:
    """Centre ``raw`` rows into ``out``; write per-row sum, sum of squares and constancy into ``stats``.

    With ``unit`` the rows are also scaled to unit norm while they are in cache (constant and
    non-finite rows become zero).

    Sums are NumPy pairwise reductions (relative error ~1e-7 at 65,536 pixels, as good as float64
    accumulation here); a plain float32 dot product (``einsum``) loses ~1e-4 and is not accurate
    enough for the norms. Inputs that float32 cannot hold exactly (float64, int32...) are centred
    in float64 before the cast, so a large offset does not eat the contrast.
    """
    d = raw.shape[1]
    # NumPy's error state is per thread: set it here, in the worker. Rows with NaN/Inf are flagged.
    with np.errstate(invalid="ignore"):
        for i in range(0, raw.shape[0], _ROWS_IN_CACHE):
            source = raw[i : i + _ROWS_IN_CACHE]
            rows = out[i : i + _ROWS_IN_CACHE]
            block = stats[i : i + _ROWS_IN_CACHE]
            if is_wide(source.dtype):
                block[:, 0] = np.add.reduce(source, axis=1, dtype=np.float64)
                np.subtract(source, (block[:, 0] / d)[:, None], out=rows, dtype=np.float64, casting="unsafe")
            else:
                np.copyto(rows, source, casting="unsafe")
                block[:, 0] = np.add.reduce(rows, axis=1)
                np.subtract(rows, (block[:, 0] / d).astype(np.float32)[:, None], out=rows)
            squares = scratch[: rows.shape[0]]
            np.multiply(rows, rows, out=squares)
            block[:, 1] = np.add.reduce(squares, axis=1)
            if source.dtype.kind == "f" or d > _EXACT_CONSTANT_TEST_PIXELS:
                block[:, 2] = source.min(axis=1) == source.max(axis=1)
            else:
                # Integer pixels differ by at least 1, so a non-constant row has a centred sum of
                # squares >= 1 - 1/D; a constant one only rounding noise (< 0.1 up to 2^20 pixels).
                block[:, 2] = block[:, 1] < 0.5
            if unit:
                valid = (block[:, 1] > 0) & (block[:, 2] == 0) & np.isfinite(block[:, 0])
                scale = np.zeros(rows.shape[0], dtype=np.float32)
                scale[valid] = 1.0 / np.sqrt(block[valid, 1])
                rows *= scale[:, None]


def _flags(stats: np.ndarray, floating: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse norms (0 for rows that must never match), constant rows and non-finite rows."""
    sums, sumsq, same = stats.T
    nonfinite = ~np.isfinite(sums) if floating else np.zeros(sums.shape[0], dtype=bool)
    constant = (same > 0) | (~nonfinite & ~(sumsq > 0))
    valid = ~(constant | nonfinite)
    inv_norm = np.zeros(sums.shape[0], dtype=np.float32)
    inv_norm[valid] = 1.0 / np.sqrt(sumsq[valid])
    return inv_norm, constant, nonfinite


def merge_topk(values: np.ndarray, indices: np.ndarray, scores: np.ndarray, offset: int) -> None:
    """Merge a score block into a running top-k in place (for k = 1, a tie keeps the earlier index)."""
    n, k = values.shape
    width = scores.shape[1]
    if k == 1:
        best = scores.argmax(axis=1)
        top = scores[np.arange(n), best]
        better = top > values[:, 0]
        values[better, 0] = top[better]
        indices[better, 0] = best[better] + offset
        return
    if width > k:
        columns = np.argpartition(scores, width - k, axis=1)[:, width - k :]
        candidates = np.take_along_axis(scores, columns, axis=1)
    else:
        columns = np.broadcast_to(np.arange(width), scores.shape)
        candidates = scores
    all_values = np.concatenate([values, candidates], axis=1)
    all_indices = np.concatenate([indices, columns + offset], axis=1)
    keep = np.argpartition(all_values, all_values.shape[1] - k, axis=1)[:, -k:]
    values[:] = np.take_along_axis(all_values, keep, axis=1)
    indices[:] = np.take_along_axis(all_indices, keep, axis=1)


class NumpyBackend:
    """Search with NumPy on the CPU (OpenBLAS SGEMM).

    Standardization runs in one thread per core: NumPy's element-wise loops are single-threaded
    and release the GIL, and on 2 cores this halves the part of the search that is not GEMM.
    """

    name = "numpy"
    prepared_itemsize = 4
    score_bytes = 12

    def __init__(self) -> None:
        self._buffers = POOL.take()
        self._threads = max(
            1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        )

    def default_chunk_mb(self) -> float:
        return DEFAULT_CPU_CHUNK_MB

    def close(self) -> None:
        POOL.give(self._buffers)

    def _centre(
        self, raw: np.ndarray, name: str, unit: bool
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        n, d = raw.shape
        out = self._buffers.get(name, (n, d))
        stats = np.empty((n, 3), dtype=np.float64)
        parts = min(self._threads, -(-n // _ROWS_IN_CACHE))
        bounds = np.linspace(0, n, parts + 1).astype(int) // _ROWS_IN_CACHE * _ROWS_IN_CACHE
        bounds[-1] = n
        scratch = [self._buffers.get(f"squares{p}", (_ROWS_IN_CACHE, d)) for p in range(parts)]
        jobs = [
            (raw[a:b], out[a:b], scratch[p], stats[a:b], unit)
            for p, (a, b) in enumerate(itertools.pairwise(bounds))
        ]
        if parts == 1:
            _centre_block(*jobs[0])
        else:
            with ThreadPoolExecutor(parts) as pool:
                list(pool.map(lambda job: _centre_block(*job), jobs))
        return (out, *_flags(stats, raw.dtype.kind == "f"))

    def prepare_synthetic(self, raw: np.ndarray) -> Prepared:
        rows, _, constant, nonfinite = self._centre(raw, "synthetic", unit=True)
        return Prepared(rows, None, constant, nonfinite)

    def prepare_training(self, raw: np.ndarray) -> Prepared:
        out, inv_norm, constant, nonfinite = self._centre(raw, "training", unit=False)
        return Prepared(out, inv_norm, constant, nonfinite)

    def new_state(self, n_rows: int, k: int) -> TopK:
        return TopK(np.full((n_rows, k), -np.inf, dtype=np.float32), np.full((n_rows, k), -1, dtype=np.int64))

    def update(
        self,
        state: TopK,
        synthetic: Prepared,
        training: Prepared,
        offset: int,
        excluded: tuple[np.ndarray, np.ndarray] | None,
    ) -> None:
        shape = (synthetic.data.shape[0], training.data.shape[0])
        scores = np.matmul(synthetic.data, training.data.T, out=self._buffers.get("scores", shape))
        scores *= training.inv_norm
        dead = training.inv_norm == 0
        if dead.any():
            scores[:, dead] = -np.inf
        if excluded is not None:
            scores[excluded] = -np.inf
        merge_topk(state.values, state.indices, scores, offset)

    def result(self, state: TopK) -> tuple[np.ndarray, np.ndarray]:
        return state.values, state.indices
