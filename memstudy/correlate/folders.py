"""Folders of PNG/JPEG images, the authors' layout: one grayscale image per file, named by file."""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from memstudy.atomic import make_temp_dir
from memstudy.data.image_files import ImageFileError, image_size, list_images, read_gray

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Folder:
    """Images read from one folder.

    Attributes
    ----------
    images : ndarray of uint8, shape (N, H, W)
        Grayscale, 0–255, in file-name order (may be a memmap in a scratch folder).
    names : tuple of str
        File names (without the folder), as in the authors' CSV.
    skipped : list of (str, str)
        File name and reason for every file left out with ``on_error="skip"``.
    """

    images: np.ndarray
    names: tuple[str, ...]
    skipped: list[tuple[str, str]] = field(default_factory=list)


def read_folder(
    folder: str | os.PathLike,
    *,
    on_error: str = "raise",
    scratch_dir: str | os.PathLike | None = None,
    max_memory_mb: float = 512,
) -> Folder:
    """Read every PNG/JPEG in ``folder`` as grayscale uint8.

    Parameters
    ----------
    folder : path
        A folder of images of one size (colour images are converted to luminance).
    on_error : {"raise", "skip"}
        What to do with a file that cannot be read or whose size differs from the most common size:
        raise ``ValueError`` naming it, or leave it out and list it in ``Folder.skipped``.
    scratch_dir : path, optional
        Where to put the images as a ``.npy`` memmap when they exceed ``max_memory_mb``; without it
        they are always read into memory. Each call writes into a new subfolder of it, so folders
        with the same name (``ddpm/images``, ``train/images``) never share a file. The caller
        removes ``scratch_dir`` when done with the images.
    max_memory_mb : float
        Largest folder (in MiB of uint8 pixels) read into memory when ``scratch_dir`` is given.

    Returns
    -------
    Folder

    Raises
    ------
    FileNotFoundError
        If ``folder`` holds no PNG or JPEG files.
    ValueError
        Naming the first unreadable or odd-sized file, with ``on_error="raise"``.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error={on_error!r}: expected 'raise' or 'skip'")
    folder = Path(folder)
    files = list_images(folder)
    if not files:
        raise FileNotFoundError(f"{folder}: no PNG or JPEG images")
    problems: dict[Path, str] = {}
    sizes: dict[Path, tuple[int, int]] = {}
    for path in files:
        try:
            sizes[path] = image_size(path)
        except ImageFileError as error:
            problems[path] = error.reason
    if not sizes:
        first = files[0]
        raise ValueError(
            f"{folder}: none of the {len(files)} image files can be read; {first}: {problems[first]}"
        )
    (width, height), _ = Counter(sizes.values()).most_common(1)[0]
    for path, size in sizes.items():
        if size != (width, height):
            problems[path] = f"size {size[0]}×{size[1]} differs from {width}×{height} (the most common size)"

    def fail_or_skip(path: Path, reason: str) -> None:
        if on_error == "raise":
            others = len(problems) - 1 if path in problems else len(problems)
            more = f" (and {others} more problem files)" if others > 0 else ""
            raise ValueError(f"{path}: {reason}{more}; use --on-error skip to leave such files out")
        problems[path] = reason

    for path in files:
        if path in problems:
            fail_or_skip(path, problems[path])
    keep = [p for p in files if p not in problems]
    shape = (len(keep), height, width)
    if scratch_dir is not None and np.prod(shape) > max_memory_mb * 2**20:
        memmap_path = make_temp_dir(scratch_dir, folder.name) / "images.npy"
        images = np.lib.format.open_memmap(memmap_path, mode="w+", dtype=np.uint8, shape=shape)
    else:
        images = np.empty(shape, dtype=np.uint8)
    names: list[str] = []
    for path in keep:
        try:
            pixels = read_gray(path)
        except ImageFileError as error:
            # Headers can be fine and the pixel data truncated: only decoding finds out.
            fail_or_skip(path, error.reason)
            continue
        images[len(names)] = pixels
        names.append(path.name)
    skipped = [(p.name, problems[p]) for p in files if p in problems]
    for name, reason in skipped:
        logger.warning("%s: skipped %s: %s", folder, name, reason)
    return Folder(images[: len(names)], tuple(names), skipped)
