"""Torch backend: the same search with torch tensors, on the CPU or a CUDA device."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from memstudy.correlate.backend_numpy import NumpyBackend
from memstudy.correlate.backends import DEFAULT_CPU_CHUNK_MB, K_PIECE, MAX_GPU_CHUNK_MB, Prepared


@dataclass
class TorchTopK:
    """Running top-k of a block of synthetic rows, as device tensors."""

    values: Any
    indices: Any


def new_topk(torch: Any, n_rows: int, k: int, device: Any, dtype: Any) -> TorchTopK:
    """A running top-k with values -inf and indices -1."""
    return TorchTopK(
        torch.full((n_rows, k), -torch.inf, dtype=dtype, device=device),
        torch.full((n_rows, k), -1, dtype=torch.int64, device=device),
    )


def merge_scores(
    state: TorchTopK,
    scores: Any,
    training: Prepared,
    offset: int,
    excluded: tuple[np.ndarray, np.ndarray] | None,
) -> None:
    """Mask dead columns and excluded pairs in a score block, then merge it into ``state``."""
    import torch

    dead = training.constant | training.nonfinite
    if dead.any():
        scores[:, torch.from_numpy(dead).to(scores.device)] = -torch.inf
    if excluded is not None:
        rows, cols = (torch.from_numpy(a).to(scores.device) for a in excluded)
        scores[rows, cols] = -torch.inf
    k = state.values.shape[1]
    if k == 1:
        top, best = scores.max(dim=1)
        better = top > state.values[:, 0]
        state.values[:, 0] = torch.where(better, top, state.values[:, 0])
        state.indices[:, 0] = torch.where(better, best + offset, state.indices[:, 0])
        return
    candidates = torch.cat([state.values, scores], dim=1)
    top, where = torch.topk(candidates, k, dim=1)
    previous = state.indices.gather(1, where.clamp(max=k - 1))
    state.indices = torch.where(where < k, previous, where - k + offset)
    state.values = top


class TorchBackend:
    """Search with torch: its GEMM (MKL/OpenBLAS on CPU, cuBLAS on CUDA) and ``torch.topk``.

    Rows are standardized on the host exactly as the NumPy backend does (pairwise sums): torch's
    own float32 reductions lose up to ~4e-5 on r for low-contrast bright images, and its float64
    reductions are slow on the CPU. On CUDA the standardized float32 rows are uploaded. Products
    are summed over ``K_PIECE`` pixels at a time (see there).
    """

    name = "torch"
    prepared_itemsize = 4
    score_bytes = 16

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

    def _to_device(self, block: Prepared) -> Prepared:
        torch = self._torch
        data = torch.from_numpy(block.data).to(self.device)
        inv_norm = None if block.inv_norm is None else torch.from_numpy(block.inv_norm).to(self.device)
        return Prepared(data, inv_norm, block.constant, block.nonfinite)

    def prepare_synthetic(self, raw: np.ndarray) -> Prepared:
        return self._to_device(self._host.prepare_synthetic(raw))

    def prepare_training(self, raw: np.ndarray) -> Prepared:
        return self._to_device(self._host.prepare_training(raw))

    def new_state(self, n_rows: int, k: int) -> TorchTopK:
        return new_topk(self._torch, n_rows, k, self.device, self._torch.float32)

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
        if self._scores is None or self._scores.numel() < shape[0] * shape[1]:
            self._scores = torch.empty(shape[0] * shape[1], dtype=torch.float32, device=self.device)
        scores = self._scores[: shape[0] * shape[1]].view(shape)
        for start in range(0, synthetic.data.shape[1], K_PIECE):
            a = synthetic.data[:, start : start + K_PIECE]
            b = training.data[:, start : start + K_PIECE]
            if start == 0:
                torch.matmul(a, b.T, out=scores)
            else:
                scores.addmm_(a, b.T)
        scores.mul_(training.inv_norm)
        merge_scores(state, scores, training, offset, excluded)

    def result(self, state: TorchTopK) -> tuple[np.ndarray, np.ndarray]:
        return state.values.float().cpu().numpy(), state.indices.cpu().numpy()

    def close(self) -> None:
        self._host.close()
