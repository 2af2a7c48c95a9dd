"""``memstudy data``: prepare and cache a dataset."""

from __future__ import annotations

import argparse

from memstudy.data.datasets import DATASETS, EMBEDDED, REAL


def add_data_command(commands: argparse._SubParsersAction) -> None:
    """Add ``memstudy data prepare`` to the command's subparsers."""
    data = commands.add_parser(
        "data",
        help="prepare datasets (real layouts or embedded phantoms)",
        description="Prepare datasets into the cache as uint8 ImageSets.",
    )
    actions = data.add_subparsers(dest="action", metavar="ACTION", required=True)
    names = "; ".join(f"{k}: {v}" for k, v in {**REAL, **EMBEDDED}.items())
    prepare = actions.add_parser(
        "prepare",
        help="load a dataset through its loader and cache it",
        description=f"Load a dataset through its loader and cache it as an ImageSet. Datasets: {names}. "
        "Real datasets need --root; phantoms are generated on first use.",
    )
    prepare.add_argument("name", choices=DATASETS, metavar="NAME", help=f"one of {', '.join(DATASETS)}")
    prepare.add_argument("--root", help="folder of your copy (real datasets)")
    prepare.add_argument("--size", type=int, help="image side after the paper's pipeline (e.g. 64, 128, 256)")
    prepare.add_argument("--split", help="BraTS: train|holdout; chest x-ray: train|val|test")
    prepare.add_argument("--holdout", type=int, help="BraTS: subjects held out (the paper: 56)")
    prepare.add_argument("--n-subjects", type=int, help="keep the first n subjects (patients) of the split")
    prepare.add_argument("--pad-to", type=int, help="BraTS: zero-pad slices to this size first (default 256)")
    prepare.add_argument("--mode", choices=("2d", "3d"), help="BraTS: 2D slices or 3D volumes")
    prepare.add_argument("--channels", help="BraTS: comma-separated sequences, e.g. t1,t2,flair,t1ce,seg")
    prepare.add_argument("--on-error", choices=("raise", "skip"), help="what to do with unreadable files")
    prepare.set_defaults(func=run_prepare)


def run_prepare(args: argparse.Namespace) -> int:
    """Prepare the dataset and print a one-line summary."""
    from memstudy.data import load_dataset

    options = {
        key: getattr(args, key)
        for key in ("size", "split", "holdout", "n_subjects", "pad_to", "mode", "on_error")
    }
    options = {key: value for key, value in options.items() if value is not None}
    if args.channels:
        options["channels"] = tuple(args.channels.split(","))
    try:
        imageset = load_dataset(args.name, root=args.root, **options)
    except TypeError as error:  # an option the dataset's loader does not take
        raise ValueError(f"{args.name}: {error}") from error
    skipped = len(imageset.provenance.get("skipped", []))
    print(
        f"{args.name}: {len(imageset)} images of shape {imageset.image_shape} "
        f"({','.join(imageset.channels)}), {len(set(imageset.groups.tolist()))} subjects, "
        f"{skipped} skipped; cached in {imageset.provenance['cache_dir']}"
    )
    return 0
