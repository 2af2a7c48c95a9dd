"""Image files (PNG, JPEG): list a folder's images and read one file as 8-bit grayscale.

Shared by the chest x-ray loader and ``memstudy correlate``'s image folders, so both accept the
same files, ignore the same clutter and give the same errors.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
#: Pillow modes with more than 8 bits per pixel: converting them to "L" would clip, not rescale.
_WIDE_MODES = frozenset({"I", "F", "I;16", "I;16L", "I;16B", "I;16N"})
#: What Pillow raises for a file it cannot identify or decode (UnidentifiedImageError is an OSError;
#: a few corrupt headers raise SyntaxError; very large images raise DecompressionBombError).
_READ_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class ImageFileError(ValueError):
    """An image file that cannot be read as 8-bit grayscale.

    Attributes
    ----------
    path : Path
        The file.
    reason : str
        What is wrong with it, without the file name (``str(error)`` is ``"<path>: <reason>"``).
    """

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def list_images(folder: str | os.PathLike) -> list[Path]:
    """PNG and JPEG files directly in ``folder``, sorted by name.

    Hidden files are ignored: the macOS metadata in archives (``._x.png``, ``.DS_Store``) is not an
    image even when its name ends in ``.png``.
    """
    return sorted(
        p
        for p in Path(folder).iterdir()
        if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()
    )


def _wide_mode(path: Path, mode: str) -> ImageFileError:
    return ImageFileError(path, f"mode {mode} (more than 8 bits per pixel) is not supported; expected 8-bit")


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(width, height)`` of an image file, from its header (the pixels are not decoded).

    Raises
    ------
    ImageFileError
        If the file is not a readable image or has more than 8 bits per pixel.
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            mode, size = image.mode, image.size
    except _READ_ERRORS as error:
        raise ImageFileError(path, f"cannot read the image ({error})") from error
    if mode in _WIDE_MODES:
        raise _wide_mode(path, mode)
    return size


def read_gray(path: str | os.PathLike, content: bytes | None = None) -> np.ndarray:
    """Read an image file as uint8 grayscale, shape ``(height, width)``, 0–255.

    Colour images are converted to luminance (Pillow's ITU-R 601-2 weights). With ``content``
    (an uploaded file's bytes) those bytes are decoded and ``path`` only names them in errors.

    Raises
    ------
    ImageFileError
        If the file cannot be decoded (a truncated file is found only here, not by
        :func:`image_size`) or has more than 8 bits per pixel.
    """
    path = Path(path)
    try:
        with Image.open(path if content is None else io.BytesIO(content)) as image:
            mode = image.mode
            if mode not in _WIDE_MODES:
                return np.asarray(image.convert("L"), dtype=np.uint8)
    except _READ_ERRORS as error:
        raise ImageFileError(path, f"cannot read the image ({error})") from error
    raise _wide_mode(path, mode)
