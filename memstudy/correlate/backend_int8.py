"""Exact integer backend for 8-bit images: int8 GEMM with int32 accumulation, r in float64.

For integer pixels, Pearson r has a closed form in integer sums,

    r = (D·Σxy − Σx·Σy) / sqrt((D·Σx² − (Σx)²) · (D·Σy² − (Σy)²)),

and every sum is exact in integer arithmetic. uint8 images are shifted to int8 (x − 128, which
leaves r unchanged) so that ``torch._int_mm`` (int8 × int8 → int32, VNNI/AMX on x86) computes
Σxy exactly; the numerator stays exact in int64 and r is formed with the correctly rounded float64
operations of :func:`memstudy.correlate.rescore.exact_r`, so its scores are the exact values, bit
for bit, and need no re-score. Products are accumulated over at most ``K_PIECE`` pixels per GEMM
call, which keeps int32 from overflowing (128² × 65,536 = 2³⁰); larger images are split and summed
in int64.

Not every CPU computes ``_int_mm`` exactly: oneDNN without VNNI (AVX2: AMD Zen 1–3, Intel before
Cascade Lake) saturates intermediate sums. :func:`int8_matmul_available` checks worst-case values once
per process; ``auto`` uses this backend only where it passes.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import numpy as np

from memstudy.correlate.core import (
    DEFAULT_CPU_CHUNK_MB,
    EXACT_DTYPES,
    MAX_EXACT_PIXELS,
    POOL,
    U64,
    Prepared,
    TorchTopK,
    merge_scores,
    new_topk,
)

logger = logging.getLogger(__name__)

#: Image dtypes this backend takes: their values fit int8 after a shift.
SUPPORTED_DTYPES = EXACT_DTYPES
#: Pixels per int32-accumulated GEMM: |Σxy| ≤ 128² × 65,536 = 2³⁰ cannot overflow int32.
K_PIECE = 65536
#: Larger images could overflow the int64 numerator D·Σxy (≤ 2¹⁴·D²).
MAX_PIXELS = MAX_EXACT_PIXELS
#: Rows whose sums of squares come from one small GEMM (its diagonal): cheaper than squaring.
_DIAGONAL_ROWS = 16


def probe_operands() -> tuple[np.ndarray, np.ndarray]:
    """Worst-case int8 operands over one full ``K_PIECE``: rows of 127, of −128 and alternating."""
    ramp = np.arange(K_PIECE)
    patterns = [
        np.full(K_PIECE, 127),
        np.full(K_PIECE, -128),
        np.where(ramp % 2 == 0, 127, -128),
        np.where(ramp % 3 == 0, -128, 127),
        np.where(ramp < K_PIECE // 2, 127, -128),
        (ramp * 37) % 256 - 128,
    ]
    a = np.array(patterns * 3, dtype=np.int8)  # 18 rows: some backends need more than 16
    b = np.array(patterns + patterns[:2], dtype=np.int8)  # 8 columns
    return a, b


@functools.cache
def int8_matmul_available() -> bool:
    """True when this torch's ``_int_mm`` gives the exact int64 products of worst-case operands here.

    Checked once per process; a failure is logged with the reason.
    """
    try:
        import torch
    except ImportError:
        return False
    if not hasattr(torch, "_int_mm"):
        logger.info("int8 backend not used: this torch has no _int_mm")
        return False
    a, b = probe_operands()
    try:
        got = torch._int_mm(torch.from_numpy(a), torch.from_numpy(b).T).numpy()
    except RuntimeError as error:
        logger.info("int8 backend not used: torch._int_mm failed on the CPU (%s)", error)
        return False
    expected = a.astype(np.int64) @ b.astype(np.int64).T
    if not np.array_equal(got, expected):
        wrong = int(np.count_nonzero(got != expected))
        logger.warning(
            "int8 backend not used: torch._int_mm is not exact on this CPU (%d of %d worst-case "
            "sums over %d pixels wrong, e.g. %d instead of %d); using the float32 path",
            wrong,
            expected.size,
            K_PIECE,
            got[got != expected][0],
            expected[got != expected][0],
        )
        return False
    return True


class Int8Backend:
    """Exact search of uint8/int8/bool images on the CPU with torch's int8 matrix product."""

    name = "int8"
    prepared_itemsize = 1
    score_bytes = 48  # int32 product, int64 numerator, float64 denominator and score, candidates
    exact = True

    def __init__(self) -> None:
        import torch

        if not int8_matmul_available():
            raise ValueError(
                "backend='int8' needs torch._int_mm to be exact on this CPU, and it is not (see the "
                "warning logged above); use backend='numpy' or 'auto'"
            )
        self._torch = torch
        # Host buffers (as torch views) from the shared pool; the score block's int32, int64 and
        # float64 stages too, so no chunk touches fresh memory.
        self._buffers = POOL.take()

    def _tensor(self, name: str, shape: tuple[int, ...], dtype: type) -> Any:
        return self._torch.from_numpy(self._buffers.get(name, shape, dtype))

    def default_chunk_mb(self) -> float:
        return DEFAULT_CPU_CHUNK_MB

    def score_bound(self, d: int) -> float:
        # Exact sums; a rounding to float64 of each spread, product, sqrt, division: ≤ 4 u64.
        return 8 * U64

    def close(self) -> None:
        POOL.give(self._buffers)

    def _int8_rows(self, raw: np.ndarray, name: str) -> np.ndarray:
        if raw.dtype not in SUPPORTED_DTYPES or raw.shape[1] > MAX_PIXELS:
            raise ValueError(
                f"backend='int8' needs uint8, int8 or bool images of at most {MAX_PIXELS} pixels, "
                f"got {raw.dtype} images of {raw.shape[1]} pixels; use backend='numpy'"
            )
        rows = self._buffers.get(name, raw.shape, np.int8)
        if raw.dtype == np.uint8:
            # x − 128 for uint8 is a flip of the top bit, read as int8.
            np.bitwise_xor(raw.view(np.int8), np.int8(-128), out=rows)
        else:
            np.copyto(rows, raw.view(np.int8))
        return rows

    def _matmul(self, a: Any, b: Any, name: str) -> Any:
        """Exact ``a @ b.T`` for int8 rows, as int64 in the buffer ``name``."""
        torch = self._torch
        shape = (a.shape[0], b.shape[0])
        product = self._tensor(f"{name}-int32", shape, np.int32)
        total = self._tensor(f"{name}-int64", shape, np.int64)
        for start in range(0, a.shape[1], K_PIECE):
            torch._int_mm(a[:, start : start + K_PIECE], b[:, start : start + K_PIECE].T, out=product)
            if start == 0:
                total.copy_(product)
            else:
                total.add_(product)
        return total

    def _prepare(self, raw: np.ndarray, name: str) -> Prepared:
        torch = self._torch
        n, d = raw.shape
        x = torch.from_numpy(self._int8_rows(raw, name))
        ones = torch.ones((d, 8), dtype=torch.int8)
        sums = self._matmul(x, ones.T, "sums")[:, 0].clone()
        squares = torch.empty(n, dtype=torch.int64)
        for i in range(0, n, _DIAGONAL_ROWS):
            block = x[i : i + _DIAGONAL_ROWS]
            squares[i : i + _DIAGONAL_ROWS] = self._matmul(block, block, "squares").diagonal()
        # D² × variance, exact; zero exactly when every pixel is equal.
        spread = d * squares - sums * sums
        constant = (spread == 0).numpy()
        # ``inv_norm`` holds the spread here: r divides by sqrt(spread_x · spread_y).
        return Prepared(x, spread.double(), constant, np.zeros(n, dtype=bool), sums)

    def prepare_synthetic(self, raw: np.ndarray) -> Prepared:
        return self._prepare(raw, "synthetic")

    def prepare_training(self, raw: np.ndarray) -> Prepared:
        return self._prepare(raw, "training")

    def new_state(self, n_rows: int, slots: int) -> TorchTopK:
        return new_topk(self._torch, n_rows, slots, "cpu", self._torch.float64)

    def update(
        self,
        state: TorchTopK,
        synthetic: Prepared,
        training: Prepared,
        offset: int,
        excluded: tuple[np.ndarray, np.ndarray] | None,
    ) -> None:
        d = synthetic.data.shape[1]
        numerator = self._matmul(synthetic.data, training.data, "scores").mul_(d)
        numerator.addr_(synthetic.sums, training.sums, alpha=-1)  # D·Σxy − Σx·Σy, exact
        shape = tuple(numerator.shape)
        # r = num / sqrt(spread_x · spread_y): the same correctly rounded steps as the re-score.
        denominator = self._tensor("denominator-float64", shape, np.float64)
        self._torch.outer(synthetic.inv_norm, training.inv_norm, out=denominator).sqrt_()
        scores = self._tensor("scores-float64", shape, np.float64).copy_(numerator).div_(denominator)
        merge_scores(state, scores, training, offset, excluded)

    def result(self, state: TorchTopK) -> tuple[np.ndarray, np.ndarray]:
        return state.values.numpy(), state.indices.numpy()
