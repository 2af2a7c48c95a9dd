"""Folders of PNG/JPEG images, the authors' layout: one grayscale image per file, named by file."""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
#: Pillow modes with more than 8 bits per pixel; converting them to "L" would clip, not rescale.
_WIDE_MODES = frozenset({"I", "F", "I;16", "I;16L", "I;16B", "I;16N"})


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


def list_images(folder: str | os.PathLike) -> list[Path]:
    """PNG and JPEG files directly in ``folder``, sorted by name; hidden files (``._x.png``) are ignored."""
    folder = Path(folder)
    return sorted(
        p
        for p in folder.iterdir()
        if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()
    )


def _probe(path: Path) -> tuple[tuple[int, int], str]:
    with Image.open(path) as image:
        if image.mode in _WIDE_MODES:
            raise ValueError(
                f"mode {image.mode} (more than 8 bits per pixel) is not supported; expected 8-bit"
            )
        return image.size, image.mode


def _decode(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("L"), dtype=np.uint8)


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
        they are always read into memory.
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
            sizes[path] = _probe(path)[0]
        except (OSError, UnidentifiedImageError, ValueError) as error:
            problems[path] = f"cannot be read ({error})"
    if not sizes:
        raise ValueError(f"{folder}: none of the {len(files)} image files can be read")
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
        images = np.lib.format.open_memmap(
            Path(scratch_dir) / f"{folder.name}.npy", mode="w+", dtype=np.uint8, shape=shape
        )
    else:
        images = np.empty(shape, dtype=np.uint8)
    names: list[str] = []
    for path in keep:
        try:
            pixels = _decode(path)
        except (OSError, UnidentifiedImageError, ValueError) as error:
            # Headers can be fine and the pixel data truncated: only decoding finds out.
            fail_or_skip(path, f"cannot be decoded ({error})")
            continue
        images[len(names)] = pixels
        names.append(path.name)
    skipped = [(p.name, problems[p]) for p in files if p in problems]
    for name, reason in skipped:
        logger.warning("%s: skipped %s: %s", folder, name, reason)
    return Folder(images[: len(names)], tuple(names), skipped)
