"""Torch backend: the same search with torch tensors, on the CPU or a CUDA device."""

from __future__ import annotations

import numpy as np

from memstudy.correlate.backend_numpy import NumpyBackend
from memstudy.correlate.core import (
    DEFAULT_CPU_CHUNK_MB,
    K_PIECE,
    MAX_GPU_CHUNK_MB,
    Prepared,
    TorchTopK,
    float32_score_bound,
    merge_scores,
    new_topk,
)

#: Relative rounding of each factor when float32 products run in TF32 (10-bit mantissa).
TF32_ROUNDING = 2.0**-11


class TorchBackend:
    """Search with torch: its GEMM (MKL/OpenBLAS on CPU, cuBLAS on CUDA) and ``torch.topk``.

    Rows are standardized on the host exactly as the NumPy backend does (pairwise sums): torch's
    own float32 reductions lose up to ~4e-5 on r for low-contrast bright images, and its float64
    reductions are slow on the CPU. On CUDA the standardized float32 rows are uploaded. Products
    are summed over ``K_PIECE`` pixels at a time (see there).
    """

    name = "torch"
    prepared_itemsize = 4
    score_bytes = 20
    exact = False

    def __init__(self, device: str | None = None) -> None:
        import torch

        self._torch = torch
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self._host = NumpyBackend()
        self._scores = None

    def default_chunk_mb(self) -> float:
        if self.device.type == "cpu":
            return DEFAULT_CPU_CHUNK_MB
        free, _ = self._torch.cuda.mem_get_info(self.device)
        return min(free / 2**20 / 2, MAX_GPU_CHUNK_MB)

    def score_bound(self, d: int) -> float:
        torch = self._torch
        reduced = torch.get_float32_matmul_precision() != "highest" or (
            self.device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
        )
        return float32_score_bound(d, input_rounding=TF32_ROUNDING if reduced else 0.0)

    def _to_device(self, block: Prepared) -> Prepared:
        torch = self._torch
        data = torch.from_numpy(block.data).to(self.device)
        inv_norm = None if block.inv_norm is None else torch.from_numpy(block.inv_norm).to(self.device)
        return Prepared(
            data,
            inv_norm,
            block.constant,
            block.nonfinite,
            offset2=block.offset2,
            exact_stats=block.exact_stats,
        )

    def prepare_synthetic(self, raw: np.ndarray) -> Prepared:
        return self._to_device(self._host.prepare_synthetic(raw))

    def prepare_training(self, raw: np.ndarray) -> Prepared:
        return self._to_device(self._host.prepare_training(raw))

    def new_state(self, n_rows: int, slots: int) -> TorchTopK:
        return new_topk(self._torch, n_rows, slots, self.device, self._torch.float32)

    def update(
        self,
        state: TorchTopK,
        synthetic: Prepared,
        training: Prepared,
        offset: int,
        excluded: tuple[np.ndarray, np.ndarray] | None,
    ) -> None:
        torch = self._torch
        shape = (synthetic.data.shape[0], training.data.shape[0])
        size = shape[0] * shape[1]
        if self._scores is None or self._scores.numel() < 2 * size:
            self._scores = torch.empty(2 * size, dtype=torch.float32, device=self.device)
        scores, piece = self._scores[:size].view(shape), self._scores[size : 2 * size].view(shape)
        for start in range(0, synthetic.data.shape[1], K_PIECE):
            a = synthetic.data[:, start : start + K_PIECE]
            b = training.data[:, start : start + K_PIECE]
            # Each piece in its own product, added here: addmm_ would let the BLAS chain the sums.
            if start == 0:
                torch.matmul(a, b.T, out=scores)
            else:
                scores.add_(torch.matmul(a, b.T, out=piece))
        scores.mul_(training.inv_norm)
        merge_scores(state, scores, training, offset, excluded)

    def result(self, state: TorchTopK) -> tuple[np.ndarray, np.ndarray]:
        return state.values.double().cpu().numpy(), state.indices.cpu().numpy()

    def close(self) -> None:
        self._host.close()
