"""Named datasets: real layouts brought by the user, and embedded phantoms generated on demand."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from memstudy.data.brats import load_brats
from memstudy.data.chestxray import load_chestxray
from memstudy.data.imageset import META_FILE, ImageSet

REAL = {"brats20": "BraTS 2020", "brats21": "BraTS 2021", "chestxray": "Kermany chest x-ray"}
EMBEDDED = {"brain-phantom": "BraTS-2020-layout MNI152 phantoms", "cxr-phantom": "procedural chest x-rays"}
DATASETS = (*REAL, *EMBEDDED)
#: The datasets whose images are 2D slices of 3D volumes (the others are independent images).
SLICED_VOLUMES = ("brats20", "brats21", "brain-phantom")
PHANTOM_OPTIONS = ("phantom_subjects", "phantom_per_class", "phantom_seed")


def load_dataset(name: str, root: str | os.PathLike | None = None, **options: Any) -> ImageSet:
    """Load a named dataset through the real loaders.

    Parameters
    ----------
    name : {"brats20", "brats21", "chestxray", "brain-phantom", "cxr-phantom"}
        ``brats20``/``brats21``/``chestxray`` read your copy at ``root``. ``brain-phantom`` and
        ``cxr-phantom`` are generated (once, then cached) in the real layouts and read by the same
        loaders; ``root`` is then ignored unless given to point at an existing generated copy.
    root : path, optional
        Data folder (required for real datasets).
    **options
        Loader options (see :func:`load_brats` and :func:`load_chestxray`). The phantoms also take
        ``phantom_seed``; ``brain-phantom`` takes ``phantom_subjects`` (how many to generate) and
        ``cxr-phantom`` takes ``phantom_per_class`` (``{split: [n_normal, n_pneumonia]}`` for the splits
        to generate, e.g. a small set for quick runs; default 200/300 train, 8/8 val, 50/50 test). An
        image depends only on the seed, its split, class and number, so a smaller set holds the first
        images of a larger one.

    Returns
    -------
    ImageSet
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    generator = {key: options.pop(key) for key in PHANTOM_OPTIONS if key in options}
    if name in REAL:
        if root is None:
            raise ValueError(f"dataset {name!r} ({REAL[name]}) needs root=, the folder of your copy")
        if generator:
            raise ValueError(f"{', '.join(generator)} only apply to the embedded phantom datasets")
    if name == "brats20":
        return load_brats(root, year=2020, **options)
    if name == "brats21":
        return load_brats(root, year=2021, **options)
    if name == "chestxray":
        return load_chestxray(root, **options)
    from memstudy.data import phantoms  # imports nilearn, which is slow: only when needed

    if name == "brain-phantom":
        if "phantom_per_class" in generator:
            raise ValueError("phantom_per_class applies to cxr-phantom; brain-phantom takes phantom_subjects")
        if root is None:
            root = phantoms.ensure_phantom(
                name,
                seed=generator.get("phantom_seed", 0),
                n_subjects=generator.get("phantom_subjects", phantoms.DEFAULT_N_SUBJECTS),
                progress=options.get("progress", True),
            )
        return load_brats(root, year=2020, **options)
    if "phantom_subjects" in generator:
        raise ValueError("phantom_subjects applies to brain-phantom; cxr-phantom takes phantom_per_class")
    if root is None:
        root = phantoms.ensure_phantom(
            name,
            seed=generator.get("phantom_seed", 0),
            n_per_class=_per_class_option(generator.get("phantom_per_class")),
            progress=options.get("progress", True),
        )
    return load_chestxray(root, **options)


def _per_class_option(value: Any) -> dict[str, tuple[int, int]] | None:
    """Check ``phantom_per_class``: a mapping of split to two non-negative image counts."""
    if value is None:
        return None
    pairs_ok = isinstance(value, dict) and all(
        isinstance(n, (list, tuple))
        and len(n) == 2
        and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in n)
        for n in value.values()
    )
    if not pairs_ok:
        raise ValueError(
            f"phantom_per_class must map splits to [n_normal, n_pneumonia] counts, e.g. "
            f"{{train: [12, 12], test: [8, 8]}}; got {value!r}"
        )
    return {split: (n[0], n[1]) for split, n in value.items()}


def open_imageset(spec: str | os.PathLike, root: str | os.PathLike | None = None, **options: Any) -> ImageSet:
    """Open what a command line names as data: a saved ImageSet folder, or a dataset name.

    ``root`` and ``options`` go to :func:`load_dataset`, which rejects unknown names.
    """
    if (Path(spec) / META_FILE).is_file():
        return ImageSet.load(spec)
    return load_dataset(str(spec), root=root, **options)
