"""CuPy backend: cuBLAS SGEMM for the scores, own CUDA kernels for standardization and top-k.

Two kernels (compiled once per process by NVRTC):

``standardize_<type>``
    One thread block per image: mean, min and max in one pass and the centred sum of squares in a
    second, both accumulated in float64; a third pass writes ``(x - mean) / norm`` as float32.
    The raw images travel to the GPU in their own dtype (uint8: a quarter of float32's traffic)
    and are converted on the device. Flags mark constant and non-finite images.

``merge_topk``
    One thread block per synthetic image: each thread scans a strided part of the score row,
    keeping a sorted top-k of its own (skipping invalid columns), plus the row's running top-k;
    then k rounds of a block-wide arg-max (value descending, index ascending) produce the merged
    top-k in place. Here k is the number of candidate slots the search asks for. Used for
    k <= ``MAX_K``; larger k falls back to a CuPy sort. :func:`merge_topk_model` is the same
    algorithm in NumPy, thread by thread, so that the CPU tests check the algorithm and a GPU run
    checks the port.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from memstudy.correlate.core import K_PIECE, MAX_GPU_CHUNK_MB, Prepared, float32_score_bound

#: Relative rounding of each factor when CuPy runs float32 GEMMs in TF32 (``CUPY_TF32=1``).
TF32_ROUNDING = 2.0**-11

MAX_K = 64
_STANDARDIZE_THREADS = 256
_MERGE_THREADS = 128

_CUDA_TYPES = {
    "uint8": "unsigned char",
    "int8": "signed char",
    "uint16": "unsigned short",
    "int16": "short",
    "int32": "int",
    "float32": "float",
    "float64": "double",
}

_COMMON = r"""
#define POS_INF_F __int_as_float(0x7f800000)
#define POS_INF_D __longlong_as_double(0x7ff0000000000000LL)
"""

_STANDARDIZE_SOURCE = r"""
template <typename T>
__device__ void standardize_row(const T* __restrict__ raw, float* __restrict__ out,
                                float* __restrict__ scale, unsigned char* __restrict__ flags,
                                const long long d)
{
    __shared__ double s_sum[THREADS];
    __shared__ double s_min[THREADS];
    __shared__ double s_max[THREADS];
    const long long row = blockIdx.x;
    const int tid = threadIdx.x;
    const T* x = raw + row * d;
    float* y = out + row * d;

    double sum = 0.0, lo = POS_INF_D, hi = -POS_INF_D;
    for (long long j = tid; j < d; j += THREADS) {
        const double v = (double)x[j];
        sum += v;
        lo = fmin(lo, v);
        hi = fmax(hi, v);
    }
    s_sum[tid] = sum; s_min[tid] = lo; s_max[tid] = hi;
    __syncthreads();
    for (int stride = THREADS / 2; stride > 0; stride >>= 1) {
        if (tid < stride) {
            s_sum[tid] += s_sum[tid + stride];
            s_min[tid] = fmin(s_min[tid], s_min[tid + stride]);
            s_max[tid] = fmax(s_max[tid], s_max[tid + stride]);
        }
        __syncthreads();
    }
    const double mean = s_sum[0] / (double)d;
    const bool nonfinite = !(mean - mean == 0.0);  // NaN or Inf anywhere in the row
    const bool constant = s_min[0] == s_max[0];
    __syncthreads();

    double sq = 0.0;
    if (!nonfinite) {
        for (long long j = tid; j < d; j += THREADS) {
            const double c = (double)x[j] - mean;
            sq += c * c;
        }
    }
    s_sum[tid] = sq;
    __syncthreads();
    for (int stride = THREADS / 2; stride > 0; stride >>= 1) {
        if (tid < stride) s_sum[tid] += s_sum[tid + stride];
        __syncthreads();
    }
    const double norm = sqrt(s_sum[0]);
    const bool dead = constant || nonfinite || !(norm > 0.0);
    for (long long j = tid; j < d; j += THREADS) {
        y[j] = dead ? 0.0f : (float)(((double)x[j] - mean) / norm);
    }
    if (tid == 0) {
        scale[row] = dead ? 0.0f : 1.0f;
        const bool flat = constant || (!nonfinite && !(norm > 0.0));
        flags[row] = (unsigned char)((flat ? 1 : 0) | (nonfinite ? 2 : 0));
    }
}
"""

_STANDARDIZE_ENTRY = r"""
extern "C" __global__ void standardize_NAME(const TYPE* raw, float* out, float* scale,
                                            unsigned char* flags, const long long d)
{
    standardize_row<TYPE>(raw, out, scale, flags, d);
}
"""

_MERGE_SOURCE = r"""
__device__ __forceinline__ bool better(float v1, long long i1, float v2, long long i2)
{
    // Descending value, then ascending index; a real index beats an empty slot (-1).
    return v1 > v2 || (v1 == v2 && i1 >= 0 && (i2 < 0 || i1 < i2));
}

__device__ __forceinline__ void insert(float* lv, long long* li, int k, float v, long long i)
{
    if (i < 0 || !better(v, i, lv[k - 1], li[k - 1])) return;
    int p = k - 1;
    while (p > 0 && better(v, i, lv[p - 1], li[p - 1])) {
        lv[p] = lv[p - 1];
        li[p] = li[p - 1];
        --p;
    }
    lv[p] = v;
    li[p] = i;
}

extern "C" __global__ void merge_topk(const float* __restrict__ scores, const float* __restrict__ scale,
                                      float* best_v, long long* best_i,
                                      const long long width, const int k, const long long offset)
{
    __shared__ float s_v[THREADS];
    __shared__ long long s_i[THREADS];
    __shared__ int s_t[THREADS];
    const long long row = blockIdx.x;
    const int tid = threadIdx.x;
    float lv[MAX_K];
    long long li[MAX_K];
    for (int e = 0; e < k; ++e) { lv[e] = -POS_INF_F; li[e] = -1; }
    for (int e = tid; e < k; e += THREADS) insert(lv, li, k, best_v[row * k + e], best_i[row * k + e]);
    const float* s = scores + row * width;
    for (long long j = tid; j < width; j += THREADS) {
        const float c = scale[j];
        if (c != 0.0f) insert(lv, li, k, s[j] * c, offset + j);
    }
    __syncthreads();  // every thread has read the running top-k before it is overwritten

    int head = 0;
    for (int r = 0; r < k; ++r) {
        s_v[tid] = head < k ? lv[head] : -POS_INF_F;
        s_i[tid] = head < k ? li[head] : -1;
        s_t[tid] = tid;
        __syncthreads();
        for (int stride = THREADS / 2; stride > 0; stride >>= 1) {
            if (tid < stride && better(s_v[tid + stride], s_i[tid + stride], s_v[tid], s_i[tid])) {
                s_v[tid] = s_v[tid + stride];
                s_i[tid] = s_i[tid + stride];
                s_t[tid] = s_t[tid + stride];
            }
            __syncthreads();
        }
        if (tid == 0) {
            best_v[row * k + r] = s_v[0];
            best_i[row * k + r] = s_v[0] == -POS_INF_F ? -1 : s_i[0];
        }
        if (tid == s_t[0]) ++head;
        __syncthreads();
    }
}
"""


def _better(v1: float, i1: int, v2: float, i2: int) -> bool:
    """The kernel's order: descending value, then ascending index; a real index beats -1."""
    return v1 > v2 or (v1 == v2 and i1 >= 0 and (i2 < 0 or i1 < i2))


def _insert(lv: list, li: list, k: int, v: float, i: int) -> None:
    if i < 0 or not _better(v, i, lv[k - 1], li[k - 1]):
        return
    p = k - 1
    while p > 0 and _better(v, i, lv[p - 1], li[p - 1]):
        lv[p], li[p] = lv[p - 1], li[p - 1]
        p -= 1
    lv[p], li[p] = v, i


def merge_topk_model(
    scores: np.ndarray,
    scale: np.ndarray,
    best_v: np.ndarray,
    best_i: np.ndarray,
    offset: int,
    threads: int = _MERGE_THREADS,
) -> None:
    """The ``merge_topk`` kernel in NumPy, thread by thread (slow; for tests of the algorithm).

    ``scores`` (n, width) float32, ``scale`` (width,) float32 (0 marks dead columns), running
    ``best_v`` float32 / ``best_i`` int64 (n, k) updated in place, exactly as the kernel does.
    """
    n, width = scores.shape
    k = best_v.shape[1]
    for row in range(n):
        local = []
        for tid in range(threads):
            lv, li = [-np.inf] * k, [-1] * k
            for e in range(tid, k, threads):
                _insert(lv, li, k, best_v[row, e], int(best_i[row, e]))
            for j in range(tid, width, threads):
                if scale[j] != 0:
                    _insert(lv, li, k, np.float32(scores[row, j]) * np.float32(scale[j]), offset + j)
            local.append((lv, li))
        heads = [0] * threads
        for r in range(k):
            # Block-wide arg-max: a tree reduction over threads, as in shared memory.
            s_v = [local[t][0][heads[t]] if heads[t] < k else -np.inf for t in range(threads)]
            s_i = [local[t][1][heads[t]] if heads[t] < k else -1 for t in range(threads)]
            s_t = list(range(threads))
            stride = threads // 2
            while stride > 0:
                for t in range(stride):
                    if _better(s_v[t + stride], s_i[t + stride], s_v[t], s_i[t]):
                        s_v[t], s_i[t], s_t[t] = s_v[t + stride], s_i[t + stride], s_t[t + stride]
                stride //= 2
            best_v[row, r] = s_v[0]
            best_i[row, r] = -1 if s_v[0] == -np.inf else s_i[0]
            heads[s_t[0]] += 1


def _kernels() -> tuple[dict[str, Any], Any]:
    """Compile (once per process) the standardization kernels per input type and the merge kernel."""
    global _COMPILED
    if _COMPILED is None:
        import cupy

        source = (
            _COMMON
            + _STANDARDIZE_SOURCE.replace("THREADS", str(_STANDARDIZE_THREADS))
            + "".join(
                _STANDARDIZE_ENTRY.replace("NAME", name).replace("TYPE", ctype)
                for name, ctype in _CUDA_TYPES.items()
            )
        )
        module = cupy.RawModule(code=source, options=("--std=c++14",))
        standardize = {name: module.get_function(f"standardize_{name}") for name in _CUDA_TYPES}
        merge_source = _COMMON + _MERGE_SOURCE.replace("THREADS", str(_MERGE_THREADS)).replace(
            "MAX_K", str(MAX_K)
        )
        merge = cupy.RawKernel(merge_source, "merge_topk")
        _COMPILED = (standardize, merge)
    return _COMPILED


_COMPILED: tuple[dict[str, Any], Any] | None = None


@dataclass
class CupyTopK:
    """Running top-k of a block of synthetic rows, as device arrays (sorted after each merge)."""

    values: Any
    indices: Any


class CupyBackend:
    """Search on a CUDA GPU with CuPy: cuBLAS GEMM plus the kernels above."""

    name = "cupy"
    prepared_itemsize = 4
    score_bytes = 8
    exact = False

    def __init__(self) -> None:
        import cupy

        self._cupy = cupy
        self._standardize, self._merge = _kernels()
        self._buffers: dict[str, Any] = {}

    def default_chunk_mb(self) -> float:
        """Half of the free device memory, at most ``MAX_GPU_CHUNK_MB``."""
        free, _ = self._cupy.cuda.runtime.memGetInfo()
        return min(free / 2**20 / 2, MAX_GPU_CHUNK_MB)

    def score_bound(self, d: int) -> float:
        # Rows are standardized in float64 and rounded once, so no centring term is added.
        tf32 = os.environ.get("CUPY_TF32", "0") == "1"
        return float32_score_bound(d, input_rounding=TF32_ROUNDING if tf32 else 0.0)

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: Any) -> Any:
        size = int(np.prod(shape))
        buffer = self._buffers.get(name)
        if buffer is None or buffer.size < size or buffer.dtype != dtype:
            buffer = self._buffers[name] = self._cupy.empty(size, dtype=dtype)
        return buffer[:size].reshape(shape)

    def _standardized(self, raw: np.ndarray, name: str) -> Prepared:
        cupy = self._cupy
        n, d = raw.shape
        kind = raw.dtype.name if raw.dtype.name in _CUDA_TYPES else "float64"
        device_raw = cupy.asarray(np.ascontiguousarray(raw, dtype=kind))
        out = self._buffer(name, (n, d), cupy.float32) if name else cupy.empty((n, d), dtype=cupy.float32)
        scale = cupy.empty(n, dtype=cupy.float32)
        flags = cupy.empty(n, dtype=cupy.uint8)
        self._standardize[kind]((n,), (_STANDARDIZE_THREADS,), (device_raw, out, scale, flags, np.int64(d)))
        host_flags = flags.get()
        return Prepared(out, scale, (host_flags & 1).astype(bool), (host_flags & 2).astype(bool))

    def prepare_synthetic(self, raw: np.ndarray) -> Prepared:
        return self._standardized(raw, "")

    def prepare_training(self, raw: np.ndarray) -> Prepared:
        return self._standardized(raw, "training")

    def new_state(self, n_rows: int, slots: int) -> CupyTopK:
        cupy = self._cupy
        return CupyTopK(
            cupy.full((n_rows, slots), -cupy.inf, dtype=cupy.float32),
            cupy.full((n_rows, slots), -1, dtype=cupy.int64),
        )

    def update(
        self,
        state: CupyTopK,
        synthetic: Prepared,
        training: Prepared,
        offset: int,
        excluded: tuple[np.ndarray, np.ndarray] | None,
    ) -> None:
        cupy = self._cupy
        n, width = synthetic.data.shape[0], training.data.shape[0]
        # Products summed over K_PIECE pixels at a time, for the same accuracy as on the CPU.
        scores = self._buffer("scores", (n, width), cupy.float32)
        for start in range(0, synthetic.data.shape[1], K_PIECE):
            part = cupy.matmul(
                synthetic.data[:, start : start + K_PIECE], training.data[:, start : start + K_PIECE].T
            )
            if start == 0:
                scores[...] = part
            else:
                scores += part
        if excluded is not None:
            rows, cols = (cupy.asarray(a) for a in excluded)
            scores[rows, cols] = -cupy.inf
        k = state.values.shape[1]
        if k <= MAX_K:
            self._merge(
                (n,),
                (_MERGE_THREADS,),
                (
                    scores,
                    training.inv_norm,
                    state.values,
                    state.indices,
                    np.int64(width),
                    np.int32(k),
                    np.int64(offset),
                ),
            )
            return
        scores *= training.inv_norm
        scores[:, training.inv_norm == 0] = -cupy.inf
        candidates = cupy.concatenate([state.values, scores], axis=1)
        where = cupy.argsort(-candidates, axis=1)[:, :k]
        all_indices = cupy.concatenate(
            [state.indices, cupy.broadcast_to(cupy.arange(width, dtype=cupy.int64) + offset, (n, width))],
            axis=1,
        )
        state.values = cupy.take_along_axis(candidates, where, axis=1)
        state.indices = cupy.take_along_axis(all_indices, where, axis=1)

    def result(self, state: CupyTopK) -> tuple[np.ndarray, np.ndarray]:
        return state.values.get().astype(np.float64), state.indices.get()

    def close(self) -> None:
        """Nothing to give back: CuPy's memory pool keeps device buffers for reuse."""
