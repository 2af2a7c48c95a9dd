"""The on-disk cache of prepared ImageSets.

A prepared ImageSet lives in ``<cache>/imagesets/<loader>-<key>/``. The key hashes the loader's name,
its pipeline version, its options and every input file's path, size and modification time, so changing
an input file, an option or the loader's output prepares the data again, and an unchanged request is a
memory-mapped load. Each loader module declares ``PIPELINE_VERSION`` and bumps it whenever its output
for the same input changes (``tests/test_data_fingerprints.py`` fails until it is bumped).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from memstudy.atomic import atomic_dir
from memstudy.data.imageset import IMAGES_FILE, META_FILE, ImageSet, write_meta

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Return the cache root: ``$MEMSTUDY_CACHE`` if set, else ``~/.cache/memstudy``."""
    return Path(os.environ.get("MEMSTUDY_CACHE") or Path.home() / ".cache" / "memstudy")


def cache_key(
    loader: str, options: dict[str, Any], files: Iterable[str | os.PathLike], *, version: int
) -> str:
    """Hash a loader name, its pipeline version, its options and its input files (path, size, mtime)."""
    stamps = []
    for file in sorted(str(f) for f in files):
        stat = os.stat(file)
        stamps.append([file, stat.st_size, stat.st_mtime_ns])
    blob = json.dumps(
        {"loader": loader, "version": version, "options": options, "files": stamps},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


class ImageSetWriter:
    """Append images to a growing on-disk ImageSet without holding them all in memory.

    Images are appended to a raw file; :meth:`finish` turns it into ``images.npy`` and ``meta.json``.
    """

    def __init__(self, directory: Path, channels: tuple[str, ...], label: str):
        self.directory = directory
        self.label = label
        self.channels = channels
        self.names: list[str] = []
        self.groups: list[int] = []
        self.image_shape: tuple[int, ...] | None = None
        self._raw_path = directory / "images.raw"
        self._raw = open(self._raw_path, "wb")

    def append(self, images: np.ndarray, names: list[str], groups: list[int]) -> None:
        """Append ``images`` (uint8, ``(n, C, ...)``) with one name and group per image."""
        if images.dtype != np.uint8 or images.shape[1] != len(self.channels):
            raise ValueError(
                f"expected uint8 images with {len(self.channels)} channels, got {images.dtype} {images.shape}"
            )
        if self.image_shape is None:
            self.image_shape = tuple(images.shape[1:])
        elif tuple(images.shape[1:]) != self.image_shape:
            raise ValueError(
                f"{names[0] if names else 'image'}: shape {images.shape[1:]} differs "
                f"from the first images' {self.image_shape}"
            )
        self._raw.write(np.ascontiguousarray(images).tobytes())
        self.names.extend(names)
        self.groups.extend(int(g) for g in groups)

    def finish(self, provenance: dict[str, Any]) -> None:
        """Write ``images.npy`` and ``meta.json`` (meta last, so its presence marks completion)."""
        self._raw.close()
        if not self.names:
            raise ValueError(
                f"{self.label}: no images were kept (every input was skipped, "
                "or no slice passed the selection rule)"
            )
        shape = (len(self.names), *self.image_shape)
        raw = np.memmap(self._raw_path, dtype=np.uint8, mode="r", shape=shape)
        out = np.lib.format.open_memmap(self.directory / IMAGES_FILE, mode="w+", dtype=np.uint8, shape=shape)
        for start in range(0, shape[0], 256):
            out[start : start + 256] = raw[start : start + 256]
        out.flush()
        del out, raw
        self._raw_path.unlink()
        write_meta(self.directory, self.names, self.groups, self.channels, shape, provenance)


def cached_imageset(
    loader: str,
    options: dict[str, Any],
    files: Iterable[str | os.PathLike],
    build: Callable[[ImageSetWriter], dict[str, Any]],
    channels: tuple[str, ...],
    *,
    version: int,
) -> ImageSet:
    """Return the cached ImageSet for this request, preparing it with ``build`` on a miss.

    ``build(writer)`` appends images to the writer and returns the provenance dict. It runs in a
    temporary folder (with the umask's permissions, so other users and Dask workers can read the
    result) that is flushed to disk and renamed into place only when complete, so a failed or
    interrupted preparation leaves nothing behind and the next call starts afresh. ``version`` is the
    loader's ``PIPELINE_VERSION``: part of the key, so a loader whose output changed never reuses an
    entry prepared by its older code.
    """
    files = list(files)
    key = cache_key(loader, options, files, version=version)
    target = cache_dir() / "imagesets" / f"{loader}-{key}"
    if (target / META_FILE).is_file():
        log.info("using cached %s data in %s", loader, target)
        return ImageSet.load(target)
    if target.exists():
        shutil.rmtree(target)  # a half-made entry (no meta.json) from a crash before durable renames
    try:
        with atomic_dir(target) as staging:
            writer = ImageSetWriter(staging, channels, loader)
            provenance = build(writer)
            writer.finish(
                {
                    "loader": loader,
                    "pipeline_version": version,
                    "options": options,
                    "cache_dir": str(target),
                    **provenance,
                }
            )
    except OSError:
        if not (target / META_FILE).is_file():
            raise
        log.info("another process prepared %s first; using it", target)  # same key, same data
    return ImageSet.load(target)
