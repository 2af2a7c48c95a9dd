"""Pieces shared by the phantom generators: completion markers, parallel jobs, smooth random fields."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import math
import multiprocessing
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

COMPLETE_MARKER = "COMPLETE.json"


def marker_matches(root: Path, params: dict) -> bool:
    """Whether ``root`` holds a completion marker written for exactly ``params``."""
    marker = root / COMPLETE_MARKER
    if not marker.is_file():
        return False
    return json.loads(marker.read_text()) == params


def run_jobs(
    function: Callable[..., None],
    jobs: list[tuple],
    *,
    workers: int | None,
    progress: bool,
    desc: str,
    unit: str,
) -> None:
    """Call ``function(*job)`` for every job, in ``workers`` processes, with a progress bar."""
    if workers is None:
        workers = min(os.cpu_count() or 1, 4)
    workers = max(1, min(workers, len(jobs)))
    with tqdm(total=len(jobs), desc=desc, unit=unit, disable=not progress) as bar:
        if workers == 1:
            for job in jobs:
                function(*job)
                bar.update()
            return
        # spawn, not fork: the parent may hold threads (BLAS, tqdm) that a fork would copy mid-flight.
        context = multiprocessing.get_context("spawn")
        with (
            _single_threaded_children(),
            concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool,
        ):
            futures = [pool.submit(function, *job) for job in jobs]
            try:
                for future in concurrent.futures.as_completed(futures):
                    future.result()
                    bar.update()
            except BaseException:  # a failure or Ctrl-C: drop the queued jobs instead of running them
                for future in futures:
                    future.cancel()
                raise


@contextlib.contextmanager
def _single_threaded_children() -> Iterator[None]:
    """Start child processes with one BLAS/OpenMP thread each.

    The processes already use every core; BLAS threads on top of them oversubscribe the cores, and
    OpenBLAS's waiting threads then made the small matrix products here ten times slower.
    """
    names = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(dict.fromkeys(names, "1"))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def gaussian_basis(coords: np.ndarray, spacing: float, extent: float) -> np.ndarray:
    """Gaussian bumps of width ``spacing`` centred every ``spacing`` over ``[-spacing, extent + spacing]``.

    Returns float64 of shape ``(len(coords), n_centres)``.
    """
    centres = np.arange(-spacing, extent + 2 * spacing, spacing)
    return np.exp(-0.5 * ((np.asarray(coords, np.float64)[:, None] - centres[None, :]) / spacing) ** 2)


def n_centres(spacing: float, extent: float) -> int:
    """Number of lattice points :func:`gaussian_basis` places over ``extent``."""
    return len(np.arange(-spacing, extent + 2 * spacing, spacing))


def matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` for small float64 matrices, summed in a fixed order with elementwise operations.

    BLAS rounds differently with the CPU kernel and the thread count; phantoms must not.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    out = a[..., :, 0, None] * b[..., 0, :]
    for j in range(1, a.shape[-1]):
        out = out + a[..., :, j, None] * b[..., j, :]
    return out


def inverse3(m: np.ndarray) -> np.ndarray:
    """Inverse of a 3×3 float64 matrix from its cofactors (no LAPACK: see :func:`matmul`)."""
    m = np.asarray(m, np.float64)
    cofactors = np.empty((3, 3))
    for i in range(3):
        for j in range(3):
            r0, r1 = [r for r in range(3) if r != i]
            c0, c1 = [c for c in range(3) if c != j]
            cofactors[i, j] = (-1) ** (i + j) * (m[r0, c0] * m[r1, c1] - m[r0, c1] * m[r1, c0])
    determinant = m[0, 0] * cofactors[0, 0] + m[0, 1] * cofactors[0, 1] + m[0, 2] * cofactors[0, 2]
    if determinant == 0:
        raise ValueError("matrix is singular")
    return cofactors.T / determinant


def smooth_field(
    coefficients: np.ndarray, axes: list[np.ndarray], spacing: float, extents: list[float]
) -> np.ndarray:
    """Evaluate a smooth random field on the grid spanned by ``axes``, in float64.

    The field is a sum of separable Gaussian bumps with ``coefficients`` (shape ``(..., n0, n1[, n2])``
    of independent N(0, 1) draws) on a fixed lattice over ``extents``, so it is defined in absolute
    coordinates. Contracting one axis at a time makes this far cheaper than smoothing white noise at
    full resolution. The result has about unit variance.

    Every grid point's value is the same sum of products in the same order whatever the grid, the
    thread count or the CPU: each contraction adds the lattice terms one after the other with
    elementwise operations. A BLAS product would block the sums by the matrix sizes, the threads
    and the CPU's kernel, and its float rounding then moved a phantom voxel across an integer.
    """
    # sum of squared unit Gaussians on a lattice of the same spacing is sqrt(pi) per dimension
    out = np.asarray(coefficients, np.float64) / math.pi ** (len(axes) / 4)
    for axis_coords, extent in zip(axes, extents, strict=True):
        basis = gaussian_basis(axis_coords, spacing, extent)
        # contract the first lattice axis; the evaluated axis is appended last, so after all axes the
        # order is restored
        lattice = np.moveaxis(out, out.ndim - len(axes), -1)
        out = lattice[..., 0, None] * basis[:, 0]
        for j in range(1, basis.shape[1]):
            out += lattice[..., j, None] * basis[:, j]
    return out
