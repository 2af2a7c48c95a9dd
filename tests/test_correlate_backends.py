"""Every backend against a float64 Pearson computed here: same indices, values to float32 rounding.

The reference orders each row by r rounded to float32 (descending), ties by training index, which is
the documented order. Values must equal the float64 r to float32 rounding: rounding to nearest is
off by at most half an ulp, ≤ 2⁻²⁴·|r|; the float64 reference itself (centring, a dot product of D
terms, norms) is off by at most ~4·D·2⁻⁵³ (Higham's γ_D for the sums). Hence
|value − r| ≤ 2⁻²⁴·|r| + 4·D·2⁻⁵³, far below 1e-7 at every size used here.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import float64_pearson

from memstudy.correlate import Exclude, merge_matches, topk_pearson
from memstudy.correlate import backends as backends_module
from memstudy.correlate.backend_cupy import merge_topk_model
from memstudy.correlate.backend_int8 import MAX_PIXELS, int8_matmul_available, probe_operands
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
needs_int8 = pytest.mark.skipif(not int8_matmul_available(), reason="torch._int_mm is not exact on this CPU")
needs_torch_cuda = pytest.mark.skipif(
    importlib.util.find_spec("torch") is None or not _torch_cuda(), reason="needs torch with CUDA"
)
#: Error of the float64 reference for images of up to 2¹⁸ pixels (every test here): 4·D·2⁻⁵³.
REFERENCE_ERROR = 4 * 2**18 * 2.0**-53
CPU_BACKENDS = ["numpy", "torch", pytest.param("int8", marks=needs_int8)]


def reference_topk(r: np.ndarray, k: int, banned: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top k per row by (−float32(r), index), skipping NaN and banned pairs; NaN / -1 where fewer."""
    r = np.where(np.isnan(r) | (False if banned is None else banned), -np.inf, r)
    columns = np.broadcast_to(np.arange(r.shape[1]), r.shape)
    order = np.lexsort((columns, -r.astype(np.float32).astype(np.float64)), axis=1)[:, :k]
    values = np.take_along_axis(r, order, axis=1)
    indices = np.where(np.isfinite(values), order, -1)
    return np.where(np.isfinite(values), values, np.nan), indices


def assert_matches_reference(matches, r: np.ndarray, k: int, banned: np.ndarray | None = None) -> None:
    values, indices = reference_topk(r, k, banned)
    live = ~np.isnan(matches.values).all(axis=1)  # constant synthetic rows: NaN / -1 in both
    np.testing.assert_array_equal(matches.indices[live], indices[live])
    assert matches.values.dtype == np.float32
    tolerance = 2.0**-24 * np.abs(values) + REFERENCE_ERROR
    both = ~np.isnan(values)
    assert np.all(np.abs(matches.values[both].astype(np.float64) - values[both]) <= tolerance[both])
    np.testing.assert_array_equal(np.isnan(matches.values[live]), np.isnan(values[live]))


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


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("chunk_mb", [0.3, 16])
@pytest.mark.parametrize("k", [1, 5])
def test_every_backend_gives_the_float64_reference(backend, chunk_mb, k):
    synthetic, training = case(0)

    matches = topk_pearson(synthetic, training, k, backend=backend, chunk_mb=chunk_mb)

    assert_matches_reference(matches, float64_pearson(synthetic, training), k)
    assert matches.indices[4, 0] == 150 and matches.constant_training.tolist() == [99]
    assert matches.constant_synthetic.tolist() == [11]


def test_backends_agree_bit_for_bit_on_8bit_images():
    # Exact integer sums and the same correctly rounded float64 steps: identical values, not close.
    synthetic, training = case(13)
    backends = ["numpy", "torch"] + (["int8"] if int8_matmul_available() else [])

    found = [topk_pearson(synthetic, training, 5, backend=name, chunk_mb=0.3) for name in backends]

    assert_matches_reference(found[0], float64_pearson(synthetic, training), 5)
    for other in found[1:]:
        np.testing.assert_array_equal(other.indices, found[0].indices)
        np.testing.assert_array_equal(other.values, found[0].values)


@pytest.mark.parametrize(
    "backend, dtype",
    [
        ("numpy", "int8"),
        ("numpy", "bool"),
        ("numpy", "int16"),
        ("torch", "float32"),
        pytest.param("int8", "int8", marks=needs_int8),
        pytest.param("int8", "bool", marks=needs_int8),
    ],
)
def test_other_dtypes_give_the_float64_reference(backend, dtype):
    synthetic, training = case(6)
    if dtype == "bool":
        synthetic, training = synthetic > 100, training > 100
    else:
        synthetic, training = (
            (synthetic.astype(np.int16) - 128).astype(dtype),
            (training.astype(np.int16) - 128).astype(dtype),
        )

    matches = topk_pearson(synthetic, training, 4, backend=backend, chunk_mb=0.3)

    assert_matches_reference(matches, float64_pearson(synthetic, training), 4)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("chunk_mb", [0.05, 16])
def test_identical_training_images_straddling_k_give_the_lowest_indices(backend, chunk_mb):
    rng = np.random.default_rng(1)
    training = rng.integers(0, 256, (40, 16, 16), dtype=np.uint8)
    copies = [3, 9, 17, 22, 30, 38]
    training[copies] = training[17]
    synthetic = np.concatenate([training[[17]], rng.integers(0, 256, (3, 16, 16), dtype=np.uint8)])

    matches = topk_pearson(synthetic, training, 2, backend=backend, chunk_mb=chunk_mb)

    np.testing.assert_array_equal(matches.indices[0], [3, 9])
    assert_matches_reference(matches, float64_pearson(synthetic, training), 2)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("k", [3, 30])
def test_more_copies_than_candidate_slots_are_never_dropped(backend, k):
    rng = np.random.default_rng(2)
    training = rng.integers(0, 256, (300, 12, 12), dtype=np.uint8)
    copies = np.sort(rng.choice(300, 60, replace=False))
    training[copies] = training[copies[-1]]  # 60 copies, far more than 2k + 8 candidate slots
    synthetic = np.concatenate([training[copies[:1]], rng.integers(0, 256, (2, 12, 12), dtype=np.uint8)])

    matches = topk_pearson(synthetic, training, k, backend=backend, chunk_mb=0.05)
    # Searched against itself without self-matches: the repeated search of the rows with too
    # many near-ties must leave out the same pairs.
    itself = topk_pearson(training, training, k, backend=backend, exclude="self", chunk_mb=0.3)

    np.testing.assert_array_equal(matches.indices[0], copies[:k])
    assert_matches_reference(matches, float64_pearson(synthetic, training), k)
    assert_matches_reference(itself, float64_pearson(training, training), k, np.eye(300, dtype=bool))
    np.testing.assert_array_equal(itself.indices[copies[0]], copies[1 : k + 1])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_low_contrast_bright_256_images_match_the_reference(backend):
    rng = np.random.default_rng(7)
    # Low contrast on a bright background (200–210): where float32 sums lose the most digits.
    base = rng.integers(200, 211, (1, 256, 256))
    training = np.clip(base + rng.integers(-1, 2, (12, 256, 256)), 200, 210).astype(np.uint8)
    training[4] = 205
    training[5, :128] = 0  # a half-black image next to bright ones
    training[8] = training[2]
    synthetic = (training[[0, 2, 5, 7]] ^ np.uint8(1)).astype(np.uint8)

    matches = topk_pearson(synthetic, training, 6, backend=backend, chunk_mb=1)

    assert_matches_reference(matches, float64_pearson(synthetic, training), 6)
    np.testing.assert_array_equal(matches.constant_training, [4])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_five_channel_images_match_the_reference(backend):
    rng = np.random.default_rng(3)
    training = rng.integers(0, 256, (30, 5, 20, 20), dtype=np.uint8)
    training[11] = training[25]
    synthetic = np.clip(training[[25, 3]].astype(int) + rng.integers(-20, 21, (2, 5, 20, 20)), 0, 255)
    synthetic = synthetic.astype(np.uint8)

    matches = topk_pearson(synthetic, training, 3, backend=backend, chunk_mb=0.05)

    assert_matches_reference(matches, float64_pearson(synthetic, training), 3)
    np.testing.assert_array_equal(matches.indices[0, :2], [11, 25])


def _exclusions(n: int, groups: np.ndarray, positions: np.ndarray) -> list:
    same = groups[:, None] == groups[None, :]
    near = same & (np.abs(positions[:, None] - positions[None, :]) <= 1)
    return [
        (None, np.zeros((n, n), dtype=bool)),
        ("self", np.eye(n, dtype=bool)),
        (Exclude(same_group=True, groups=groups), same),
        (Exclude(slice_distance=1, groups=groups, positions=positions), near),
    ]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("mode", range(4))
def test_every_exclude_mode_matches_the_reference(backend, mode):
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (60, 10, 10), dtype=np.uint8)
    groups = np.arange(60) // 6
    positions = np.arange(60) % 6
    images[[7, 8, 20]] = images[9]  # copies inside and outside their group
    exclude, banned = _exclusions(60, groups, positions)[mode]

    matches = topk_pearson(images, images, 3, backend=backend, exclude=exclude, chunk_mb=0.04)

    assert_matches_reference(matches, float64_pearson(images, images), 3, banned)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_float_input_with_a_large_offset_matches_the_reference(backend):
    rng = np.random.default_rng(5)
    training = 1000.0 + rng.random((50, 9, 9)) * 1e-3  # contrast far below float32's resolution of 1000
    training[[12, 30]] = training[40]
    synthetic = training[[40, 2]] + rng.random((2, 9, 9)) * 1e-5

    matches = topk_pearson(synthetic, training, 4, backend=backend)

    r = float64_pearson(synthetic, training)
    values, indices = reference_topk(r, 4)
    np.testing.assert_array_equal(matches.indices, indices)
    np.testing.assert_allclose(matches.values, values, atol=1e-7)


@needs_int8
def test_int8_backend_splits_images_larger_than_one_int32_product():
    rng = np.random.default_rng(8)
    training = rng.choice(np.array([0, 255], dtype=np.uint8), size=(12, 2, 65536 + 37))
    synthetic = training[[3, 8]].copy()
    synthetic[0, 0, :100] = 128

    matches = topk_pearson(synthetic, training, 3, backend="int8")

    assert_matches_reference(matches, float64_pearson(synthetic, training), 3)
    assert matches.values[1, 0] == 1.0 and matches.indices[1, 0] == 8


def test_dask_style_merge_of_parts_equals_one_search_with_ties():
    rng = np.random.default_rng(9)
    training = rng.integers(0, 256, (50, 8, 8), dtype=np.uint8)
    training[[5, 21, 33, 47]] = training[21]
    synthetic = training[[21, 0]].copy()
    parts = []
    for a, b in ((0, 22), (22, 50)):
        part = topk_pearson(synthetic, training[a:b], 3)
        parts.append(type(part)(part.values, np.where(part.indices >= 0, part.indices + a, -1)))

    merged = merge_matches(parts)

    assert_matches_reference(merged, float64_pearson(synthetic, training), 3)
    np.testing.assert_array_equal(merged.indices[0], [5, 21, 33])


def test_int8_probe_operands_reach_the_int32_worst_case():
    a, b = probe_operands()
    products = a.astype(np.int64) @ b.astype(np.int64).T
    assert a.shape[1] == 65536 and np.abs(products).max() == 128 * 128 * 65536


@pytest.mark.slow
def test_auto_under_onednn_avx2_gives_the_reference(tmp_path):
    # oneDNN reads ONEDNN_MAX_CPU_ISA when torch first uses it: set it in a fresh process. Without
    # VNNI, _int_mm is inexact on some CPUs; then auto must use the float path. Either way the
    # search must give the reference.
    rng = np.random.default_rng(10)
    training = rng.integers(0, 256, (40, 256, 256), dtype=np.uint8)
    training[17] = np.where(rng.random((256, 256)) < 0.5, 0, 255)  # extreme pixels: int32 worst case
    synthetic = np.concatenate([training[[17, 3]], rng.integers(0, 256, (4, 256, 256), dtype=np.uint8)])
    np.save(tmp_path / "synthetic.npy", synthetic)
    np.save(tmp_path / "training.npy", training)
    script = (
        "import sys, numpy as np\n"
        "from memstudy.correlate import topk_pearson\n"
        "from memstudy.correlate.search import backend_for\n"
        "s, t = sys.argv[1:3]\n"
        "m = topk_pearson(s, t, 3, progress=False)\n"
        "np.savez(sys.argv[3], values=m.values, indices=m.indices, backend=backend_for(s, t))\n"
    )
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    out = tmp_path / "out.npz"
    subprocess.run(
        [sys.executable, "-c", script, tmp_path / "synthetic.npy", tmp_path / "training.npy", out],
        env=env,
        check=True,
    )

    with np.load(out) as found:
        values, indices = reference_topk(float64_pearson(synthetic, training), 3)
        np.testing.assert_array_equal(found["indices"], indices)
        assert np.all(np.abs(found["values"] - values) <= 2.0**-24 * np.abs(values) + REFERENCE_ERROR)
        assert str(found["backend"]) in {"int8", "numpy"}


def test_cupy_merge_algorithm_in_numpy_keeps_the_reference_top_slots():
    rng = np.random.default_rng(11)
    n, width, slots, offset = 3, 300, 7, 1000
    # Few distinct values, so ties are everywhere; dead columns and excluded (-inf) pairs too.
    scores = rng.integers(0, 5, (n, width)).astype(np.float32) / 4
    scale = np.ones(width, dtype=np.float32)
    scale[[3, 77, 140]] = 0
    scores[0, :50] = -np.inf
    best_v = np.full((n, slots), -np.inf, dtype=np.float32)
    best_i = np.full((n, slots), -1, dtype=np.int64)
    best_v[1, :3], best_i[1, :3] = 1.0, [5, 2000, 999]  # a running top from earlier chunks

    start_v, start_i = best_v.copy(), best_i.copy()

    merge_topk_model(scores, scale, best_v, best_i, offset, threads=8)

    for row in range(n):
        running = start_i[row] >= 0
        pool_v = np.r_[start_v[row][running], scores[row][scale != 0]]
        pool_i = np.r_[start_i[row][running], offset + np.flatnonzero(scale != 0)]
        finite = np.isfinite(pool_v)
        order = np.lexsort((pool_i[finite], -pool_v[finite]))[:slots]
        np.testing.assert_array_equal(best_i[row], pool_i[finite][order])
        np.testing.assert_array_equal(best_v[row], pool_v[finite][order])


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


def test_int8_backend_refuses_float_images():
    if not int8_matmul_available():
        pytest.skip("torch._int_mm is not exact on this CPU")
    with pytest.raises(ValueError, match="backend='int8' needs uint8, int8 or bool images"):
        topk_pearson(np.random.default_rng(0).random((3, 16)), np.eye(16), backend="int8")


def test_cupy_unavailable_means_false_not_an_exception():
    assert backends_module.cupy_available() is _cupy_usable()


@pytest.mark.skipif(_cupy_usable(), reason="CuPy is usable here")
def test_asking_for_cupy_without_a_gpu_is_a_clear_error():
    with pytest.raises(ValueError, match=r"backend='cupy' needs CuPy and a CUDA GPU"):
        topk_pearson(np.eye(3), np.eye(3), backend="cupy")


@gpu
@needs_torch_cuda
@pytest.mark.parametrize("k", [1, 4])
def test_torch_cuda_backend_gives_the_reference(k):
    synthetic, training = case(2)
    matches = topk_pearson(synthetic, training, k, backend="torch", device="cuda", chunk_mb=0.3)
    assert_matches_reference(matches, float64_pearson(synthetic, training), k)


@gpu
@needs_cupy
@pytest.mark.parametrize("dtype", ["uint8", "float32", "float64", "int16"])
@pytest.mark.parametrize("k", [1, 3, 70])
def test_cupy_backend_gives_the_reference(dtype, k):
    synthetic, training = case(3, dtype)
    matches = topk_pearson(synthetic, training, k, backend="cupy", chunk_mb=0.3)
    assert_matches_reference(matches, float64_pearson(synthetic, training), k)


@gpu
@needs_cupy
def test_cupy_merge_kernel_equals_its_numpy_model():
    import cupy

    from memstudy.correlate.backend_cupy import _MERGE_THREADS, _kernels

    rng = np.random.default_rng(12)
    scores = (rng.integers(0, 5, (4, 700)) / 4).astype(np.float32)
    scale = np.ones(700, dtype=np.float32)
    scale[::17] = 0
    best_v = np.full((4, 9), -np.inf, dtype=np.float32)
    best_i = np.full((4, 9), -1, dtype=np.int64)
    device_v, device_i = cupy.asarray(best_v), cupy.asarray(best_i)
    _kernels()[1](
        (4,),
        (_MERGE_THREADS,),
        (
            cupy.asarray(scores),
            cupy.asarray(scale),
            device_v,
            device_i,
            np.int64(700),
            np.int32(9),
            np.int64(0),
        ),
    )
    merge_topk_model(scores, scale, best_v, best_i, 0)
    np.testing.assert_array_equal(device_i.get(), best_i)
    np.testing.assert_array_equal(device_v.get(), best_v)


@gpu
@needs_cupy
def test_cupy_backend_with_exclusion_and_big_blocks_gives_the_reference():
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (700, 64, 64), dtype=np.uint8)
    images[350] = images[10]
    groups = np.arange(700) // 7
    matches = topk_pearson(
        images, images, 10, backend="cupy", exclude=Exclude(same_group=True, groups=groups)
    )
    assert_matches_reference(matches, float64_pearson(images, images), 10, groups[:, None] == groups[None, :])
    assert matches.indices[10, 0] == 350


@gpu
@needs_cupy
def test_cupy_backend_reports_nan_input_by_index():
    synthetic, training = case(5, "float32")
    training[123, 1, 2, 3] = np.nan
    with pytest.raises(ValueError, match="training image 123 contains NaN"):
        topk_pearson(synthetic, training, backend="cupy")


def test_sum_of_squares_stays_within_the_norm_error_the_score_bound_allows():
    from memstudy.correlate.backend_numpy import _sum_of_squares
    from memstudy.correlate.core import U32, gamma

    # Rows of awkward lengths (a tail shorter than a piece) and values spanning many binades.
    rng = np.random.default_rng(7)
    for d in (1, 127, 128, 5000, 65536 + 77):
        rows = (rng.standard_normal((3, d)) * 10.0 ** rng.integers(-3, 4, (3, d))).astype(np.float32)
        exact = np.einsum("nd,nd->n", rows.astype(np.float64), rows.astype(np.float64))
        # float32_score_bound allows a relative error of γ_s, s = 128 + ⌈log₂ d⌉ + 1, on Σv²; the
        # float64 reference is off by ≤ γ_D in float64, far below that.
        s = 128 + int(np.ceil(np.log2(max(d, 2)))) + 1
        assert np.all(np.abs(_sum_of_squares(rows) - exact) <= gamma(s, U32) * exact)


def _integer_reference(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """r of row pairs from int64 sums (exact while D·Σxy < 2⁶³), then as rescore's docstring says."""
    x, y = x.astype(np.int64), y.astype(np.int64)
    d = x.shape[1]
    num = d * (x * y).sum(axis=1) - x.sum(axis=1) * y.sum(axis=1)
    sx = d * (x * x).sum(axis=1) - x.sum(axis=1) ** 2
    sy = d * (y * y).sum(axis=1) - y.sum(axis=1) ** 2
    return num.astype(np.float64) / np.sqrt(sx.astype(np.float64) * sy.astype(np.float64))


@pytest.mark.parametrize("dtype", ["uint8", "int8", "bool"])
def test_standardization_keeps_exact_integer_statistics_of_8_bit_rows(dtype):
    from memstudy.correlate.backend_numpy import NumpyBackend

    # Extremes everywhere (every piece sum at its largest), a constant row, and a length that is not
    # a whole number of pieces; rows split over threads.
    rng = np.random.default_rng(11)
    d = 4 * 256 + 37
    info = np.iinfo(dtype) if dtype != "bool" else None
    low, high = (0, 1) if info is None else (info.min, info.max)
    rows = rng.integers(low, high + 1, (40, d)).astype(dtype)
    rows[0], rows[1] = high, low
    rows[1, 5] = high
    backend = NumpyBackend()
    try:
        prepared = backend.prepare_training(rows)
    finally:
        backend.close()
    v = rows.astype(np.int64)
    shift = 128 if dtype == "uint8" else 0
    want_sums = (v - shift).sum(axis=1)
    want_spread = d * (v * v).sum(axis=1) - v.sum(axis=1) ** 2
    np.testing.assert_array_equal(prepared.exact_stats, np.stack([want_sums, want_spread]))
    assert prepared.constant.tolist() == [True] + [False] * 39


@pytest.mark.parametrize(("synthetic_dtype", "training_dtype"), [("uint8", "int8"), ("int8", "uint8")])
def test_exact_rescore_with_known_statistics_and_mixed_8_bit_dtypes(synthetic_dtype, training_dtype):
    from memstudy.correlate import rescore
    from memstudy.correlate.sources import open_pair

    rng = np.random.default_rng(12)
    d = 2 * 512 + 9
    synthetic = rng.integers(-128, 128, (6, d)).astype(np.int16)
    training = rng.integers(-128, 128, (30, d)).astype(np.int16)
    synthetic[0] = 127  # the largest |x'·y| in every piece
    synthetic[0, 0] = -128
    training[0] = -128
    training[0, 0] = 127
    synthetic = (synthetic + (128 if synthetic_dtype == "uint8" else 0)).astype(synthetic_dtype)
    training = (training + (128 if training_dtype == "uint8" else 0)).astype(training_dtype)
    rows = np.repeat(np.arange(6), 10)
    cols = rng.integers(0, 30, rows.size)
    cols[:10] = 0
    _, train = open_pair(synthetic, training, None)
    y = training.astype(np.int64)
    shift = 128 if training_dtype == "uint8" else 0
    stats = np.stack([(y - shift).sum(axis=1), d * (y * y).sum(axis=1) - y.sum(axis=1) ** 2])
    want = _integer_reference(synthetic[rows], training[cols])
    np.testing.assert_array_equal(rescore.exact_pairs(synthetic, rows, train, cols, 64, stats), want)
    np.testing.assert_array_equal(rescore.exact_pairs(synthetic, rows, train, cols, 64), want)


def test_threaded_exact_rescore_equals_integer_sums_computed_here(monkeypatch):
    from memstudy.correlate import rescore
    from memstudy.correlate.sources import open_pair

    # Pairs spread over two threads, rows with more pairs than one group, 8-bit extremes (0 and 255
    # everywhere but one pixel), and a length that is not a whole number of pieces.
    rng = np.random.default_rng(8)
    d = 3 * 1024 + 5
    synthetic = rng.integers(0, 256, (12, d), dtype=np.uint8)
    training = rng.integers(0, 256, (150, d), dtype=np.uint8)
    synthetic[0], training[0] = 255, 0
    synthetic[0, 0], training[0, 0] = 0, 255
    rows = np.repeat(np.arange(12), 100)
    cols = rng.integers(0, 150, rows.size)
    monkeypatch.setattr(rescore, "_threads", lambda: 2)
    _, train = open_pair(synthetic, training, None)
    got = rescore.exact_pairs(synthetic, rows, train, cols, 64)
    # int64 sums are exact here (D·Σxy < 2⁴⁰).
    np.testing.assert_array_equal(got, _integer_reference(synthetic[rows], training[cols]))


def pearsonr_matrix(synthetic: np.ndarray, training: np.ndarray) -> np.ndarray:
    """All-pairs r with scipy.stats.pearsonr in float64 (NaN for a constant image)."""
    import warnings

    from scipy.stats import pearsonr

    a = synthetic.reshape(len(synthetic), -1).astype(np.float64)
    b = training.reshape(len(training), -1).astype(np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant input: r is NaN
        return np.array([[pearsonr(x, y).statistic for y in b] for x in a])


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("dtype", ["uint8", "int16", "float32", "float64"])
def test_images_of_several_pieces_with_ties_straddling_k_give_pearsonr(backend, dtype):
    from memstudy.correlate.core import K_PIECE

    # Two whole GEMM pieces and a short one (no multiple of any piece size), several training chunks
    # and synthetic blocks, six copies of one image (ties at r = 1 straddle k = 4), a constant image,
    # and a second tie at r = 1 made by an affine map.
    rng = np.random.default_rng(21)
    d = 2 * K_PIECE + 301
    training = rng.integers(0, 256, (70, d)).astype(dtype)
    copies = [5, 6, 19, 33, 34, 61]
    training[copies] = training[33]
    training[12] = 77
    training[40, : d // 2] = 0
    training[41] = training[40] // 4 + 100
    synthetic = np.stack([training[33], training[40] // 2 + 3, *rng.integers(0, 256, (4, d)).astype(dtype)])
    if dtype.startswith("float"):
        training, synthetic = training / 7 + 1000, synthetic / 7 + 1000  # an offset float32 must survive

    matches = topk_pearson(synthetic, training, 4, backend=backend, chunk_mb=0.4)

    assert_matches_reference(matches, pearsonr_matrix(synthetic, training), 4)
    np.testing.assert_array_equal(matches.indices[0], [5, 6, 19, 33])
    np.testing.assert_array_equal(matches.indices[1, :2], [40, 41])
    np.testing.assert_array_equal(matches.constant_training, [12])
