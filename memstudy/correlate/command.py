"""``memstudy correlate`` and ``memstudy bench correlate``."""

from __future__ import annotations

import argparse
import csv
import json
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from memstudy.atomic import atomic_open
from memstudy.correlate.backends import BACKENDS
from memstudy.correlate.exclude import Exclude
from memstudy.correlate.folders import IMAGE_SUFFIXES, read_folder
from memstudy.correlate.matches import Matches
from memstudy.correlate.search import backend_for, topk_pearson
from memstudy.data import open_imageset
from memstudy.data.imageset import META_FILE

logger = logging.getLogger(__name__)


@dataclass
class Input:
    """A SYNTH or TRAIN argument, resolved: images for the search and one name per image."""

    images: Any
    names: tuple[str, ...]
    skipped: list[tuple[str, str]] = field(default_factory=list)


def load_input(spec: str, *, role: str, on_error: str, scratch_dir: str | None) -> Input:
    """Resolve a folder of PNG/JPEG files, a saved ImageSet folder, a ``.npy`` file or a dataset name."""
    path = Path(spec)
    if path.is_dir():
        if (path / META_FILE).is_file():
            images = open_imageset(path)
            return Input(images, images.names)
        folder = read_folder(path, on_error=on_error, scratch_dir=scratch_dir)
        return Input(folder.images, folder.names, folder.skipped)
    if path.is_file():
        if path.suffix == ".npy":
            array = np.load(path, mmap_mode="r")
            return Input(array, tuple(str(i) for i in range(array.shape[0])))
        if path.suffix.lower() in IMAGE_SUFFIXES:
            raise ValueError(f"{role}: {path} is one image; pass the folder that holds the images")
        raise ValueError(f"{role}: {path} is neither a folder of images nor a .npy file")
    if path.suffix or len(path.parts) > 1:
        raise FileNotFoundError(f"{role}: {path} does not exist")
    images = open_imageset(spec)
    return Input(images, images.names)


def write_csv(
    path: str | Path, matches: Matches, synthetic_names: tuple[str, ...], training_names: tuple[str, ...]
) -> None:
    """Write one row per synthetic image and rank: ``synthetic,training,correlation`` (``,rank`` if k > 1).

    A synthetic image without a match (constant image) has an empty ``training`` and ``nan``.
    """
    with atomic_open(path, "w") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["synthetic", "training", "correlation"] + (["rank"] if matches.k > 1 else []))
        for i, name in enumerate(synthetic_names):
            for rank in range(matches.k):
                j = int(matches.indices[i, rank])
                value = float(matches.values[i, rank])
                row = [name, training_names[j] if j >= 0 else "", "nan" if j < 0 else f"{value:.6f}"]
                writer.writerow(row + ([rank + 1] if matches.k > 1 else []))


def _exclude(args: argparse.Namespace) -> Exclude | None:
    if args.exclude is None and args.slice_distance is None:
        return None
    return Exclude(same_group=args.exclude == "group", slice_distance=args.slice_distance)


def _channel(value: str | None) -> int | str | None:
    if value is None:
        return None
    return int(value) if value.lstrip("-").isdigit() else value


def run_correlate(args: argparse.Namespace) -> int:
    """Handler of ``memstudy correlate``."""
    with tempfile.TemporaryDirectory(prefix="memstudy-correlate-") as scratch:
        synthetic = load_input(args.synthetic, role="SYNTH", on_error=args.on_error, scratch_dir=scratch)
        training = load_input(args.training, role="TRAIN", on_error=args.on_error, scratch_dir=scratch)
        start = time.perf_counter()
        matches = topk_pearson(
            synthetic.images,
            training.images,
            args.top_k,
            backend=args.backend,
            chunk_mb=args.chunk_mb,
            exclude=_exclude(args),
            channel=_channel(args.channel),
            progress=False if args.no_progress else None,
        )
        seconds = time.perf_counter() - start
        backend = backend_for(synthetic.images, training.images, args.backend, _channel(args.channel))
    write_csv(args.out, matches, synthetic.names, training.names)
    if args.npz:
        matches.save(args.npz)
    for role, skipped in (("SYNTH", synthetic.skipped), ("TRAIN", training.skipped)):
        for name, reason in skipped:
            print(f"skipped {role} {name}: {reason}")
    print(
        f"correlated {len(synthetic.names)} synthetic with {len(training.names)} training images in "
        f"{seconds:.1f} s ({backend}); wrote {args.out}"
    )
    top = matches.values[:, 0]
    if np.isfinite(top).any():
        best = int(np.nanargmax(top))
        partner = training.names[matches.indices[best, 0]]
        print(
            f"highest r = {top[best]:.4f} ({synthetic.names[best]} ↔ {partner}); "
            f"median top-1 r = {np.nanmedian(top):.4f}"
        )
    return 0


def add_correlate_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``memstudy correlate SYNTH TRAIN``."""
    parser = subparsers.add_parser(
        "correlate",
        help="find the training images most correlated with each synthetic image",
        description="Exact top-k Pearson correlation of every synthetic image with every training image "
        "(flattened, as scipy.stats.pearsonr). SYNTH and TRAIN are each a folder of PNG/JPEG images "
        "(one grayscale image per file, the authors' layout), a saved ImageSet folder, a .npy file "
        "(N, ...) or a prepared dataset name. Writes a CSV with one row per synthetic image: "
        "synthetic,training,correlation (plus a rank column and k rows per image when --top-k > 1).",
    )
    parser.add_argument(
        "synthetic", metavar="SYNTH", help="synthetic images: folder, .npy file or dataset name"
    )
    parser.add_argument(
        "training", metavar="TRAIN", help="training images: folder, .npy file or dataset name"
    )
    parser.add_argument(
        "-k", "--top-k", type=int, default=1, metavar="K", help="matches kept per synthetic image (default 1)"
    )
    parser.add_argument("-o", "--out", default="matches.csv", help="CSV to write (default matches.csv)")
    parser.add_argument("--npz", metavar="PATH", help="also save values and indices as a .npz file")
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="compute backend (default auto: a CUDA GPU if usable, else the exact int8 path for 8-bit "
        "images, else numpy)",
    )
    parser.add_argument(
        "--chunk-mb",
        type=float,
        default=None,
        metavar="M",
        help="working-memory budget in MiB (default 1024 on CPU, half the free memory on a GPU)",
    )
    parser.add_argument(
        "--channel",
        default=None,
        help="correlate one channel (index or name); default: all channels together",
    )
    parser.add_argument(
        "--on-error",
        choices=("raise", "skip"),
        default="raise",
        help="image files that cannot be read or differ in size: stop with an error (default) "
        "or skip and list them",
    )
    parser.add_argument(
        "--exclude",
        choices=("self", "group"),
        default=None,
        help="for a set against itself: leave out each image itself, or its whole group (subject)",
    )
    parser.add_argument(
        "--slice-distance",
        type=int,
        default=None,
        metavar="S",
        help="for a set against itself: also leave out slices of the same subject at most S apart",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run_correlate)
    return parser


def run_bench_correlate(args: argparse.Namespace) -> int:
    """Handler of ``memstudy bench correlate``."""
    from memstudy.correlate.bench import format_report, run_benchmark

    options: dict[str, Any] = {}
    if args.quick:
        options.update(n_synthetic=256, n_training=512, out_of_core_mb=256, repeats=1)
    for name in ("size", "n_synthetic", "n_training", "k"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    results = run_benchmark(**options)
    print(json.dumps(results, sort_keys=True) if args.json else format_report(results))
    return 0


def add_bench_correlate_command(bench_subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``memstudy bench correlate``."""
    parser = bench_subparsers.add_parser(
        "correlate",
        help="throughput of the correlation search vs SGEMM, faiss and a per-pair pearsonr loop",
        description="Measure, in one run on this machine and on the same data: the search's GFLOP/s and its "
        "fraction of the machine's own large-SGEMM rate, the ratio to faiss IndexFlatIP exact search, the "
        "ratio to a per-pair scipy.stats.pearsonr loop like the authors' script, and the peak memory of an "
        "out-of-core search. Adds GPU figures when a GPU is usable. Takes about a minute.",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a report")
    parser.add_argument("--quick", action="store_true", help="smaller problem (a few seconds; noisier)")
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (default 256)")
    parser.add_argument("--n-synthetic", type=int, default=None, help="synthetic images (default 1024)")
    parser.add_argument("--n-training", type=int, default=None, help="training images (default 2048)")
    parser.add_argument("-k", type=int, default=None, help="matches per image (default 10)")
    parser.set_defaults(func=run_bench_correlate)
    return parser
