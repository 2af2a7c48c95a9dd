"""Which backend ``auto`` picks, and instantiating one by name.

A backend prepares rows, multiplies blocks and keeps, per synthetic row, a running set of
candidates (:class:`memstudy.correlate.core.Backend`); the search loop in
:mod:`memstudy.correlate.search` drives it and re-scores the candidates exactly. In the float
backends (numpy, torch, cupy) synthetic rows are centred and unit-norm, training rows only centred,
and their inverse norms scale the score columns, which costs N_syn × N_chunk multiplications
instead of N_chunk × D. The int8 backend works on exact integer sums instead.
"""

from __future__ import annotations

import importlib.util
import logging

import numpy as np

from memstudy.correlate.backend_cupy import CupyBackend
from memstudy.correlate.backend_int8 import MAX_PIXELS, SUPPORTED_DTYPES, Int8Backend, int8_matmul_available
from memstudy.correlate.backend_numpy import NumpyBackend
from memstudy.correlate.backend_torch import TorchBackend
from memstudy.correlate.core import Backend

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "numpy", "int8", "torch", "cupy")


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
    """True when the exact int8 backend can take images of these dtypes and ``d`` pixels here.

    Requires torch's ``_int_mm`` to be exact on worst-case values on this CPU (checked once).
    """
    return (
        all(np.dtype(t) in SUPPORTED_DTYPES for t in dtypes) and d <= MAX_PIXELS and int8_matmul_available()
    )


def resolve_backend(name: str, dtypes: tuple[np.dtype, ...] = (), d: int = 0) -> str:
    """The concrete backend ``auto`` stands for here; other names are checked and returned.

    ``auto`` picks CuPy when ``cupy.is_available()``, else torch on CUDA, else on the CPU the exact
    ``int8`` backend when every input is uint8/int8/bool (``dtypes``, ``d`` pixels per image) and
    ``torch._int_mm`` is exact on this CPU, else NumPy. With VNNI, int8 products run ~3× faster
    than float32 SGEMM, exactly.
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
        return NumpyBackend()
    if name == "torch":
        return TorchBackend(device)
    if name == "int8":
        return Int8Backend()
    if not cupy_available():
        raise ValueError(
            "backend='cupy' needs CuPy and a CUDA GPU (pip install 'memstudy[gpu]'), but "
            "cupy.is_available() is False or CuPy is not installed; use backend='auto'"
        )
    return CupyBackend()
