"""``memstudy bench correlate``: throughput and ratios measured in one run on this machine.

Every ratio compares two measurements taken in the same process on the same data:

- ``sgemm_fraction``: our search's throughput (2·N_syn·N_train·D operations per search,
  standardization included, from uint8 images, with the backend ``auto`` picks on this CPU) over
  the machine's own large float32 GEMM (NumPy, 4096²). The exact int8 backend does integer
  operations, so its fraction can exceed 1; ``sgemm_fraction_float32`` is the float32 (NumPy) path;
- ``topk_identical_between_backends``: every CPU backend returned the same (N_syn, k) indices;
- ``vs_faiss``: our throughput over ``faiss.IndexFlatIP`` exact search (same k) on the same images,
  already standardized for faiss (its time excludes standardization, ours does not);
  ``vs_faiss_end_to_end`` adds the standardization faiss needs (ours, timed) to its time,
  ``vs_faiss_float32`` compares our float32 (NumPy) path, ``vs_faiss_end_to_end_float32`` the
  same with the standardization added to faiss's time;
- ``vs_pearsonr_loop``: our pairs per second over a per-pair loop like the authors' script (read both
  PNG files, flatten, ``scipy.stats.pearsonr``), timed on a small subset; ``vs_pearsonr_compute_only``
  leaves the file reads out of the loop;
- ``out_of_core_peak_rss_mb``: peak resident memory of a separate process that streams a training
  ``.npy`` file several times larger than its ``chunk_mb`` budget;
- ``float32_parts``: where the float32 (NumPy) search's time goes, each part as a fraction of the
  whole search's time in the same rounds: standardization, the piece-summed GEMM with the top-k
  merges, and the exact re-score of the candidates (``rescored_pairs`` of them).

On a GPU (CuPy or torch with CUDA) it adds the cuBLAS SGEMM rate, our fraction of it, the agreement
with the NumPy backend and a 10^5 × 10^5 time extrapolated from a measured slice.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from memstudy.correlate.backend_numpy import NumpyBackend
from memstudy.correlate.backends import cuda_torch_available, cupy_available, get_backend, int8_path_available
from memstudy.correlate.rescore import finalize, slots_for
from memstudy.correlate.search import plan_blocks, topk_pearson
from memstudy.correlate.sources import as_source

logger = logging.getLogger(__name__)


def _best_time(run: Callable[[], Any], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def cpu_model() -> str:
    """The CPU's model name where Linux tells it, else the architecture."""
    info = Path("/proc/cpuinfo")
    if info.is_file():
        for line in info.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


def _sgemm_operands(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Two n×n float32 matrices for the machine's reference SGEMM rate."""
    rng = np.random.default_rng(0)
    return rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)


def pearsonr_loop_seconds_per_pair(synthetic: np.ndarray, training: np.ndarray) -> dict[str, float]:
    """Per-pair time of the authors' loop: read both PNGs, flatten, ``pearsonr`` (and without the reads)."""
    from PIL import Image
    from scipy.stats import pearsonr

    with tempfile.TemporaryDirectory(prefix="memstudy-bench-") as tmp:
        paths = []
        for side, images in (("synthetic", synthetic), ("training", training)):
            folder = Path(tmp, side)
            folder.mkdir()
            paths.append([folder / f"{i:04d}.png" for i in range(len(images))])
            for path, image in zip(paths[-1], images, strict=True):
                Image.fromarray(image).save(path)

        def read(path: Path) -> np.ndarray:
            with Image.open(path) as image:
                return np.asarray(image.convert("L"), dtype=np.float64)

        start = time.perf_counter()
        for s in paths[0]:
            for t in paths[1]:
                pearsonr(read(t).ravel(), read(s).ravel())
        with_reads = (time.perf_counter() - start) / (len(synthetic) * len(training))
    flat_s = [x.astype(np.float64).ravel() for x in synthetic]
    flat_t = [x.astype(np.float64).ravel() for x in training]
    start = time.perf_counter()
    for s in flat_s:
        for t in flat_t:
            pearsonr(t, s)
    compute_only = (time.perf_counter() - start) / (len(synthetic) * len(training))
    return {"with_reads": with_reads, "compute_only": compute_only}


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB.

    Linux's ``ru_maxrss`` survives ``exec``: a child started by a large parent (through vfork)
    reports the parent's peak. ``VmHWM`` in ``/proc/self/status`` belongs to the new process
    image only, so it is used where it exists.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def out_of_core_child(training: str, synthetic: str, chunk_mb: float, k: int) -> dict[str, Any]:
    """Run in a fresh process: stream ``training`` from disk, return timing and peak RSS.

    The backend ``auto`` picks is loaded before the baseline is taken, so that the difference
    is the search's own memory, not torch's import.
    """
    shape = np.load(synthetic, mmap_mode="r").shape
    backend = get_backend("auto", dtypes=(np.dtype(np.uint8),), d=int(np.prod(shape[1:]))).name
    baseline = peak_rss_mb()
    start = time.perf_counter()
    topk_pearson(synthetic, training, k, backend=backend, chunk_mb=chunk_mb, progress=False)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "baseline_rss_mb": baseline, "peak_rss_mb": peak_rss_mb(), "backend": backend}


def measure_out_of_core(
    size: int, file_mb: float, chunk_mb: float, k: int, n_synthetic: int = 128
) -> dict[str, float]:
    """Write a training ``.npy`` of ``file_mb`` MiB and search it in a subprocess with ``chunk_mb``."""
    rng = np.random.default_rng(1)
    n_training = max(2, int(file_mb * 2**20 // (size * size)))
    with tempfile.TemporaryDirectory(prefix="memstudy-bench-") as tmp:
        training = Path(tmp, "training.npy")
        synthetic = Path(tmp, "synthetic.npy")
        images = np.lib.format.open_memmap(
            training, mode="w+", dtype=np.uint8, shape=(n_training, size, size)
        )
        for start in range(0, n_training, 1024):
            stop = min(start + 1024, n_training)
            images[start:stop] = rng.integers(0, 256, (stop - start, size, size), dtype=np.uint8)
        images.flush()
        del images
        np.save(synthetic, rng.integers(0, 256, (n_synthetic, size, size), dtype=np.uint8))
        command = [
            sys.executable,
            "-m",
            "memstudy.correlate.bench",
            "--out-of-core-child",
            str(training),
            str(synthetic),
            str(chunk_mb),
            str(k),
        ]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        result.update(
            file_mb=training.stat().st_size / 2**20,
            chunk_mb=chunk_mb,
            n_training=n_training,
            n_synthetic=n_synthetic,
            gflops=2 * n_synthetic * n_training * size * size / result["seconds"] / 1e9,
        )
    return result


def measure_gpu(size: int, n_synthetic: int, n_training: int, k: int) -> dict[str, Any]:
    """cuBLAS SGEMM rate, our GPU search on a slice, agreement with NumPy, 10^5 × 10^5 extrapolation."""
    backend = "cupy" if cupy_available() else "torch"
    if backend == "cupy":
        import cupy

        device = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"].decode()
        a = cupy.random.standard_normal((8192, 8192), dtype=cupy.float32)
        a @ a

        def gemm() -> None:
            a @ a
            cupy.cuda.Device().synchronize()
    else:
        import torch

        device = torch.cuda.get_device_name()
        a = torch.randn(8192, 8192, device="cuda")
        a @ a

        def gemm() -> None:
            a @ a
            torch.cuda.synchronize()

    gemm_rate = 2 * 8192**3 / _best_time(gemm, 5) / 1e9
    rng = np.random.default_rng(2)
    d = size * size
    synthetic = rng.integers(0, 256, (n_synthetic, size, size), dtype=np.uint8)
    training = rng.integers(0, 256, (n_training, size, size), dtype=np.uint8)
    topk_pearson(synthetic[:64], training[:256], k, backend=backend, progress=False)  # compile, warm up
    seconds = _best_time(lambda: topk_pearson(synthetic, training, k, backend=backend, progress=False), 2)
    rate = 2 * n_synthetic * n_training * d / seconds / 1e9
    ours = topk_pearson(synthetic[:128], training, k, backend=backend, progress=False)
    reference = topk_pearson(synthetic[:128], training, k, backend="numpy", progress=False)
    return {
        "backend": backend,
        "device": device,
        "sgemm_gflops": gemm_rate,
        "search_gflops": rate,
        "sgemm_fraction": rate / gemm_rate,
        "slice": [n_synthetic, n_training],
        "max_abs_diff_vs_numpy": float(np.nanmax(np.abs(ours.values - reference.values))),
        "top1_agreement_vs_numpy": float(np.mean(ours.indices[:, 0] == reference.indices[:, 0])),
        "topk_identical_vs_numpy": bool(np.array_equal(ours.indices, reference.indices)),
        "extrapolated_1e5x1e5_seconds": seconds * 1e10 / (n_synthetic * n_training),
    }


def float32_parts(
    synthetic: np.ndarray, training: np.ndarray, k: int
) -> tuple[dict[str, Callable[[], Any]], dict[str, Any]]:
    """The float32 search's parts, each a function to time, run as :func:`topk_pearson` runs them.

    One synthetic block and the training set in the search's own chunks (``plan_blocks`` with its
    default budget); the re-score gets the candidates and bounds the GEMM part left. Returns the
    parts by name, and what they leave: ``parts["found"]`` is the search's ``(values, indices)``.
    """
    backend = NumpyBackend()
    n, d = len(synthetic), synthetic[0].size
    rows, train_rows = synthetic.reshape(n, d), training.reshape(len(training), d)
    plan = plan_blocks(
        n, len(training), d, slots_for(k), backend.default_chunk_mb(), score_bytes=backend.score_bytes
    )
    if plan.synthetic_rows < n:
        raise ValueError(
            f"float32_parts times one synthetic block; {n} images need {-(-n // plan.synthetic_rows)}"
        )
    starts = range(0, len(training), plan.training_rows)
    # A backend (work buffers) per training chunk: the chunks are kept for the GEMM part, where the
    # search streams them through one buffer; buffers reused from round to round, as in searches.
    chunk_backends = [NumpyBackend() for _ in starts]
    parts: dict[str, Any] = {}

    def standardize() -> None:
        parts["block"] = backend.prepare_synthetic(rows)
        parts["chunks"] = [
            (a, chunk_backend.prepare_training(train_rows[a : a + plan.training_rows]))
            for a, chunk_backend in zip(starts, chunk_backends, strict=True)
        ]

    def gemm_and_merge() -> None:
        state = backend.new_state(n, min(slots_for(k), len(training)))
        for a, chunk in parts["chunks"]:
            backend.update(state, parts["block"], chunk, a, None)
        parts["candidates"] = backend.result(state)

    def exact_rescore() -> None:
        values, indices = parts["candidates"]
        offset2 = max(float(chunk.offset2.max()) for _, chunk in parts["chunks"])
        bounds = backend.score_bound(d) + parts["block"].offset2 + offset2
        stats = np.concatenate([chunk.exact_stats for _, chunk in parts["chunks"]], axis=1)
        parts["found"] = finalize(
            rows, values, indices, k, bounds, training=as_source(training), training_stats=stats
        )

    return {
        "standardize": standardize,
        "gemm_and_merge": gemm_and_merge,
        "exact_rescore": exact_rescore,
    }, parts


def cpu_backends(d: int) -> tuple[str, list[str]]:
    """The CPU backend ``auto`` uses for uint8 images of ``d`` pixels, and every CPU backend to time."""
    names = ["numpy", "torch"]
    if int8_path_available((np.dtype(np.uint8),), d):
        return "int8", ["int8", *names]
    return "numpy", names


def measure_throughput(
    synthetic: np.ndarray, training: np.ndarray, k: int, repeats: int, sgemm_size: int
) -> dict[str, Any]:
    """SGEMM, our CPU backends, faiss and standardization: best of ``repeats`` interleaved rounds."""
    import faiss

    n_synthetic, n_training = len(synthetic), len(training)
    d = synthetic[0].size
    flops = 2.0 * n_synthetic * n_training * d
    auto, backends = cpu_backends(d)

    # Work buffers kept from round to round, as a search reuses them (fresh pages cost page faults).
    standardizers = NumpyBackend(), NumpyBackend()

    def standardize() -> tuple[np.ndarray, np.ndarray]:
        return (
            standardizers[0].prepare_synthetic(synthetic.reshape(n_synthetic, d)).data,
            standardizers[1].prepare_synthetic(training.reshape(n_training, d)).data,
        )

    synthetic_std, training_std = (rows.copy() for rows in standardize())
    index = faiss.IndexFlatIP(d)
    index.add(training_std)
    del training_std
    found = {}

    def search_faiss() -> None:
        found["faiss"] = index.search(synthetic_std, k)[1]

    def search_ours(backend: str) -> None:
        found[backend] = topk_pearson(synthetic, training, k, backend=backend, progress=False).indices

    sgemm = _sgemm_operands(sgemm_size)
    runs: dict[str, Callable[[], Any]] = {"sgemm": lambda: sgemm[0] @ sgemm[1]}
    runs.update({name: lambda name=name: search_ours(name) for name in backends})
    runs.update(faiss=search_faiss, standardize=standardize)
    parts, left = float32_parts(synthetic, training, k)
    runs.update({f"float32 {name}": run for name, run in parts.items()})
    for run in runs.values():  # warm up: thread pools, first-touch pages, imports
        run()
    # Rounds of every measurement, best of each: on a shared machine a slow spell then hits them all.
    seconds = {name: float("inf") for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            seconds[name] = min(seconds[name], _best_time(run, 1))
    sgemm_rate = 2 * sgemm_size**3 / seconds["sgemm"] / 1e9
    rates = {name: flops / seconds[name] / 1e9 for name in [*backends, "faiss"]}
    faiss_end_to_end = flops / (seconds["faiss"] + seconds["standardize"]) / 1e9
    return dict(
        sgemm_gflops=sgemm_rate,
        backend=auto,
        search_gflops=rates[auto],
        backend_gflops={name: rates[name] for name in backends},
        sgemm_fraction=rates[auto] / sgemm_rate,
        sgemm_fraction_float32=rates["numpy"] / sgemm_rate,
        faiss_gflops=rates["faiss"],
        vs_faiss=rates[auto] / rates["faiss"],
        vs_faiss_float32=rates["numpy"] / rates["faiss"],
        vs_faiss_end_to_end=rates[auto] / faiss_end_to_end,
        vs_faiss_end_to_end_float32=rates["numpy"] / faiss_end_to_end,
        faiss_top1_agreement=float(np.mean(found["faiss"][:, 0] == found[auto][:, 0])),
        top1_agreement_between_backends=float(
            np.mean([np.mean(found[name][:, 0] == found["numpy"][:, 0]) for name in backends])
        ),
        topk_identical_between_backends=all(np.array_equal(found[name], found["numpy"]) for name in backends),
        float32_parts={name: seconds[f"float32 {name}"] / seconds["numpy"] for name in parts},
        float32_parts_give_the_search=bool(np.array_equal(left["found"][1], found["numpy"])),
    )


def run_benchmark(
    *,
    size: int = 256,
    n_synthetic: int = 1024,
    n_training: int = 2048,
    k: int = 10,
    repeats: int = 3,
    loop_images: int = 8,
    out_of_core_mb: float = 1024,
    out_of_core_chunk_mb: float = 128,
    sgemm_size: int = 4096,
    gpu: bool | None = None,
) -> dict[str, Any]:
    """Measure the search on this machine; see the module docstring for what each number means."""
    rng = np.random.default_rng(0)
    d = size * size
    synthetic = rng.integers(0, 256, (n_synthetic, size, size), dtype=np.uint8)
    training = rng.integers(0, 256, (n_training, size, size), dtype=np.uint8)
    results: dict[str, Any] = {
        "machine": f"{cpu_model()}, {os.cpu_count()} CPUs ({platform.node()})",
        "date": time.strftime("%Y-%m-%d"),
        "images": f"{n_synthetic} synthetic × {n_training} training, {size}×{size}, k={k}",
    }
    results.update(measure_throughput(synthetic, training, k, repeats, sgemm_size))
    logger.info("per-pair pearsonr loop on %d × %d images", loop_images, loop_images)
    loop = pearsonr_loop_seconds_per_pair(synthetic[:loop_images], training[:loop_images])
    pairs_per_second = results["search_gflops"] * 1e9 / (2 * d)
    results.update(
        pearsonr_loop_ms_per_pair=loop["with_reads"] * 1e3,
        pearsonr_compute_ms_per_pair=loop["compute_only"] * 1e3,
        search_pairs_per_second=pairs_per_second,
        vs_pearsonr_loop=pairs_per_second * loop["with_reads"],
        vs_pearsonr_compute_only=pairs_per_second * loop["compute_only"],
    )
    logger.info(
        "out-of-core search of a %.0f MiB file with chunk_mb=%s", out_of_core_mb, out_of_core_chunk_mb
    )
    ooc = measure_out_of_core(size, out_of_core_mb, out_of_core_chunk_mb, k)
    results.update(out_of_core_peak_rss_mb=ooc["peak_rss_mb"], out_of_core=ooc)
    if gpu is None:
        gpu = cupy_available() or cuda_torch_available()
    if gpu:
        logger.info("GPU")
        results["gpu"] = measure_gpu(size, 8192, 16384, k)
    return results


def format_report(results: dict[str, Any]) -> str:
    """The benchmark as a few readable lines."""
    ooc = results["out_of_core"]
    lines = [
        f"{results['images']} on {results['machine']}, {results['date']}",
        f"SGEMM (NumPy, large square): {results['sgemm_gflops']:.0f} GFLOP/s",
        "search: "
        + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in results["backend_gflops"].items())
        + f" → {results['sgemm_fraction']:.0%} of SGEMM ({results['backend']}), "
        f"float32 path {results['sgemm_fraction_float32']:.0%}",
        "float32 path's time: "
        + ", ".join(
            f"{name.replace('_', ' ')} {share:.0%}" for name, share in results["float32_parts"].items()
        )
        + f" (the parts give the search's top-k: {results['float32_parts_give_the_search']})",
        f"faiss IndexFlatIP: {results['faiss_gflops']:.0f} GFLOP/s → ours is {results['vs_faiss']:.2f}×, "
        f"{results['vs_faiss_end_to_end']:.2f}× with faiss's standardization, float32 path "
        f"{results['vs_faiss_float32']:.2f}× ({results['vs_faiss_end_to_end_float32']:.2f}× end to end) "
        f"(top-1 agreement {results['faiss_top1_agreement']:.1%}); our backends give identical top-k: "
        f"{results['topk_identical_between_backends']}",
        f"per-pair pearsonr loop: {results['pearsonr_loop_ms_per_pair']:.2f} ms/pair with PNG reads, "
        f"{results['pearsonr_compute_ms_per_pair']:.2f} ms without → ours is "
        f"{results['vs_pearsonr_loop']:.0f}× "
        f"({results['vs_pearsonr_compute_only']:.0f}× compute only)",
        f"out-of-core: {ooc['file_mb']:.0f} MiB training file, chunk_mb={ooc['chunk_mb']:g}: peak RSS "
        f"{ooc['peak_rss_mb']:.0f} MiB (after imports {ooc['baseline_rss_mb']:.0f} MiB), "
        f"{ooc['seconds']:.1f} s ({ooc['gflops']:.0f} GFLOP/s, {ooc['backend']})",
    ]
    if "gpu" in results:
        g = results["gpu"]
        lines.append(
            f"GPU {g['device']} ({g['backend']}): {g['search_gflops']:.0f} GFLOP/s = "
            f"{g['sgemm_fraction']:.0%} of "
            f"cuBLAS SGEMM; 10^5 × 10^5 ≈ {g['extrapolated_1e5x1e5_seconds'] / 60:.1f} min; "
            f"max |Δr| vs NumPy {g['max_abs_diff_vs_numpy']:.1e}"
        )
    return "\n".join(lines)


if __name__ == "__main__" and sys.argv[1:2] == ["--out-of-core-child"]:
    _training, _synthetic, _chunk_mb, _k = sys.argv[2:6]
    sys.stdout.write(json.dumps(out_of_core_child(_training, _synthetic, float(_chunk_mb), int(_k))) + "\n")
