"""Every backend gives the NumPy backend's answer; ``auto`` picks the right one."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from scipy.stats import pearsonr

from memstudy.correlate import Exclude, topk_pearson
from memstudy.correlate import backends as backends_module
from memstudy.correlate.backend_int8 import MAX_PIXELS, int8_matmul_available
from memstudy.correlate.backend_numpy import merge_topk
from memstudy.correlate.backends import resolve_backend


def _cupy_usable() -> bool:
    if importlib.util.find_spec("cupy") is None:
        return False
    import cupy

    return bool(cupy.is_available())


def _torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


gpu = pytest.mark.gpu
needs_cupy = pytest.mark.skipif(not _cupy_usable(), reason="needs CuPy and a CUDA GPU (cupy.is_available())")
needs_int8 = pytest.mark.skipif(not int8_matmul_available(), reason="this torch has no CPU int8 matmul")
needs_torch_cuda = pytest.mark.skipif(
    importlib.util.find_spec("torch") is None or not _torch_cuda(), reason="needs torch with CUDA"
)


def case(seed: int, dtype: str = "uint8") -> tuple[np.ndarray, np.ndarray]:
    """Images with a planted copy, duplicates, a constant image of each side and an odd size."""
    rng = np.random.default_rng(seed)
    training = rng.integers(0, 256, (203, 2, 17, 19)).astype(dtype)
    synthetic = rng.integers(0, 256, (29, 2, 17, 19)).astype(dtype)
    synthetic[4] = training[150] // 2 + 3
    training[60] = training[7]
    training[99] = 5
    synthetic[11] = 1
    return synthetic, training


def assert_same_matches(ours, reference, atol: float = 2e-6) -> None:
    np.testing.assert_allclose(ours.values, reference.values, atol=atol, equal_nan=True)
    # Ranks may swap only between values equal to float32 accuracy.
    differ = ours.indices != reference.indices
    assert np.all(np.abs(ours.values[differ] - reference.values[differ]) <= atol)
    np.testing.assert_array_equal(ours.constant_synthetic, reference.constant_synthetic)
    np.testing.assert_array_equal(ours.constant_training, reference.constant_training)


@pytest.mark.parametrize("k", [1, 5])
@pytest.mark.parametrize("chunk_mb", [0.3, 16])
def test_torch_cpu_backend_agrees_with_numpy(k, chunk_mb):
    synthetic, training = case(0)
    reference = topk_pearson(synthetic, training, k, backend="numpy", chunk_mb=chunk_mb)

    ours = topk_pearson(synthetic, training, k, backend="torch", device="cpu", chunk_mb=chunk_mb)

    assert reference.indices[4, 0] == 150 and reference.constant_training.tolist() == [99]
    assert_same_matches(ours, reference)


def test_torch_cpu_backend_agrees_with_numpy_on_float_input_with_exclusion():
    _, training = case(1, "float64")
    groups = np.arange(203) // 10
    exclude = Exclude(slice_distance=1, groups=groups)
    reference = topk_pearson(training, training, 3, backend="numpy", exclude=exclude, chunk_mb=0.3)

    ours = topk_pearson(training, training, 3, backend="torch", device="cpu", exclude=exclude, chunk_mb=0.3)

    assert_same_matches(ours, reference)
    assert reference.indices[7, 0] == 60  # the duplicate, in another group


@needs_int8
@pytest.mark.parametrize("k", [1, 5])
@pytest.mark.parametrize("dtype", ["uint8", "int8", "bool"])
def test_int8_backend_agrees_with_numpy(k, dtype):
    synthetic, training = case(6)
    if dtype == "int8":
        synthetic, training = (
            (synthetic.astype(np.int16) - 128).astype(np.int8),
            (training.astype(np.int16) - 128).astype(np.int8),
        )
    elif dtype == "bool":
        synthetic, training = synthetic > 100, training > 100
    reference = topk_pearson(synthetic, training, k, backend="numpy", chunk_mb=0.3)

    ours = topk_pearson(synthetic, training, k, backend="int8", chunk_mb=0.3)

    assert_same_matches(ours, reference)


@pytest.mark.parametrize(
    "backend, tolerance", [("numpy", 1e-5), ("torch", 1e-5), pytest.param("int8", 6e-8, marks=needs_int8)]
)
def test_low_contrast_bright_images_match_pearsonr(backend, tolerance):
    rng = np.random.default_rng(7)
    # Low contrast on a bright background: the case where float32 sums lose the most digits.
    base = rng.integers(250, 256, (1, 300, 300), dtype=np.uint8)
    training = np.concatenate([base, np.clip(base.astype(int) + rng.integers(-1, 2, (9, 300, 300)), 0, 255)])
    training = training.astype(np.uint8)
    training[4] = 255
    training[5, :150] = 0  # a half-black image next to bright ones
    synthetic = training[[0, 5, 7]] ^ np.uint8(1)
    flat_s = synthetic.reshape(3, -1).astype(np.float64)
    flat_t = training.reshape(10, -1).astype(np.float64)
    r = np.array([[pearsonr(a, b)[0] if np.ptp(b) else -np.inf for b in flat_t] for a in flat_s])

    matches = topk_pearson(synthetic, training, k=9, backend=backend, chunk_mb=1)

    order = np.argsort(-r, axis=1, kind="stable")[:, :9]
    np.testing.assert_array_equal(matches.indices[:, 0], order[:, 0])
    assert np.abs(matches.values - np.take_along_axis(r, order, axis=1)).max() <= tolerance
    if backend == "int8":  # exact: even the order of nearly equal r is pearsonr's
        np.testing.assert_array_equal(matches.indices, order)
    np.testing.assert_array_equal(matches.constant_training, [4])


@needs_int8
def test_int8_backend_splits_images_larger_than_one_int32_product():
    rng = np.random.default_rng(8)
    training = rng.choice(np.array([0, 255], dtype=np.uint8), size=(12, 2, 65536 + 37))
    synthetic = training[[3, 8]].copy()
    synthetic[0, 0, :100] = 128
    reference = topk_pearson(synthetic, training, 3, backend="numpy")

    ours = topk_pearson(synthetic, training, 3, backend="int8")

    assert_same_matches(ours, reference, atol=1e-6)
    assert ours.values[1, 0] == 1.0 and ours.indices[1, 0] == 8


def test_int8_backend_refuses_float_images():
    with pytest.raises(ValueError, match="backend='int8' needs uint8, int8 or bool images"):
        topk_pearson(np.random.default_rng(0).random((3, 16)), np.eye(16), backend="int8")


def test_numpy_merge_keeps_the_earlier_index_on_a_tie():
    values = np.array([[0.5]], dtype=np.float32)
    indices = np.array([[3]])
    merge_topk(values, indices, np.array([[0.2, 0.5, 0.5]], dtype=np.float32), offset=10)
    assert indices[0, 0] == 3
    merge_topk(values, indices, np.array([[0.7, 0.1, 0.7]], dtype=np.float32), offset=20)
    assert indices[0, 0] == 20 and values[0, 0] == np.float32(0.7)


def test_auto_prefers_cupy_then_torch_cuda_then_int8_for_8bit_images_then_numpy(monkeypatch):
    uint8, float32 = (np.dtype(np.uint8),) * 2, (np.dtype(np.uint8), np.dtype(np.float32))
    monkeypatch.setattr(backends_module, "cupy_available", lambda: True)
    assert resolve_backend("auto", uint8, 64) == "cupy"
    monkeypatch.setattr(backends_module, "cupy_available", lambda: False)
    monkeypatch.setattr(backends_module, "cuda_torch_available", lambda: True)
    assert resolve_backend("auto", uint8, 64) == "torch"
    monkeypatch.setattr(backends_module, "cuda_torch_available", lambda: False)
    assert resolve_backend("auto", float32, 64) == "numpy"
    expected = "int8" if int8_matmul_available() else "numpy"
    assert resolve_backend("auto", uint8, 64) == expected
    assert resolve_backend("auto", uint8, MAX_PIXELS + 1) == "numpy"
    with pytest.raises(ValueError, match="backend='jax'"):
        resolve_backend("jax")


def test_cupy_unavailable_means_false_not_an_exception():
    assert backends_module.cupy_available() is _cupy_usable()


@pytest.mark.skipif(_cupy_usable(), reason="CuPy is usable here")
def test_asking_for_cupy_without_a_gpu_is_a_clear_error():
    with pytest.raises(ValueError, match=r"backend='cupy' needs CuPy and a CUDA GPU"):
        topk_pearson(np.eye(3), np.eye(3), backend="cupy")


@gpu
@needs_torch_cuda
@pytest.mark.parametrize("k", [1, 4])
def test_torch_cuda_backend_agrees_with_numpy(k):
    synthetic, training = case(2)
    reference = topk_pearson(synthetic, training, k, backend="numpy", chunk_mb=0.3)
    ours = topk_pearson(synthetic, training, k, backend="torch", device="cuda", chunk_mb=0.3)
    assert_same_matches(ours, reference)


@gpu
@needs_cupy
@pytest.mark.parametrize("dtype", ["uint8", "float32", "float64", "int16"])
@pytest.mark.parametrize("k", [1, 3, 70])
def test_cupy_backend_agrees_with_numpy(dtype, k):
    synthetic, training = case(3, dtype)
    reference = topk_pearson(synthetic, training, k, backend="numpy", chunk_mb=0.3)
    ours = topk_pearson(synthetic, training, k, backend="cupy", chunk_mb=0.3)
    assert_same_matches(ours, reference)


@gpu
@needs_cupy
def test_cupy_backend_agrees_with_numpy_with_exclusion_and_big_blocks():
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (700, 64, 64), dtype=np.uint8)
    images[350] = images[10]
    exclude = Exclude(same_group=True, groups=np.arange(700) // 7)
    reference = topk_pearson(images, images, 10, backend="numpy", exclude=exclude)
    ours = topk_pearson(images, images, 10, backend="cupy", exclude=exclude)
    assert_same_matches(ours, reference)
    assert ours.indices[10, 0] == 350


@gpu
@needs_cupy
def test_cupy_backend_reports_nan_input_by_index():
    synthetic, training = case(5, "float32")
    training[123, 1, 2, 3] = np.nan
    with pytest.raises(ValueError, match="training image 123 contains NaN"):
        topk_pearson(synthetic, training, backend="cupy")
