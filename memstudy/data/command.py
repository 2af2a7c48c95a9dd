"""``memstudy data prepare``, and the data options that every command reading a dataset shares.

``add_data_options`` and ``open_data`` give ``prepare``, ``train`` and ``correlate`` the same
``--root`` and ``--data-option KEY=VALUE``, so a command opens exactly the cached ImageSet that
``memstudy data prepare`` made with the same options.
"""

from __future__ import annotations

import argparse
import json
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from memstudy.data.brats import load_brats
from memstudy.data.chestxray import load_chestxray
from memstudy.data.datasets import DATASETS, EMBEDDED, PHANTOM_OPTIONS, REAL, load_dataset
from memstudy.data.imageset import META_FILE, ImageSet

#: Loader options a user cannot set: the dataset name fixes the year; --root gives the root.
_FIXED_OPTIONS = frozenset({"root", "year", "progress"})


def _loader(name: str) -> Callable[..., ImageSet]:
    """The loader function behind a dataset name (as in :func:`memstudy.data.load_dataset`)."""
    return load_chestxray if name in ("chestxray", "cxr-phantom") else load_brats


def add_data_options(parser: argparse.ArgumentParser, *, flag: str = "--data-option") -> None:
    """Add ``--root`` and a repeatable ``flag KEY=VALUE`` (stored as ``args.root``, ``args.data_options``)."""
    parser.add_argument(
        "--root", default=None, help="folder of your copy of a real dataset (brats20, brats21, chestxray)"
    )
    parser.add_argument(
        flag,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        dest="data_options",
        help="a loader option for a dataset name, by the loader's keyword (size=64, pad_to=32, "
        "split=holdout, channels=t1,flair, phantom_subjects=8); repeatable. Values are JSON where they "
        "parse as JSON; a dataset prepared with the same options is opened from the cache.",
    )


def parse_data_options(items: list[str], *, flag: str = "--data-option") -> dict[str, Any]:
    """``["size=64", "split=holdout"]`` → ``{"size": 64, "split": "holdout"}`` (JSON values, else strings)."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"{flag} expects KEY=VALUE, got {item!r}")
        if key in options:
            raise ValueError(f"{flag} {key} is given twice")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin is tuple:
        return "a comma-separated list"
    return {int: "an integer", bool: "true or false", float: "a number", str: "a string"}.get(
        hint, "null" if hint is type(None) else str(hint)
    )


def _convert(value: Any, hint: Any) -> Any:
    """``value`` as the loader parameter annotated ``hint`` takes it; raise ValueError if it does not fit."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            try:
                return _convert(value, arg)
            except ValueError:
                continue
    elif origin is typing.Literal:
        if value in args:
            return value
    elif origin is tuple:
        items = value.split(",") if isinstance(value, str) else value
        if isinstance(items, list | tuple) and items and all(isinstance(i, str) and i for i in items):
            return tuple(items)
    elif hint is type(None):
        if value is None:
            return None
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif isinstance(hint, type) and isinstance(value, hint):
        return value
    raise ValueError(f"expected {_describe(hint)}")


def check_data_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """Check a dataset's loader options before loading: names it takes, values of the right type.

    Returns
    -------
    dict
        The options as the loader takes them (a comma-separated string becomes a tuple).

    Raises
    ------
    ValueError
        Naming the option and what the loader expects, for an unknown option or a bad value.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    hints = typing.get_type_hints(_loader(name))
    if name in EMBEDDED:
        hints.update({key: int for key in PHANTOM_OPTIONS})
    allowed = {key: hint for key, hint in hints.items() if key not in _FIXED_OPTIONS and key != "return"}
    checked = {}
    for key, value in options.items():
        if key not in allowed:
            raise ValueError(
                f"{name}: unknown option {key!r}; it takes {', '.join(sorted(allowed))}"
                + (" (give the folder with --root)" if key == "root" else "")
            )
        try:
            checked[key] = _convert(value, allowed[key])
        except ValueError as error:
            raise ValueError(f"{name}: option {key}={json.dumps(value)}: {error}") from None
    return checked


def open_data(
    spec: str,
    args: argparse.Namespace,
    *,
    what: str = "DATA",
    progress: bool = True,
    options_for_names_only: bool = False,
) -> ImageSet:
    """Open a saved ImageSet folder or a dataset name with the options of :func:`add_data_options`.

    A dataset name is loaded through the cache with ``--root`` and the ``--data-option`` values, so
    data prepared by ``memstudy data prepare NAME --root R --option K=V`` is opened, not read again.

    Parameters
    ----------
    spec : str
        A folder written by ``ImageSet.save`` (or a cache entry), or a name from ``DATASETS``.
    args : argparse.Namespace
        Parsed arguments with ``root`` and ``data_options``.
    what : str
        The argument's name in error messages (e.g. ``"TRAIN"``).
    progress : bool
        Show a progress bar while a dataset is prepared.
    options_for_names_only : bool
        For commands with several data arguments (``correlate SYNTH TRAIN``): the options belong to
        whichever argument is a dataset name, so a folder ignores them instead of refusing them.

    Raises
    ------
    FileNotFoundError
        If ``spec`` is neither an existing path nor a dataset name.
    ValueError
        For a folder that is not a saved ImageSet, options given with a folder, or bad options.
    """
    options = parse_data_options(args.data_options)
    path = Path(spec)
    if path.exists() or spec not in DATASETS:
        if not path.exists():
            looks_like_a_name = len(path.parts) == 1 and not path.suffix
            names = f" (and is not a dataset name: {', '.join(DATASETS)})" if looks_like_a_name else ""
            raise FileNotFoundError(f"{what}: {spec} does not exist{names}")
        if not (path / META_FILE).is_file():
            raise ValueError(f"{what}: {spec} is not a saved ImageSet folder (no {META_FILE})")
        if (args.root is not None or options) and not options_for_names_only:
            raise ValueError(
                f"{what}: --root and --data-option apply to dataset names, not to the folder {spec}"
            )
        return ImageSet.load(path)
    return load_named(spec, args.root, options, what=what, progress=progress)


def load_named(
    name: str, root: str | None, options: dict[str, Any], *, what: str = "DATA", progress: bool = True
) -> ImageSet:
    """Load a dataset by name after checking ``root`` and ``options`` (see :func:`check_data_options`)."""
    if name in REAL and root is None:
        raise ValueError(f"{what}: {name} needs --root, the folder of your copy of {REAL[name]}")
    if root is not None and not Path(root).is_dir():
        raise FileNotFoundError(f"--root {root} does not exist or is not a folder")
    return load_dataset(name, root=root, progress=progress, **check_data_options(name, options))


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
        "Real datasets need --root; phantoms are generated on first use. Commands that read a dataset "
        "name (train, correlate) open this cached copy when given the same --root and the same options "
        "as --data-option KEY=VALUE (e.g. --size 64 here is --data-option size=64 there).",
    )
    prepare.add_argument("name", choices=DATASETS, metavar="NAME", help=f"one of {', '.join(DATASETS)}")
    add_data_options(prepare, flag="--option")
    prepare.add_argument("--size", type=int, help="image side after the paper's pipeline (e.g. 64, 128, 256)")
    prepare.add_argument("--split", help="BraTS: train|holdout; chest x-ray: train|val|test")
    prepare.add_argument(
        "--holdout",
        type=_holdout,
        help="BraTS: subjects held out after a fixed permutation (the paper: 56), or 'authors' for the "
        "authors' exact split (313/1195 training subjects of their order, the last 56 held out)",
    )
    prepare.add_argument("--n-subjects", type=int, help="keep the first n subjects (patients) of the split")
    prepare.add_argument("--pad-to", type=int, help="BraTS: zero-pad slices to this size first (default 256)")
    prepare.add_argument("--mode", choices=("2d", "3d"), help="BraTS: 2D slices or 3D volumes")
    prepare.add_argument("--channels", help="BraTS: comma-separated sequences, e.g. t1,t2,flair,t1ce,seg")
    prepare.add_argument("--on-error", choices=("raise", "skip"), help="what to do with unreadable files")
    prepare.set_defaults(func=run_prepare)


def _holdout(text: str) -> int | str:
    """``--holdout``: a number of subjects or the word ``authors``."""
    if text == "authors":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a subject count or 'authors', got {text!r}") from None


def run_prepare(args: argparse.Namespace) -> int:
    """Prepare the dataset and print a one-line summary."""
    options = {
        key: getattr(args, key)
        for key in ("size", "split", "holdout", "n_subjects", "pad_to", "mode", "channels", "on_error")
    }
    options = {key: value for key, value in options.items() if value is not None}
    extra = parse_data_options(args.data_options, flag="--option")
    clash = sorted(options.keys() & extra.keys())
    if clash:
        raise ValueError(f"{clash[0]} is given both as --{clash[0].replace('_', '-')} and as --option")
    imageset = load_named(args.name, args.root, {**options, **extra}, what="NAME")
    skipped = len(imageset.provenance.get("skipped", []))
    print(
        f"{args.name}: {len(imageset)} images of shape {imageset.image_shape} "
        f"({','.join(imageset.channels)}), {len(set(imageset.groups.tolist()))} subjects, "
        f"{skipped} skipped; cached in {imageset.provenance['cache_dir']}"
    )
    return 0
