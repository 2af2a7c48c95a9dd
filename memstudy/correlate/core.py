"""What every backend shares: the prepared-block type, the backend protocol, constants, work buffers
and the error bound of a float32 score.

The backends import this module and nothing else of :mod:`memstudy.correlate`; the registry
(:mod:`memstudy.correlate.backends`) imports the backends.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

#: Pixels per float32 GEMM call: products are summed over at most this many pixels and those sums
#: added outside the GEMM (not with beta = 1, which lets a BLAS chain them), which bounds the
#: rounding error of a score whatever order a BLAS sums in (see :func:`float32_score_bound`).
#: Smaller pieces give a tighter bound, so fewer candidates to re-score; 2048 cost ~2 % of GEMM
#: speed here (1024: ~8 %).
K_PIECE = 2048
#: Default working-memory budget on the CPU, in MiB.
DEFAULT_CPU_CHUNK_MB = 1024.0
#: At most this much device memory by default: big synthetic blocks amortize the uploads.
MAX_GPU_CHUNK_MB = 16384.0
#: Image dtypes whose values fit int8 after a shift: their Pearson r is computed from exact integer
#: sums (the int8 backend, and the exact re-score of every backend).
EXACT_DTYPES = frozenset({np.dtype(np.uint8), np.dtype(np.int8), np.dtype(np.bool_)})
#: Up to this many pixels the integer numerator D·Σxy − Σx·Σy (≤ 2¹⁴·D²) fits int64.
MAX_EXACT_PIXELS = 20_000_000
#: Unit roundoff of float32 and float64.
U32 = 2.0**-24
U64 = 2.0**-53


def is_exact(dtype: np.dtype, d: int) -> bool:
    """True when rows of ``d`` pixels of ``dtype`` get exact integer sums (:data:`EXACT_DTYPES`)."""
    return np.dtype(dtype) in EXACT_DTYPES and d <= MAX_EXACT_PIXELS


def exact_shift(dtype: np.dtype) -> int:
    """What is subtracted from 8-bit pixels to bring them into [-128, 127]: 128 for uint8, else 0."""
    return 128 if np.dtype(dtype) == np.uint8 else 0


def shifted_stats(sums: np.ndarray, squares: np.ndarray, d: int, shift: int) -> np.ndarray:
    """Exact Σv' and spread D·Σv'² − (Σv')² (int64, shape (2, n)) of 8-bit rows from Σv and Σv².

    v' = v − ``shift`` (:func:`exact_shift`): Σv' = Σv − s·D, Σv'² = Σv² − 2s·Σv + s²·D. The spread
    does not change with the shift; shifted, every term stays ≤ 2¹⁴·D², within int64 up to
    :data:`MAX_EXACT_PIXELS`.
    """
    sums = np.asarray(sums, dtype=np.int64)
    shifted = sums - shift * d
    shifted_squares = np.asarray(squares, dtype=np.int64) - 2 * shift * sums + shift * shift * d
    return np.stack([shifted, d * shifted_squares - shifted * shifted])


@dataclass
class Prepared:
    """A prepared block on the backend's device, with host-side flags per row.

    ``data`` holds the rows as the backend multiplies them, ``inv_norm`` the per-row scale applied
    to the scores (None when rows are already unit-norm), ``sums`` any further per-row statistics
    a backend needs (the exact integer backend keeps pixel sums there). ``offset2`` bounds, per
    row, the squared error of the centring relative to the row's spread (see
    :func:`float32_score_bound`); None where centring is exact or done in float64.
    ``exact_stats``, where a backend computed them for 8-bit rows, holds their exact Σv' and
    spreads (:func:`shifted_stats`), which the exact re-score (:mod:`memstudy.correlate.rescore`)
    then need not compute again.
    """

    data: Any
    inv_norm: Any
    constant: np.ndarray
    nonfinite: np.ndarray
    sums: Any = None
    offset2: np.ndarray | None = None
    exact_stats: np.ndarray | None = None


class Backend(Protocol):
    """The operations the search loop needs from a backend.

    A backend only selects candidates: it keeps, per synthetic row, the ``slots`` best fast scores
    seen so far. The search then re-scores the candidates exactly and orders them
    (:mod:`memstudy.correlate.rescore`), so backends differ in speed, never in the answer.
    """

    name: str
    #: Bytes per pixel of a prepared row, and per score while a block is scored and merged.
    prepared_itemsize: int
    score_bytes: int
    #: True when the fast scores already are the exact values (integer sums; no re-score needed).
    exact: bool

    def default_chunk_mb(self) -> float:
        """The working-memory budget used when ``chunk_mb`` is not given."""

    def score_bound(self, d: int) -> float:
        """A bound on |fast score − r| for rows of ``d`` pixels, before the per-row centring terms."""

    def prepare_synthetic(self, raw: np.ndarray) -> Prepared:
        """Prepare synthetic rows (float backends: centred, unit-norm; constant rows zero)."""

    def prepare_training(self, raw: np.ndarray) -> Prepared:
        """Prepare training rows (float backends: centred, with inverse norms; 0 marks dead rows)."""

    def new_state(self, n_rows: int, slots: int) -> Any:
        """A running top-``slots`` for ``n_rows`` synthetic rows: values -inf, indices -1."""

    def update(
        self,
        state: Any,
        synthetic: Prepared,
        training: Prepared,
        offset: int,
        excluded: tuple[np.ndarray, np.ndarray] | None,
    ) -> None:
        """Score ``synthetic`` against ``training`` and merge into ``state``.

        ``offset`` is the global index of the first training row; ``excluded`` holds local
        (row, column) pairs that must not match; constant training rows must never match.
        """

    def result(self, state: Any) -> tuple[np.ndarray, np.ndarray]:
        """The running top-``slots`` as host ``(values float64, indices int64)``, in any order."""

    def close(self) -> None:
        """The search is over: give back what should outlive it (work buffers)."""


def gamma(n: float, u: float) -> float:
    """Higham's γ_n = n·u / (1 − n·u): the relative error bound of n rounded operations."""
    return n * u / (1 - n * u)


def float32_score_bound(d: int, *, k_piece: int = K_PIECE, input_rounding: float = 0.0) -> float:
    """Bound on |fast score − r| of a float32 score, besides the per-row centring terms.

    The fast score of unit rows a, b (a centred and scaled, b centred, its norm applied to the
    score) is ``fl(Σ a_l·b_l)``. Derivation, in units u = 2⁻²⁴ (Higham, *Accuracy and Stability
    of Numerical Algorithms*, §3.1):

    - GEMM: products summed over at most ``k_piece`` pixels in any order (any summation tree of
      n terms has depth ≤ n − 1), those piece sums added one by one: depth ≤ k_piece + ⌈d/k_piece⌉,
      so |error| ≤ γ_n·Σ|a_l||b_l| ≤ γ_n·‖a‖‖b‖ (Cauchy–Schwarz) with n = k_piece + ⌈d/k_piece⌉ + 1;
    - ``input_rounding``: relative error of each factor before the product (TF32: 2⁻¹¹), adding
      2·input_rounding·‖a‖‖b‖;
    - standardization: each centred value rounded once (direction of the row off by ≤ 2u), the
      scale rounded (≤ 2u), the norm from float32 dot products of 128 pixels added in float64
      (relative error ≤ γ_129 + d·2⁻⁵³ ≤ γ_s with s = 128 + ⌈log₂ d⌉ + 1; for 8-bit rows the norm
      of the exactly centred row from exact integer sums, within u of the stored row's norm
      besides the centring term), so ‖a‖, ‖b‖ ∈ 1 ± ζ with ζ = γ_s/2 + 2u, and the directions
      within 2u each; the score scaled once more (u).

    Total ≤ (γ_n + 2·input_rounding)(1 + ζ)² + 2ζ + 5u; the factor 1.01 covers the products of
    these small terms. The centring terms (the subtracted mean is not the exact mean) are second
    order, ≤ η_a² + η_b², and added per row by the caller (:attr:`Prepared.offset2`).
    """
    n = k_piece + math.ceil(d / k_piece) + 1
    zeta = gamma(128 + math.ceil(math.log2(max(d, 2))) + 1, U32) / 2 + 2 * U32
    gemm = gamma(n, U32) + 2 * input_rounding
    return 1.01 * (gemm * (1 + zeta) ** 2 + 2 * zeta + 5 * U32)


class Buffers:
    """Named flat work buffers, grown as needed and reused chunk after chunk."""

    def __init__(self) -> None:
        self._arrays: dict[str, np.ndarray] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: type = np.float32) -> np.ndarray:
        """A ``shape`` view of the buffer ``name`` (contents undefined)."""
        size = int(np.prod(shape))
        array = self._arrays.get(name)
        if array is None or array.size < size or array.dtype != dtype:
            array = self._arrays[name] = np.empty(size, dtype=dtype)
        return array[:size].reshape(shape)


class BufferPool:
    """Work buffers kept from one search to the next in this process.

    Touching fresh memory costs page faults (~1 ms per MB on a VM): for a search's several hundred
    MB of buffers that was more than all of its standardization. A search takes a set of buffers
    and gives it back when done; concurrent searches (threads) never share one.
    """

    def __init__(self, keep: int = 2) -> None:
        self._free: list[Buffers] = []
        self._keep = keep
        self._lock = threading.Lock()

    def take(self) -> Buffers:
        """A set of buffers no other search uses."""
        with self._lock:
            return self._free.pop() if self._free else Buffers()

    def give(self, buffers: Buffers) -> None:
        """Return a set of buffers for the next search."""
        with self._lock:
            if len(self._free) < self._keep:
                self._free.append(buffers)

    def clear(self) -> None:
        """Drop every kept set."""
        with self._lock:
            self._free.clear()


POOL = BufferPool()


def release_buffers() -> None:
    """Free the work buffers the CPU backends keep for the next search (at most ~2 × ``chunk_mb``)."""
    POOL.clear()


@dataclass
class TorchTopK:
    """Running top candidates of a block of synthetic rows, as torch tensors (torch and int8)."""

    values: Any
    indices: Any


def new_topk(torch: Any, n_rows: int, slots: int, device: Any, dtype: Any) -> TorchTopK:
    """A running top-``slots`` with values -inf and indices -1."""
    return TorchTopK(
        torch.full((n_rows, slots), -torch.inf, dtype=dtype, device=device),
        torch.full((n_rows, slots), -1, dtype=torch.int64, device=device),
    )


def merge_scores(
    state: TorchTopK,
    scores: Any,
    training: Prepared,
    offset: int,
    excluded: tuple[np.ndarray, np.ndarray] | None,
) -> None:
    """Mask dead columns and excluded pairs in a torch score block, then merge it into ``state``."""
    import torch

    dead = training.constant | training.nonfinite
    if dead.any():
        scores[:, torch.from_numpy(dead).to(scores.device)] = -torch.inf
    if excluded is not None:
        rows, cols = (torch.from_numpy(a).to(scores.device) for a in excluded)
        scores[rows, cols] = -torch.inf
    slots = state.values.shape[1]
    candidates = torch.cat([state.values, scores], dim=1)
    top, where = torch.topk(candidates, min(slots, candidates.shape[1]), dim=1)
    previous = state.indices.gather(1, where.clamp(max=slots - 1))
    state.indices = torch.where(where < slots, previous, where - slots + offset)
    state.values = top
