"""From candidates to the answer: keep every candidate that may belong to the top k, compute its r
exactly from the raw pixels, order by (−r, training index) and cut to k.

Shared by every backend (which only select candidates) and by :func:`merge_matches`, so that the
answer does not depend on the backend, ``chunk_mb``, the Dask split or the machine.

Exact r. For uint8/int8/bool images r is computed from exact integer sums,
``r = (D·Σxy − Σx·Σy) / sqrt((D·Σx² − (Σx)²)·(D·Σy² − (Σy)²))``: the numerator is exact in int64,
each spread is rounded once to float64, then one product, square root and division, all
correctly rounded IEEE operations, so every machine gives the same bits (the int8 backend uses
the same formula). The numerator does not change when pixels are shifted, so it is computed from
x' and y' in [-128, 127] (:func:`~memstudy.correlate.core.exact_shift`), where every term stays
within int64. Σx'y is summed in float32 over pieces of ``_EXACT_PIECE`` pixels, the training row
as it is (|x'·y| ≤ 128·255 < 2¹⁵): every partial sum is an integer of magnitude < 2²⁴, exact in
any order; the piece sums are added in float64, exact below 2⁵³; then Σx'y' = Σx'y − s·Σx'. The
training rows' exact sums and spreads come from the backend where it has them (the NumPy and
torch backends compute them while standardizing), else from a pass over the candidates here.
Other dtypes: float64 centred rows, r to about 1e-15.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from memstudy.correlate.core import U32, exact_shift, is_exact
from memstudy.correlate.matches import sort_rows
from memstudy.correlate.sources import Source

#: Pixels per exactly summed float32 piece: 512 · 128 · 255 < 2²⁴.
_EXACT_PIECE = 512
#: Pairs scored together: bounds the float32 copies of training rows held at once.
_GROUP = 64
#: Slack for ties at float32 resolution: values equal after rounding to float32 are ties.
_FLOAT32_SLACK = 2 * U32


def slots_for(k: int) -> int:
    """Candidates a backend keeps per synthetic row at first: k plus room for near-ties."""
    return 2 * k + 8


def thresholds(values: np.ndarray, indices: np.ndarray, k: int, bounds: np.ndarray) -> np.ndarray:
    """Per row, the lowest fast score that may still belong to the true top k.

    If k candidates have fast scores ≥ τ, each has r ≥ τ − bound, so the k-th largest r is
    ≥ τ − bound and a member of the top k has a fast score ≥ τ − 2·bound. Ties are decided at
    float32 resolution, hence the extra slack. Rows with fewer than k candidates keep all.
    """
    live = np.where((indices >= 0) & np.isfinite(values), values, -np.inf)
    if live.shape[1] < k:
        return np.full(live.shape[0], -np.inf)
    tau = -np.partition(-live, k - 1, axis=1)[:, k - 1]
    return tau - 2 * bounds - _FLOAT32_SLACK


def overflowing(values: np.ndarray, indices: np.ndarray, k: int, bounds: np.ndarray) -> np.ndarray:
    """Rows whose full candidate buffer may have dropped a candidate above the threshold.

    Every dropped candidate scored at most the lowest kept one (the buffer's floor only rises).
    """
    live = (indices >= 0) & np.isfinite(values)
    floor = np.where(live, values, np.inf).min(axis=1)
    return live.all(axis=1) & (floor >= thresholds(values, indices, k, bounds))


def _pieces(rows: np.ndarray, out: np.ndarray, first: np.ndarray | None = None) -> np.ndarray:
    """8-bit rows as float32, zero-padded to whole pieces ``(n, q, piece)``, written into ``out``.

    With ``first``, that row comes first and ``rows`` after it. The gathered rows are cast in one
    call, not one call per row.
    """
    flat = out.reshape(out.shape[0], -1)
    d = rows.shape[1]
    body = flat if first is None else flat[1:]
    if first is not None:
        np.copyto(flat[0, :d], first, casting="unsafe")
    np.copyto(body[:, :d], rows, casting="unsafe")
    flat[:, d:] = 0
    return out


class _Scratch(threading.local):
    """Piece buffers reused from pair to pair (fresh pages cost more than the sums); per thread, so
    that concurrent threads never share one."""

    def get(self, n: int, d: int) -> np.ndarray:
        q = -(-d // _EXACT_PIECE)
        buffer = getattr(self, "buffer", None)
        if buffer is None or buffer.shape[0] < n or buffer.shape[1] != q:
            buffer = self.buffer = np.empty((n, q, _EXACT_PIECE), dtype=np.float32)
        return buffer[:n]

    def rows(self, n: int, d: int) -> np.ndarray:
        """Float64 rows for the pairs of non-integer images."""
        wide = getattr(self, "wide", None)
        if wide is None or wide.shape[0] < n or wide.shape[1] != d:
            wide = self.wide = np.empty((n, d), dtype=np.float64)
        return wide[:n]


def _threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def _in_threads(work: list, run: Callable[[list], None]) -> None:
    """``run(part)`` on contiguous parts of ``work``, one thread per core.

    The pair sums are short NumPy loops and small BLAS calls on cache-sized buffers, which release
    the GIL: two threads on two cores take ~0.6 of the time of one.
    """
    parts = min(_threads(), len(work))
    if parts <= 1:
        run(work)
        return
    edges = np.linspace(0, len(work), parts + 1).astype(int)
    with ThreadPoolExecutor(parts) as pool:
        list(pool.map(run, [work[a:b] for a, b in itertools.pairwise(edges)]))


def exact_r(num: np.ndarray, spread_x: np.ndarray, spread_y: np.ndarray) -> np.ndarray:
    """r from the exact int64 numerator and spreads (D·Σx² − (Σx)²), as the module docstring says."""
    return num.astype(np.float64) / np.sqrt(spread_x.astype(np.float64) * spread_y.astype(np.float64))


def _piece_stats(p: np.ndarray, d: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact Σv' and D·Σv'² − (Σv')² (int64) of shifted rows in pieces (every piece sum is exact)."""
    sums = p.sum(axis=2).sum(axis=1, dtype=np.float64).astype(np.int64)
    squares = np.einsum("nqp,nqp->nq", p, p).sum(axis=1, dtype=np.float64).astype(np.int64)
    return sums, d * squares - sums * sums


def _integer_stats(raw: np.ndarray, rows: np.ndarray, scratch: _Scratch) -> np.ndarray:
    """Exact Σy' and D·Σy² − (Σy)² (int64, shape (2, n)) of 8-bit ``raw[rows]``, a few at a time."""
    d = raw.shape[1]
    stats = np.empty((2, rows.size), dtype=np.int64)
    shift = exact_shift(raw.dtype)
    step = 16  # rows converted at a time: a few MB that stay in cache

    def run(starts: list[int]) -> None:
        for a in starts:
            chunk = rows[a : a + step]
            p = _pieces(raw[chunk], scratch.get(chunk.size, d))
            if shift:
                p.reshape(chunk.size, -1)[:, :d] -= shift
            stats[0, a : a + step], stats[1, a : a + step] = _piece_stats(p, d)

    _in_threads(list(range(0, rows.size, step)), run)
    return stats


def _float_rows(raw: np.ndarray, out: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Float64 centred rows (into ``out``, reused: fresh pages cost more than the sums), their means
    and their norms."""
    np.copyto(out, raw)
    means = out.mean(axis=1)
    out -= means[:, None]
    return out, means, np.sqrt(np.einsum("nd,nd->n", out, out))


def _float_stats(raw: np.ndarray, rows: np.ndarray, scratch: _Scratch) -> tuple[np.ndarray, np.ndarray]:
    """Means and centred norms (float64) of ``raw[rows]``, a few rows at a time."""
    means = np.empty(rows.size, dtype=np.float64)
    norms = np.empty(rows.size, dtype=np.float64)
    step = 8

    def run(starts: list[int]) -> None:
        for a in starts:
            chunk = raw[rows[a : a + step]]
            _, means[a : a + step], norms[a : a + step] = _float_rows(
                chunk, scratch.rows(len(chunk), raw.shape[1])
            )

    _in_threads(list(range(0, rows.size, step)), run)
    return means, norms


def exact_pairs(
    synthetic: np.ndarray,
    rows: np.ndarray,
    training: Source,
    cols: np.ndarray,
    batch_rows: int,
    training_stats: np.ndarray | None = None,
) -> np.ndarray:
    """Exact r of the pairs (``synthetic[rows[p]]``, training image ``cols[p]``), float64.

    Pairs come row by row (``rows`` non-decreasing). A file source is read ``batch_rows`` images
    at a time (sorted, consecutive ones in one read); an in-memory one is used in place.
    ``training_stats``: the exact Σy' and spreads of all training images (shape (2, n), as
    :attr:`~memstudy.correlate.core.Prepared.exact_stats`) where known.
    """
    out = np.empty(rows.size, dtype=np.float64)
    if rows.size == 0:
        return out
    unique = np.unique(cols)
    if training.in_memory:
        stats = None if training_stats is None else training_stats[:, unique]
        _score_batch(synthetic, rows, cols, training.read(0, training.n), unique, cols, stats, out)
        return out
    step = max(1, batch_rows)
    for a in range(0, unique.size, step):
        batch = unique[a : a + step]
        selected = np.flatnonzero((cols >= batch[0]) & (cols <= batch[-1]))
        local = np.searchsorted(batch, cols[selected])
        part = np.empty(selected.size, dtype=np.float64)
        stats = None if training_stats is None else training_stats[:, batch]
        _score_batch(
            synthetic, rows[selected], local, training.take(batch), np.arange(batch.size), local, stats, part
        )
        out[selected] = part
    return out


def _score_batch(
    synthetic: np.ndarray,
    rows: np.ndarray,
    cols: np.ndarray,
    training: np.ndarray,
    used: np.ndarray,
    used_cols: np.ndarray,
    used_stats: np.ndarray | None,
    out: np.ndarray,
) -> None:
    """Exact r of pairs (``synthetic[rows[p]]``, ``training[cols[p]]``) into ``out``.

    ``used`` lists the training rows that occur (sorted), ``used_cols`` is ``cols`` again: the
    statistics of each ``used`` row (``used_stats`` for 8-bit rows where known, else computed here)
    are looked up with ``searchsorted``.
    """
    d = synthetic.shape[1]
    exact = is_exact(synthetic.dtype, d) and is_exact(training.dtype, d)
    at_all = np.searchsorted(used, used_cols)
    scratch = _Scratch()
    if exact:
        x_shift, y_shift = exact_shift(synthetic.dtype), exact_shift(training.dtype)
        t_sums, t_spread = used_stats if used_stats is not None else _integer_stats(training, used, scratch)
    else:
        t_means, t_norms = _float_stats(training, used, scratch)
    # Pairs of one synthetic row, at most _GROUP at a time (rows with many near-ties).
    starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]] | (np.arange(rows.size) % _GROUP == 0))
    groups = list(zip(starts, np.r_[starts[1:], rows.size], strict=True))

    def score(group: tuple[int, int]) -> None:
        a, b = group
        i, at = rows[a], at_all[a:b]
        if exact:
            p = _pieces(training[cols[a:b]], scratch.get(b - a + 1, d), first=synthetic[i])
            if x_shift:
                p[0].reshape(-1)[:d] -= x_shift
            # (q, m + 1, piece) @ (q, piece, 1): one exact float32 sum per piece, added in float64.
            # x' rides along as row 0: its sums with itself give Σx'²; the others give Σx'y.
            dots = np.matmul(p.transpose(1, 0, 2), p[0][:, :, None])[:, :, 0]
            sums = dots.sum(axis=0, dtype=np.float64).astype(np.int64)
            x_sum = int(p[0].sum(axis=1).sum(dtype=np.float64))  # pieces of |Σx'| ≤ 2¹⁶: exact
            x_spread = np.int64(d * sums[0] - x_sum * x_sum)
            sxy = sums[1:] - y_shift * x_sum  # Σx'y' = Σx'y − s·Σx'
            out[a:b] = exact_r(d * sxy - x_sum * t_sums[at], x_spread, t_spread[at])
        else:
            y = scratch.rows(b - a + 1, d)
            x, _, x_norm = _float_rows(synthetic[i : i + 1], y[:1])
            y = y[1:]
            for target, c, mean in zip(y, cols[a:b], t_means[at], strict=True):
                np.copyto(target, training[c])  # as in _float_rows
                target -= mean
            dots = np.einsum("md,d->m", y, x[0])
            out[a:b] = np.clip(dots / (x_norm[0] * t_norms[at]), -1.0, 1.0)

    def run(part: list[tuple[int, int]]) -> None:
        for group in part:
            score(group)

    _in_threads(groups, run)


def finalize(
    synthetic: np.ndarray,
    values: np.ndarray,
    indices: np.ndarray,
    k: int,
    bounds: np.ndarray,
    *,
    training: Source | None,
    offset: int = 0,
    batch_rows: int = 1024,
    training_stats: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The top k of each row from its candidates: keep, re-score exactly, order, cut.

    ``values``/``indices``: candidates (fast scores, global training indices; -1 or -inf for
    empty slots), ``bounds`` per row the bound on |fast − r|. ``training`` is the source the
    candidates index (from ``offset``); None means the fast scores are the exact values already.
    ``training_stats``: the exact statistics of its 8-bit images where known (:func:`exact_pairs`).
    Returns float32 values and int64 indices, shape (n, k).
    """
    live = (indices >= 0) & np.isfinite(values)
    keep = live & (values >= thresholds(values, indices, k, bounds)[:, None])
    rows, slots = np.nonzero(keep)
    exact = values[rows, slots].astype(np.float64)
    if training is not None:
        exact = exact_pairs(
            synthetic, rows, training, indices[rows, slots] - offset, batch_rows, training_stats
        )
    kept_values = np.full(values.shape, -np.inf, dtype=np.float64)
    kept_values[rows, slots] = exact
    kept_indices = np.where(keep, indices, -1)
    out_values, out_indices = sort_rows(kept_values, kept_indices)
    if out_values.shape[1] < k:
        pad = k - out_values.shape[1]
        out_values = np.pad(out_values, ((0, 0), (0, pad)), constant_values=np.nan)
        out_indices = np.pad(out_indices, ((0, 0), (0, pad)), constant_values=-1)
    return out_values[:, :k], out_indices[:, :k]
