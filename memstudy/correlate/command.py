"""``memstudy correlate`` and ``memstudy bench correlate``."""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from memstudy.atomic import atomic_open, make_temp_dir
from memstudy.correlate.backends import BACKENDS
from memstudy.correlate.exclude import Exclude
from memstudy.correlate.folders import read_folder
from memstudy.correlate.matches import Matches
from memstudy.correlate.search import backend_for, topk_pearson
from memstudy.data.command import add_data_options, open_data, parse_data_options
from memstudy.data.datasets import DATASETS
from memstudy.data.image_files import IMAGE_SUFFIXES
from memstudy.data.imageset import META_FILE

logger = logging.getLogger(__name__)

#: Image folders up to this many MiB of pixels are read into memory unless --chunk-mb says less.
FOLDER_MEMORY_MB = 1024


@dataclass
class Input:
    """A SYNTH or TRAIN argument, resolved: images for the search and one name per image.

    ``groups`` and ``channels`` are known for ImageSets only (``images`` is then the ImageSet).
    """

    images: Any
    names: tuple[str, ...]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    groups: np.ndarray | None = None
    channels: tuple[str, ...] | None = None


def load_input(
    spec: str,
    args: argparse.Namespace,
    *,
    role: str,
    scratch_dir: Path,
) -> Input:
    """Resolve a folder of PNG/JPEG files, a saved ImageSet folder, a ``.npy`` file or a dataset name.

    ``args`` gives ``on_error``, ``chunk_mb``, ``no_progress`` and the data options of dataset names.
    """
    path = Path(spec)
    if path.is_dir() and not (path / META_FILE).is_file():
        budget = FOLDER_MEMORY_MB if args.chunk_mb is None else args.chunk_mb
        folder = read_folder(path, on_error=args.on_error, scratch_dir=scratch_dir, max_memory_mb=budget)
        return Input(folder.images, folder.names, folder.skipped)
    if path.is_file():
        if path.suffix == ".npy":
            try:
                array = np.load(path, mmap_mode="r")
            except (ValueError, OSError) as error:
                raise ValueError(f"{role}: {path} is not a readable .npy file ({error})") from error
            if array.dtype.kind not in "biuf" or array.ndim < 2:
                raise ValueError(
                    f"{role}: {path} holds {array.dtype} values of shape {array.shape}; expected "
                    "numeric images, one per entry of the first axis (N, ...)"
                )
            return Input(array, tuple(str(i) for i in range(array.shape[0])))
        if path.suffix.lower() in IMAGE_SUFFIXES:
            raise ValueError(f"{role}: {path} is one image; pass the folder that holds the images")
        raise ValueError(f"{role}: {path} is neither a folder of images nor a .npy file")
    # --root/--data-option belong to the dataset-name argument (checked by _check_data_options_apply).
    imageset = open_data(spec, args, what=role, progress=not args.no_progress, options_for_names_only=True)
    return Input(imageset, imageset.names, groups=imageset.groups, channels=imageset.channels)


def read_groups(path: str | Path) -> dict[str, tuple[str, int | None]]:
    """Read a ``--groups`` file: CSV rows ``name,group`` or ``name,group,position``.

    ``name`` is an image's name as in the output CSV (a file name, or the row number of a ``.npy``
    file); ``group`` is its subject (any text); ``position`` its slice number. A first row
    ``name,group[,position]`` is a header.

    Returns
    -------
    dict
        ``name → (group, position or None)``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--groups {path} does not exist")
    found: dict[str, tuple[str, int | None]] = {}
    widths = set()
    with open(path, newline="") as handle:
        for line, row in enumerate(csv.reader(handle), start=1):
            row = [cell.strip() for cell in row]
            if not any(row) or (line == 1 and row[:2] == ["name", "group"]):
                continue
            if len(row) not in (2, 3) or not all(row):
                expected = "expected name,group or name,group,position"
                raise ValueError(f"{path}, line {line}: {expected}, got {','.join(row)!r}")
            if row[0] in found:
                raise ValueError(f"{path}, line {line}: {row[0]!r} is listed twice")
            if len(row) == 3 and not row[2].lstrip("-").isdigit():
                raise ValueError(f"{path}, line {line}: position {row[2]!r} is not an integer")
            widths.add(len(row))
            found[row[0]] = (row[1], int(row[2]) if len(row) == 3 else None)
    if not found:
        raise ValueError(f"{path}: no rows; expected name,group per line")
    if len(widths) > 1:
        raise ValueError(f"{path}: some rows have a position and some do not; give it on every row or none")
    return found


def _exclude(args: argparse.Namespace, synthetic: Input, training: Input) -> Exclude | None:
    """Pairs that ``--exclude`` and ``--slice-distance`` leave out; groups from ImageSets or ``--groups``."""
    by_group = args.exclude == "group" or args.slice_distance is not None
    if args.groups is not None and not by_group:
        raise ValueError("--groups is used only with --exclude group or --slice-distance")
    if not by_group:
        return None if args.exclude is None else Exclude()
    if args.groups is None:
        if synthetic.groups is None or training.groups is None:
            raise ValueError(
                "--exclude group and --slice-distance need each image's subject: give --groups FILE "
                "(CSV rows name,group), or pass ImageSet folders or dataset names, which carry groups"
            )
        return Exclude(same_group=args.exclude == "group", slice_distance=args.slice_distance)
    table = read_groups(args.groups)
    codes: dict[str, int] = {}
    sides = []
    for role, side in (("SYNTH", synthetic), ("TRAIN", training)):
        missing = [name for name in side.names if name not in table]
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise ValueError(f"--groups {args.groups}: no row for {role} image {missing[0]!r}{more}")
        groups = np.array([codes.setdefault(table[name][0], len(codes)) for name in side.names])
        positions = [table[name][1] for name in side.names]
        sides.append((groups, None if positions[0] is None else np.array(positions)))
    (gs, ps), (gt, pt) = sides
    return Exclude(
        same_group=args.exclude == "group",
        slice_distance=args.slice_distance,
        groups=(gs, gt),
        positions=None if ps is None else (ps, pt),
    )


def _channel(value: str | None, inputs: tuple[Input, Input]) -> int | str | None:
    """``--channel`` as an index, or as a name that an ImageSet input has."""
    if value is None:
        return None
    if value.lstrip("-").isdigit():
        return int(value)
    known = [inp.channels for inp in inputs if inp.channels is not None]
    if not known:
        raise ValueError(
            f"--channel {value}: channel names come from ImageSet folders or dataset names; "
            "for .npy files and image folders give an index (0 for the first channel)"
        )
    if any(value not in channels for channels in known):
        names = ", ".join(dict.fromkeys(c for channels in known for c in channels))
        raise ValueError(f"--channel {value}: no such channel; the images have {names}")
    return value


def output_paths(args: argparse.Namespace) -> tuple[Path, Path | None]:
    """The CSV and (with ``--npz``) the .npz the command writes; refuse existing ones without --force.

    ``--npz NAME`` without the suffix writes ``NAME.npz``, as ``numpy.savez`` does.
    """
    out = Path(args.out)
    npz = None if args.npz is None else Path(args.npz)
    if npz is not None and npz.suffix != ".npz":
        npz = npz.with_name(npz.name + ".npz")
    if npz is not None and npz.resolve() == out.resolve():
        raise ValueError(f"--out and --npz name the same file {out}")
    for path in (out, npz):
        if path is None:
            continue
        if path.is_dir():
            raise IsADirectoryError(f"{path} is a folder; give a file name")
        if path.exists() and not args.force:
            raise FileExistsError(f"{path} exists; use --force to overwrite it")
    return out, npz


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


def _check_data_options_apply(args: argparse.Namespace) -> None:
    """Refuse ``--root``/``--data-option`` when neither input is a dataset name (they would be ignored)."""
    given = args.root is not None or parse_data_options(args.data_options)
    named = any(spec in DATASETS and not Path(spec).exists() for spec in (args.synthetic, args.training))
    if given and not named:
        raise ValueError("--root and --data-option apply to dataset names; neither SYNTH nor TRAIN is one")


def run_correlate(args: argparse.Namespace) -> int:
    """Handler of ``memstudy correlate``."""
    out, npz = output_paths(args)
    _check_data_options_apply(args)
    # Decoded image folders larger than the memory budget live here; it is removed on any exit.
    scratch = make_temp_dir(args.scratch_dir or out.parent, "memstudy-correlate")
    try:
        synthetic = load_input(args.synthetic, args, role="SYNTH", scratch_dir=scratch)
        same = Path(args.training).resolve() == Path(args.synthetic).resolve()
        training = synthetic if same else load_input(args.training, args, role="TRAIN", scratch_dir=scratch)
        exclude = _exclude(args, synthetic, training)
        channel = _channel(args.channel, (synthetic, training))
        start = time.perf_counter()
        matches = topk_pearson(
            synthetic.images,
            training.images,
            args.top_k,
            backend=args.backend,
            chunk_mb=args.chunk_mb,
            exclude=exclude,
            channel=channel,
            progress=False if args.no_progress else None,
        )
        seconds = time.perf_counter() - start
        backend = backend_for(synthetic.images, training.images, args.backend, channel)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    write_csv(out, matches, synthetic.names, training.names)
    if npz is not None:
        matches.save(npz)
    for role, skipped in (("SYNTH", synthetic.skipped), ("TRAIN", training.skipped)):
        for name, reason in skipped:
            print(f"skipped {role} {name}: {reason}")
    written = f"{out} and {npz}" if npz is not None else f"{out}"
    print(
        f"correlated {len(synthetic.names)} synthetic with {len(training.names)} training images in "
        f"{seconds:.1f} s ({backend}); wrote {written}"
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


def _option_type(convert: Callable[[str], Any], valid: Callable[[Any], bool], expected: str) -> Callable:
    """An argparse ``type=``: ``convert(text)`` if ``valid`` holds, else the error ``expected ...``."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not valid(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value

    return parse


_positive_int = _option_type(int, lambda v: v >= 1, "a positive integer")
_positive_float = _option_type(float, lambda v: v > 0 and math.isfinite(v), "a positive number")
_count = _option_type(int, lambda v: v >= 0, "an integer >= 0")


def add_correlate_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``memstudy correlate SYNTH TRAIN``."""
    parser = subparsers.add_parser(
        "correlate",
        help="find the training images most correlated with each synthetic image",
        description="Exact top-k Pearson correlation of every synthetic image with every training image "
        "(flattened, as scipy.stats.pearsonr). SYNTH and TRAIN are each a folder of PNG/JPEG images "
        "(one grayscale image per file, the authors' layout), a saved ImageSet folder, a .npy file "
        "(N, ...) or a dataset name (opened from the cache that memstudy data prepare fills, with the "
        "same --root and options). Writes a CSV with one row per synthetic image: "
        "synthetic,training,correlation (plus a rank column and k rows per image when --top-k > 1). "
        "Existing outputs are kept unless --force is given.",
    )
    parser.add_argument(
        "synthetic", metavar="SYNTH", help="synthetic images: folder, .npy file or dataset name"
    )
    parser.add_argument(
        "training", metavar="TRAIN", help="training images: folder, .npy file or dataset name"
    )
    parser.add_argument(
        "-k",
        "--top-k",
        type=_positive_int,
        default=1,
        metavar="K",
        help="matches kept per synthetic image (default 1)",
    )
    parser.add_argument("-o", "--out", default="matches.csv", help="CSV to write (default matches.csv)")
    parser.add_argument(
        "--npz",
        metavar="PATH",
        help="also save values and indices as a .npz file (.npz appended if missing)",
    )
    parser.add_argument("--force", action="store_true", help="overwrite existing output files")
    add_data_options(parser)
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="compute backend (default auto: a CUDA GPU if usable, else the exact int8 path for 8-bit "
        "images, else numpy)",
    )
    parser.add_argument(
        "--chunk-mb",
        type=_positive_float,
        default=None,
        metavar="M",
        help="working-memory budget in MiB (default 1024 on CPU, half the free memory on a GPU); image "
        f"folders larger than this (default {FOLDER_MEMORY_MB}) are decoded into a scratch file instead "
        "of memory",
    )
    parser.add_argument(
        "--scratch-dir",
        default=None,
        metavar="DIR",
        help="where decoded image folders go when they exceed the memory budget (default: the folder "
        "of --out); removed when the command ends",
    )
    parser.add_argument(
        "--channel",
        default=None,
        help="correlate one channel (index, or a name of an ImageSet's channels); default: all "
        "channels together",
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
        help="for a set against itself: leave out each image itself, or its whole group (subject). "
        "Groups come from ImageSet folders and dataset names, or from --groups",
    )
    parser.add_argument(
        "--slice-distance",
        type=_count,
        default=None,
        metavar="S",
        help="for a set against itself: also leave out slices of the same subject at most S apart "
        "(slice positions: names like subject/z078, else the order within the subject, or the position "
        "column of --groups)",
    )
    parser.add_argument(
        "--groups",
        default=None,
        metavar="FILE",
        help="subjects of images that carry none (image folders, .npy files), for --exclude group and "
        "--slice-distance: a CSV with rows name,group or name,group,position, where name is the "
        "image's name in the output CSV (its file name, or its row number in a .npy file)",
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
