"""The ImageSet: uint8 images with one name and one subject group per image."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from memstudy.atomic import save_npy, write_json

IMAGES_FILE = "images.npy"
META_FILE = "meta.json"


@dataclass(frozen=True)
class ImageSet:
    """A stack of uint8 images, 0–255, with names, subject groups and channel names.

    Attributes
    ----------
    images : ndarray of uint8, shape (N, C, H, W) or (N, C, D, H, W)
        Intensities 0–255 (the paper's convention). May be a read-only memmap.
    names : tuple of str
        One per image, e.g. ``"BraTS20_Training_001/z078"``.
    groups : ndarray of int64, shape (N,)
        Subject id per image; slices of one volume share a group.
    channels : tuple of str
        One name per channel, e.g. ``("t1", "t2", "flair", "t1ce", "seg")``.
    provenance : dict
        JSON-serializable facts about where the images came from (loader, options, classes...).
    """

    images: np.ndarray
    names: tuple[str, ...]
    groups: np.ndarray
    channels: tuple[str, ...]
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        images, names = self.images, tuple(self.names)
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "channels", tuple(self.channels))
        object.__setattr__(self, "groups", np.asarray(self.groups, dtype=np.int64))
        if images.dtype != np.uint8:
            raise TypeError(f"ImageSet.images must be uint8 (0-255), got {images.dtype}")
        if images.ndim not in (4, 5):
            raise ValueError(
                f"ImageSet.images must have shape (N, C, H, W) or (N, C, D, H, W), got {images.shape}"
            )
        n = images.shape[0]
        if len(names) != n or self.groups.shape != (n,):
            raise ValueError(
                f"ImageSet has {n} images but {len(names)} names and {self.groups.shape[0]} groups"
            )
        if len(self.channels) != images.shape[1]:
            raise ValueError(
                f"ImageSet.images has {images.shape[1]} channels but {len(self.channels)} "
                f"channel names {self.channels}"
            )

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def image_shape(self) -> tuple[int, ...]:
        """Shape of one image, channels first."""
        return tuple(self.images.shape[1:])

    def subset(self, indices: np.ndarray | list[int] | slice) -> ImageSet:
        """Return the images at ``indices`` (a copy in memory)."""
        idx = np.arange(len(self))[indices]
        return ImageSet(
            np.ascontiguousarray(self.images[idx]),
            tuple(self.names[i] for i in idx),
            self.groups[idx],
            self.channels,
            dict(self.provenance),
        )

    def channel(self, name: str) -> np.ndarray:
        """Return one channel as an ``(N, H, W)`` (or ``(N, D, H, W)``) view."""
        if name not in self.channels:
            raise KeyError(f"no channel {name!r}; this ImageSet has {self.channels}")
        return self.images[:, self.channels.index(name)]

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``images.npy`` and ``meta.json`` into ``directory``, each atomically.

        The images are written first, so a directory with a ``meta.json`` is always complete.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_npy(directory / IMAGES_FILE, self.images)
        write_meta(directory, self.names, self.groups, self.channels, self.images.shape, self.provenance)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, *, mmap: bool = True) -> ImageSet:
        """Read an ImageSet written by :meth:`save`; images are memory-mapped read-only by default."""
        directory = Path(directory)
        meta_path = directory / META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"{directory}: not a saved ImageSet (no {META_FILE})")
        meta = json.loads(meta_path.read_text())
        images = np.load(directory / IMAGES_FILE, mmap_mode="r" if mmap else None)
        if list(images.shape) != meta["shape"]:
            raise ValueError(
                f"{directory / IMAGES_FILE}: shape {images.shape} does not match {META_FILE} "
                f"({tuple(meta['shape'])})"
            )
        return cls(
            images,
            tuple(meta["names"]),
            np.asarray(meta["groups"]),
            tuple(meta["channels"]),
            meta.get("provenance", {}),
        )


def write_meta(
    directory: str | os.PathLike,
    names: Sequence[str],
    groups: Sequence[int] | np.ndarray,
    channels: Sequence[str],
    shape: Sequence[int],
    provenance: dict,
) -> None:
    """Write an ImageSet folder's ``meta.json`` (atomically); writers call it after ``images.npy``.

    Every writer of ImageSet folders (``ImageSet.save``, the data cache, streamed samples) uses this,
    so the format has one definition beside :meth:`ImageSet.load`, which reads it.
    """
    write_json(
        Path(directory) / META_FILE,
        {
            "names": list(names),
            "groups": np.asarray(groups).tolist(),
            "channels": list(channels),
            "shape": [int(x) for x in shape],
            "provenance": provenance,
        },
    )
