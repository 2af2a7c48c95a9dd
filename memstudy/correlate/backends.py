"""What a compute backend provides, and which one ``auto`` picks.

A backend prepares rows, multiplies blocks and keeps a running top-k; the search loop in
:mod:`memstudy.correlate.search` drives it. In the float backends (numpy, torch, cupy) synthetic
rows are centred and unit-norm, training rows only centred, and their inverse norms scale the
score columns, which costs N_syn × N_chunk multiplications instead of N_chunk × D. The int8
backend works on integer sums instead (see :mod:`memstudy.correlate.backend_int8`).
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "numpy", "int8", "torch", "cupy")
#: Pixels per float32 GEMM call in the torch and CuPy backends. MKL's SGEMM sums long products in
#: long chains (r off by up to ~5e-5 at 90,000 pixels of a low-contrast image); summing products
#: over 4096 pixels and adding those keeps r within ~3e-6, as OpenBLAS does, for ~3 % of speed.
K_PIECE = 4096
#: Default working-memory budget on the CPU, in MiB.
DEFAULT_CPU_CHUNK_MB = 1024.0
#: At most this much device memory by default: big synthetic blocks amortize the uploads.
MAX_GPU_CHUNK_MB = 16384.0


@dataclass
class Prepared:
    """A prepared block on the backend's device, with host-side flags per row.

    ``data`` holds the rows as the backend multiplies them, ``inv_norm`` the per-row scale applied
    to the scores (None when rows are already unit-norm), ``sums`` any further per-row statistics
    a backend needs (the exact integer backend keeps pixel sums there).
    """

    data: Any
    inv_norm: Any
    constant: np.ndarray
    nonfinite: np.ndarray
    sums: Any = None


class Backend(Protocol):
    """The operations the search loop needs from a backend."""

    name: str
    #: Bytes per pixel of a prepared row, and per score while a block is scored and merged.
    prepared_itemsize: int
    score_bytes: int

    def default_chunk_mb(self) -> float:
        """The working-memory budget used when ``chunk_mb`` is not given."""

    def prepare_synthetic(self, raw: np.ndarray) -> Prepared:
        """Prepare synthetic rows (float backends: centred, unit-norm; constant rows zero)."""

    def prepare_training(self, raw: np.ndarray) -> Prepared:
        """Prepare training rows (float backends: centred, with inverse norms; 0 marks dead rows)."""

    def new_state(self, n_rows: int, k: int) -> Any:
        """A running top-k for ``n_rows`` synthetic rows: values -inf, indices -1."""

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
        """The running top-k as host ``(values float32, indices int64)``, in any order."""

    def close(self) -> None:
        """The search is over: give back what should outlive it (work buffers)."""


def cuda_torch_available() -> bool:
    """True when torch is installed and sees a CUDA device."""
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


def cupy_available() -> bool:
    """True when CuPy is installed and a CUDA device is usable (``cupy.is_available()``)."""
    if importlib.util.find_spec("cupy") is None:
        return False
    try:
        import cupy

        return bool(cupy.is_available())
    except Exception:  # a broken CUDA install must mean "not available", never a crash
        logger.debug("cupy is installed but not usable", exc_info=True)
        return False


def int8_path_available(dtypes: tuple[np.dtype, ...], d: int) -> bool:
    """True when the exact int8 backend can take images of these dtypes and ``d`` pixels here."""
    from memstudy.correlate import backend_int8

    return (
        all(np.dtype(t) in backend_int8.SUPPORTED_DTYPES for t in dtypes)
        and d <= backend_int8.MAX_PIXELS
        and importlib.util.find_spec("torch") is not None
        and backend_int8.int8_matmul_available()
    )


def resolve_backend(name: str, dtypes: tuple[np.dtype, ...] = (), d: int = 0) -> str:
    """The concrete backend ``auto`` stands for here; other names are checked and returned.

    ``auto`` picks CuPy when ``cupy.is_available()``, else torch on CUDA, else on the CPU the exact
    ``int8`` backend when every input is uint8/int8/bool (``dtypes``, ``d`` pixels per image),
    else NumPy. On an AVX-512 CPU int8 products run ~4× faster than float32 SGEMM, exactly.
    """
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r}: expected one of {BACKENDS}")
    if name != "auto":
        return name
    if cupy_available():
        return "cupy"
    if cuda_torch_available():
        return "torch"
    if dtypes and int8_path_available(dtypes, d):
        return "int8"
    return "numpy"


def get_backend(
    name: str, *, device: str | None = None, dtypes: tuple[np.dtype, ...] = (), d: int = 0
) -> Backend:
    """Instantiate a backend by name (``auto`` resolved for images of ``dtypes`` and ``d`` pixels).

    ``device`` is the torch device for the ``torch`` backend (cpu/cuda).
    """
    name = resolve_backend(name, dtypes, d)
    if name == "numpy":
        from memstudy.correlate.backend_numpy import NumpyBackend

        return NumpyBackend()
    if name == "torch":
        from memstudy.correlate.backend_torch import TorchBackend

        return TorchBackend(device)
    if name == "int8":
        from memstudy.correlate.backend_int8 import Int8Backend

        return Int8Backend()
    if not cupy_available():
        raise ValueError(
            "backend='cupy' needs CuPy and a CUDA GPU (pip install 'memstudy[gpu]'), but "
            "cupy.is_available() is False or CuPy is not installed; use backend='auto'"
        )
    from memstudy.correlate.backend_cupy import CupyBackend

    return CupyBackend()
